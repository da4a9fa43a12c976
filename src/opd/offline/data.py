"""The offline baseline's data: the teacher writes completions once, they are stored, the student
imitates them. On disk: `meta.json` (what generated it) and `data.jsonl`, one completion a line
with the teacher's per-token logprobs and top-k, readable by `datasets.load_dataset("json", ...)`.

Generation appends one batch at a time and is resumable: a rerun keeps every batch stored whole,
drops a partly written one (its rows share one generator, so they are made again together), and
generates only the batches still missing: the data equals an uninterrupted generation's. Stored data is reused by
any later run that points at the same folder with the same generation settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from opd.config import ConfigError
from opd.faults import crash_point
from opd.rollout import SamplingParams, encode_prompts, sample
from opd.types import TEACHER_WRITTEN, Prompt, Rollout, TeacherScores

DATA, META = "data.jsonl", "meta.json"


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from an interrupted write: regenerate from here
    return rows


def generate_offline_data(folder: Path, teacher, tokenizer, prompts: list[Prompt], params: SamplingParams, *,
                          meta: dict, topk: int, seed: int, max_prompt_tokens: int, batch_size: int = 0,
                          log=print, should_stop=lambda: False) -> dict:
    """Make sure `folder` holds teacher completions for all `prompts`; returns {"generated", "reused", "tokens"}, and
    "interrupted": True when `should_stop` ended it between two batches (what is stored is kept; a rerun goes on)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            raise ConfigError(f"{folder} holds offline data made with other settings {diff}; "
                              "point offline.data at another folder or delete this one")
    else:
        meta_path.write_text(json.dumps(meta, indent=1))
    # Generation batches may be larger than scoring batches: a small model's decode step costs about the
    # same at 64 or 256 rows (per-step overhead dominates), so bigger batches write data faster.
    batch_size = batch_size or teacher.batch_size
    batches = [list(range(start, min(start + batch_size, len(prompts)))) for start in range(0, len(prompts), batch_size)]
    rows = _read_rows(folder / DATA)
    done = {r["index"] for r in rows}
    whole = {i for idx in batches if all(i in done for i in idx) for i in idx}
    rows = [r for r in rows if r["index"] in whole]
    # Rewrite without a torn tail or a partly written batch, so appends start on a clean line.
    (folder / DATA).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    todo_batches = [(b, idx) for b, idx in enumerate(batches) if idx[0] not in whole]
    todo = [i for _, idx in todo_batches for i in idx]
    reused = len(prompts) - len(todo)
    tokens = 0
    with (folder / DATA).open("a", encoding="utf-8") as f:
        for b, idx in todo_batches:
            gen = torch.Generator(device=next(teacher.model.parameters()).device).manual_seed(seed * 100003 + idx[0])
            roll = sample(teacher.model, tokenizer, [prompts[i] for i in idx], params, generator=gen,
                          max_prompt_tokens=max_prompt_tokens)
            scores = teacher.score(roll) if topk else None
            for j, i in enumerate(idx):
                n = int(roll.completion_mask[j].sum())
                p = prompts[i]
                row = {"index": i, "prompt": p.text, "source": p.source, "answer": p.answer, "task": p.task,
                       "completion": roll.texts[j], "completion_ids": roll.completion_ids[j, :n].tolist(),
                       "finished": bool(roll.finished[j]),  # ended by EOS / a stop string, not cut by max_new_tokens
                       "logprobs": [round(x, 6) for x in roll.behaviour_logprobs[j, :n].tolist()]}
                if scores is not None:
                    row["topk_ids"] = scores.topk_ids[j, :n].tolist()
                    row["topk_logprobs"] = [[round(x, 6) for x in r] for r in scores.topk_logprobs[j, :n].tolist()]
                f.write(json.dumps(row) + "\n")
                tokens += n
            f.flush()
            os.fsync(f.fileno())
            crash_point("offline_generate", b)
            if should_stop() and b != todo_batches[-1][0]:
                made = sum(len(i) for c, i in todo_batches if c <= b)
                log(f"offline data: interrupted after {reused + made} of {len(prompts)} teacher completions")
                return {"generated": made, "reused": reused, "tokens": tokens, "interrupted": True}
    if todo:
        log(f"offline data: generated {len(todo)} teacher completions ({tokens} tokens), reused {reused}")
    else:
        log(f"offline data: reused all {reused} stored teacher completions in {folder}")
    return {"generated": len(todo), "reused": reused, "tokens": tokens}


class OfflineData:
    """Stored teacher completions, served as (Rollout, TeacherScores) batches like the on-policy stages."""

    def __init__(self, folder: Path, tokenizer, *, temperature: float, max_prompt_tokens: int):
        self.rows = sorted(_read_rows(Path(folder) / DATA), key=lambda r: r["index"])
        if not self.rows:
            raise ConfigError(f"no offline data in {folder}")
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.max_prompt_tokens = max_prompt_tokens
        self.num_tokens = sum(len(r["completion_ids"]) for r in self.rows)

    def _finished(self, row: dict) -> bool:
        """Data stored before rows said so: a completion that ends on EOS finished."""
        ids = row["completion_ids"]
        return row.get("finished", bool(ids) and ids[-1] == self.tokenizer.eos_token_id)

    def batch(self, step: int, size: int, seed: int) -> tuple[Rollout, TeacherScores]:
        rng = np.random.default_rng([seed, 0x0FF1, step])
        rows = [self.rows[i] for i in rng.choice(len(self.rows), size=min(size, len(self.rows)), replace=False)]
        prompts = [Prompt(r["prompt"], r["source"], r.get("answer"), r.get("task")) for r in rows]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        T = max(len(r["completion_ids"]) for r in rows)
        B = len(rows)
        ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        lp = torch.zeros((B, T))
        k = len(rows[0]["topk_ids"][0]) if rows[0].get("topk_ids") else 0
        tk_ids = torch.zeros((B, T, k), dtype=torch.long) if k else None
        tk_lp = torch.full((B, T, k), float("-inf")) if k else None
        for i, r in enumerate(rows):
            n = len(r["completion_ids"])
            ids[i, :n] = torch.tensor(r["completion_ids"])
            mask[i, :n] = 1
            lp[i, :n] = torch.tensor(r["logprobs"])
            if k:
                tk_ids[i, :n] = torch.tensor(r["topk_ids"])
                tk_lp[i, :n] = torch.tensor(r["topk_logprobs"])
        rollout = Rollout(prompts=prompts, prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids,
                          completion_mask=mask, behaviour_logprobs=lp,
                          policy_version=torch.full((B,), TEACHER_WRITTEN, dtype=torch.long),
                          texts=[r["completion"] for r in rows], finished=torch.tensor([self._finished(r) for r in rows]),
                          temperature=self.temperature)
        # The teacher's logprob of its own token is its behaviour logprob: nothing to score again.
        scores = TeacherScores(token_logprobs=lp.clone(), scored_mask=mask.clone(), topk_ids=tk_ids, topk_logprobs=tk_lp)
        return rollout, scores
