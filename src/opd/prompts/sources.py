"""Stage 1: prompt sources and their weighted mixture, deterministic by seed.

A source is either a built-in task (an endless generator with a verifier) or a finite list of
records (JSONL, or a local Hugging Face `datasets` folder/file). Each source holds out
`eval_size` prompts that training never sees. The stream's position (draws per source) is
part of every checkpoint, so a resumed run continues with exactly the prompts it would have seen.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from opd.config import ConfigError, PromptsConfig, SourceConfig
from opd.prompts.tasks import get_task
from opd.types import Prompt

ChatRenderer = Callable[[list[dict]], str]
TokenCounter = Callable[[str], int]


def _no_chat(messages: list[dict]) -> str:
    raise ConfigError("a chat record ({'messages': [...]}) needs a student tokenizer with a chat template")


class TaskSource:
    """Endless prompts from a built-in task; eval prompts are excluded from training draws."""

    def __init__(self, cfg: SourceConfig, seed: int, eval_size: int):
        try:
            self.task = get_task(cfg.task)
        except KeyError as e:
            raise ConfigError(f"prompts.sources: {e.args[0]}") from None
        self.name = cfg.name or cfg.task
        rng = np.random.default_rng([seed, 0xE7A1])
        self.eval: list[Prompt] = []
        seen: set[str] = set()
        while len(self.eval) < eval_size:
            p = self._named(self.task.sample(rng))
            if p.text not in seen:
                seen.add(p.text)
                self.eval.append(p)
        self.held_out = seen

    def exclude(self, held_out: set[str]) -> None:
        """Never draws a prompt any source holds out (a file repeating this task's prompts holds some out)."""
        self.held_out = held_out

    def _named(self, p: Prompt) -> Prompt:
        return Prompt(text=p.text, source=self.name, answer=p.answer, task=p.task)

    def draw(self, rng: np.random.Generator, n_drawn: int) -> Prompt:
        while True:
            p = self._named(self.task.sample(rng))
            if p.text not in self.held_out:
                return p

    def fingerprint(self) -> str:
        return f"builtin:{self.task.name}"


class BadRecord(Exception):
    """One record that cannot become a prompt; `where` is file:line (JSONL) or file:record N."""


class RecordSource:
    """A finite list of prompts; training walks a fresh seeded permutation each epoch.

    Bad records (malformed JSON, a missing or mistyped field, an empty prompt) stop the run with
    their location, or are skipped and counted with prompts.on_bad_record = "skip". Prompts longer
    than prompts.max_prompt_tokens are truncated from the left or skipped (prompts.on_long_prompt).
    """

    def __init__(self, cfg: SourceConfig, prompts_cfg: PromptsConfig, seed: int, render_chat: ChatRenderer,
                 count_tokens: TokenCounter | None = None):
        self.name = cfg.name or Path(cfg.path).stem
        self.counts = {"skipped_records": 0, "truncated": 0, "skipped_long": 0, "duplicates": 0}
        prompts: list[Prompt] = []
        for where, rec in _read_records(cfg):
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                p = _to_prompt(rec, cfg, self.name, render_chat)
            except BadRecord as bad:
                if prompts_cfg.on_bad_record == "fail":
                    raise ConfigError(f"{where}: {bad} (fix the record, or set prompts.on_bad_record = 'skip')") from None
                self.counts["skipped_records"] += 1
                continue
            if count_tokens is not None and count_tokens(p.text) > prompts_cfg.max_prompt_tokens:
                if prompts_cfg.on_long_prompt == "skip":
                    self.counts["skipped_long"] += 1
                    continue
                self.counts["truncated"] += 1  # the sampler keeps the last max_prompt_tokens tokens
            prompts.append(p)
        # One prompt per distinct text: a duplicated record must not land in both the eval and the train split.
        unique: dict[str, Prompt] = {}
        for p in prompts:
            unique.setdefault(p.text, p)
        self.counts["duplicates"] = len(prompts) - len(unique)
        prompts = list(unique.values())
        # what the split was drawn from: a resume checks it, since changed data reshuffles the split
        self._fingerprint = hashlib.sha256("\0".join(p.text for p in prompts).encode()).hexdigest()[:16]
        if len(prompts) < 2:
            raise ConfigError(f"prompts source {cfg.path}: needs at least 2 usable prompts, found {len(prompts)}")
        order = np.random.default_rng([seed, 0x5EED]).permutation(len(prompts))
        n_eval = min(prompts_cfg.eval_size, len(prompts) // 2)  # never starve training of prompts
        self.eval = [prompts[i] for i in order[:n_eval]]
        self.train = [prompts[i] for i in order[n_eval:]]
        self.seed = seed
        self.where = cfg.path

    def exclude(self, held_out: set[str]) -> None:
        """Leaves out training prompts another source holds out (sources that share prompts)."""
        self.train = [p for p in self.train if p.text not in held_out]
        if not self.train:
            raise ConfigError(f"prompts source {self.where}: every training prompt is held out by another source; "
                              "give it other prompts, or lower prompts.eval_size")

    def fingerprint(self) -> str:
        return f"{len(self.train) + len(self.eval)}:{self._fingerprint}"

    def draw(self, rng: np.random.Generator, n_drawn: int) -> Prompt:
        epoch, pos = divmod(n_drawn, len(self.train))
        perm = np.random.default_rng([self.seed, 0xE90C, epoch]).permutation(len(self.train))
        return self.train[perm[pos]]


def _read_records(cfg: SourceConfig):
    """Yields (location, record dict or BadRecord)."""
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"prompts source not found: {path} (check prompts.sources[].path)")
    if cfg.kind == "jsonl":
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; a `jsonl` source needs a .jsonl file (use kind = 'hf' for a datasets folder)")
        with path.open("rb") as f:  # JSON Lines is UTF-8, whatever the locale; a line that is not is a bad record
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # an editor's BOM is not the record's
                except UnicodeDecodeError as e:
                    yield where, BadRecord(f"not UTF-8 (byte {e.start + 1}: {raw[e.start:e.start + 1]!r}); "
                                           "save the file as UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRecord(f"not valid JSON ({e.msg})")
                    continue
                yield where, rec if isinstance(rec, dict) else BadRecord(f"expected a JSON object, got {type(rec).__name__}")
        return
    import datasets  # local folders or files only: nothing is downloaded

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise ConfigError(f"{path}: no split {cfg.split!r}; splits: {', '.join(ds)}")
                ds = ds[cfg.split]
        else:
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
            if fmt is None:
                raise ConfigError(f"{path}: unsupported data file type; use .jsonl, .json, .parquet or .csv")
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        records = iter(ds)
        i = 0
        while True:
            try:  # an Arrow-backed dataset may find unreadable input (e.g. a non-UTF-8 file) only while iterated
                r = next(records)
            except StopIteration:
                return
            i += 1
            yield f"{path}: record {i}", dict(r)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        raise ConfigError(f"{path}: cannot be read as a dataset ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _to_prompt(rec: dict, cfg: SourceConfig, name: str, render_chat: ChatRenderer) -> Prompt:
    field = cfg.field or ("messages" if "messages" in rec and "prompt" not in rec else "prompt")
    if field not in rec:
        raise BadRecord(f"no `{field}` field (set prompts.sources[].field to the field that holds the prompt)")
    value = rec[field]
    messages = None
    if isinstance(value, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            raise BadRecord(f"`{field}` must be a list of {{'role': ..., 'content': ...}} messages")
        if not any(isinstance(m["content"], str) and m["content"].strip() for m in value):
            raise BadRecord("empty prompt (no message has any content)")
        try:
            text = render_chat(value)
        except ConfigError:
            raise
        except Exception as e:  # the tokenizer's chat template refuses it (jinja2 raise_exception, e.g. roles order)
            raise BadRecord(f"the student's chat template refuses these messages: {str(e).splitlines()[0][:200]}") from None
        messages = tuple({"role": m["role"], "content": m["content"]} for m in value)
    elif isinstance(value, str):
        text = value
    else:
        raise BadRecord(f"`{field}` must be a string or a list of chat messages, got {type(value).__name__}")
    if not text.strip():
        raise BadRecord("empty prompt")
    answer = rec.get(cfg.answer_field)
    return Prompt(text=text, source=name, answer=None if answer is None else str(answer), messages=messages)


class PromptStream:
    """The weighted mixture of sources. batch(step) depends only on (seed, step, draws so far)."""

    def __init__(self, cfg: PromptsConfig, seed: int, render_chat: ChatRenderer = _no_chat,
                 count_tokens: TokenCounter | None = None):
        self.cfg = cfg
        self.seed = seed
        self.sources: list[TaskSource | RecordSource] = []
        for sc in cfg.sources:
            if sc.kind == "builtin":
                self.sources.append(TaskSource(sc, seed, cfg.eval_size))
            else:
                self.sources.append(RecordSource(sc, cfg, seed, render_chat, count_tokens))
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"prompts.sources: names must differ, got {names} (set prompts.sources[].name)")
        # A prompt one source holds out is held out everywhere: two sources that share prompts (or a file that
        # repeats a built-in task's) must not train on another's evaluation prompts.
        held_out = {p.text for s in self.sources for p in s.eval}
        for src in self.sources:
            src.exclude(held_out)
        w = np.array([sc.weight for sc in cfg.sources], dtype=np.float64)
        self.weights = w / w.sum()
        self.draws = {s.name: 0 for s in self.sources}

    def batch(self, step: int, size: int | None = None) -> list[Prompt]:
        size = size or self.cfg.batch_size
        rng = np.random.default_rng([self.seed, 0xBA7C, step])
        choice = rng.choice(len(self.sources), size=size, p=self.weights)
        out = []
        for j in choice:
            src = self.sources[int(j)]
            out.append(src.draw(rng, self.draws[src.name]))
            self.draws[src.name] += 1
        return out

    def extra_prompts(self, n: int, key: int) -> list[Prompt]:
        """Training-pool prompts for side phases (the warm start) that leave the stream's position alone."""
        rng = np.random.default_rng([self.seed, 0x3A17, key])
        choice = rng.choice(len(self.sources), size=n, p=self.weights)
        drawn = [0] * len(self.sources)  # each source walks its own epochs, as batch() does
        out = []
        for j in choice:
            out.append(self.sources[int(j)].draw(rng, drawn[j]))
            drawn[j] += 1
        return out

    def batch_sources(self, step: int, size: int | None = None) -> list[str]:
        """The source of each prompt batch(step) draws: it depends on the step alone, not on the draws so far."""
        rng = np.random.default_rng([self.seed, 0xBA7C, step])
        choice = rng.choice(len(self.sources), size=size or self.cfg.batch_size, p=self.weights)
        return [self.sources[int(j)].name for j in choice]

    def rewind(self, steps: list[int]) -> None:
        """Undoes the draws of these steps' batches, so that they are drawn again (batches made ahead and dropped)."""
        for step in steps:
            for name in self.batch_sources(step):
                self.draws[name] -= 1

    def eval_prompts(self, size: int) -> list[Prompt]:
        """Up to `size` held-out prompts, split across sources by weight (at least one each while size allows);
        a source with fewer held-out prompts than its share leaves the rest to the others."""
        room = [len(src.eval) for src in self.sources]
        share = [0] * len(self.sources)
        for j in sorted(range(len(self.sources)), key=lambda j: -self.weights[j])[:size]:
            share[j] = min(1, room[j])
        while sum(share) < size:  # largest deficit first: the weights' split, as far as each source's room allows
            open_ = [j for j in range(len(share)) if share[j] < room[j]]
            if not open_:
                break
            j = max(open_, key=lambda j: (size * self.weights[j] - share[j], -j))
            share[j] += 1
        return [p for src, n in zip(self.sources, share) for p in src.eval[:n]]

    def load_counts(self) -> dict[str, int]:
        """Records skipped, truncated or merged as duplicates while loading, summed over sources (prompts/* metrics)."""
        out = {"skipped_records": 0, "truncated": 0, "skipped_long": 0, "duplicates": 0}
        for src in self.sources:
            for k, v in getattr(src, "counts", {}).items():
                out[k] += v
        return out

    def state_dict(self) -> dict:
        return {"draws": dict(self.draws), "eval_size": self.cfg.eval_size,
                "fingerprints": {s.name: s.fingerprint() for s in self.sources}}

    def load_state_dict(self, state: dict) -> None:
        """Restores the position; refuses when the held-out split would differ from the checkpoint's (changed data or
        prompts.eval_size): prompts already trained on would be evaluated, and held-out ones trained on."""
        then = state.get("fingerprints")  # absent in checkpoints written before the check
        if then is not None:
            now = {s.name: s.fingerprint() for s in self.sources}
            changed = [n for n in now if n in then and then[n] != now[n]]
            if state.get("eval_size", self.cfg.eval_size) != self.cfg.eval_size:
                changed.append(f"prompts.eval_size ({state['eval_size']} then, {self.cfg.eval_size} now)")
            if changed:
                raise ConfigError(
                    f"the prompts changed since the checkpoint: {', '.join(changed)}. The held-out split is drawn from "
                    "the data, so a resume would evaluate on prompts it trained on; restore the data and settings, or "
                    "start a new run")
        self.draws.update(state["draws"])


def chat_renderer(tokenizer):
    """Chat records ({'messages': [...]}) rendered with the student tokenizer's chat template."""
    def render(messages: list[dict]) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "a chat record ({'messages': [...]}) needs a tokenizer with a chat template, and the student's has none; "
                "give plain {'prompt': '...'} records instead"
            )
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return render


def prompt_stream(cfg, tokenizer) -> PromptStream:
    """A run's prompt stream (cfg: opd.config.Config): chat records in the student's template, prompt lengths in its
    tokens. Training, `opd eval` and `opd compare`'s report build it the same way, so they hold out the same prompts."""
    from opd.rollout.sampler import prompt_token_ids  # as the sampler tokenises: no second BOS after a template's own

    return PromptStream(cfg.prompts, cfg.seed, chat_renderer(tokenizer),
                        count_tokens=lambda text: len(prompt_token_ids(tokenizer, text)))
