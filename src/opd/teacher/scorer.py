"""The model side of `opd serve-teacher`: prompt logprobs (with top-k and rank) for many token-id
sequences in one forward pass, and plain generation.

Sequences are right-padded into one batch (a Llama model runs opd.llama's forward over it: rows that start at
position 0 need no attention mask); only the positions whose logprobs were asked for go
through the LM head, chunk by chunk, so batch x length x vocab logits never exist at once. Each
sequence may have its own temperature (log softmax(logits / T), the opd convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opd import llama
from opd.logprobs import lm_logits


@dataclass
class ScoreJob:
    ids: list[int]
    start: int  # first position whose logprob is returned (>= 1: position 0 has no context)
    topk: int = 0
    temperature: float = 1.0
    sample_next: bool = False  # also draw one token after the sequence (vLLM's max_tokens = 1) from the same pass

    @property
    def cost(self) -> int:
        return len(self.ids)


@dataclass
class ScoreResult:
    logprobs: list[float]  # for positions start .. len(ids) - 1
    ranks: list[int]  # 1 = the most likely token
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    next_token: int | None = None


@torch.no_grad()
def score_batch(model, jobs: list[ScoreJob], *, chunk_size: int = 1024, pad_id: int = 0) -> list[ScoreResult]:
    if bad := [j for j in jobs if not 1 <= j.start <= len(j.ids)]:  # refused before the forward pass, not after it
        # a start past the end would shift every later job's slice of the batch's answers onto the wrong positions
        raise ValueError(f"a scoring job starts at {bad[0].start}, outside its {len(bad[0].ids)} tokens")
    dev = next(model.parameters()).device
    width = max(len(j.ids) for j in jobs)
    input_ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(jobs), width), dtype=torch.long)
    for b, j in enumerate(jobs):
        input_ids[b, : len(j.ids)] = torch.tensor(j.ids)
        attention[b, : len(j.ids)] = 1
    if llama.unsupported_reason(model) is None:
        # Right-padded rows that start at position 0: opd's causal forward needs no mask for them.
        hidden = llama.final_norm(model, llama.causal_hidden(model, input_ids.to(dev)))
    else:
        hidden = model.base_model(input_ids=input_ids.to(dev), attention_mask=attention.to(dev), use_cache=False)
        hidden = hidden.last_hidden_state
    # The state at position p - 1 predicts token p.
    rows, cols, targets, temps = [], [], [], []
    for b, j in enumerate(jobs):
        n = len(j.ids) - j.start
        rows += [b] * n
        cols += range(j.start - 1, len(j.ids) - 1)
        targets += j.ids[j.start :]
        temps += [j.temperature] * n
    h = hidden[torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(cols, dtype=torch.long, device=dev)]
    targets_t = torch.tensor(targets, dtype=torch.long, device=dev)
    temps_t = torch.tensor(temps, dtype=torch.float32, device=dev)
    kmax = max(j.topk for j in jobs)
    lp_parts, rank_parts, tv_parts, ti_parts = [], [], [], []
    for s in range(0, h.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        logp = F.log_softmax(lm_logits(model, h[sl], 1.0) / temps_t[sl, None], dim=-1)
        lp = logp.gather(1, targets_t[sl, None]).squeeze(1)
        lp_parts.append(lp)
        rank_parts.append((logp > lp[:, None]).sum(-1) + 1)
        if kmax:
            v, i = logp.topk(kmax, dim=-1)
            tv_parts.append(v)
            ti_parts.append(i)
    next_tokens = _sample_next(model, hidden, jobs)
    lp_all = torch.cat(lp_parts).cpu().tolist() if lp_parts else []
    rank_all = torch.cat(rank_parts).cpu().tolist() if rank_parts else []
    tv_all = torch.cat(tv_parts).cpu().tolist() if tv_parts else []
    ti_all = torch.cat(ti_parts).cpu().tolist() if ti_parts else []
    out, at = [], 0
    for j in jobs:
        n = len(j.ids) - j.start
        sl = slice(at, at + n)
        out.append(ScoreResult(
            logprobs=lp_all[sl], ranks=rank_all[sl],
            topk_ids=[r[: j.topk] for r in ti_all[sl]] if j.topk else [[] for _ in range(n)],
            topk_logprobs=[r[: j.topk] for r in tv_all[sl]] if j.topk else [[] for _ in range(n)],
            next_token=next_tokens.get(len(out)),
        ))
        at += n
    return out


def _sample_next(model, hidden: torch.Tensor, jobs: list[ScoreJob]) -> dict[int, int]:
    want = [b for b, j in enumerate(jobs) if j.sample_next]
    if not want:
        return {}
    dev = hidden.device
    last = torch.tensor([len(jobs[b].ids) - 1 for b in want], device=dev)
    logits = lm_logits(model, hidden[torch.tensor(want, device=dev), last], 1.0)
    out = {}
    for row, b in enumerate(want):
        t = jobs[b].temperature
        out[b] = int(logits[row].argmax()) if t == 0 else int(torch.multinomial(F.softmax(logits[row] / t, -1), 1))
    return out


@dataclass
class GenerateJob:
    ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None = no logprobs; k >= 0 = sampled token's logprob and the top-k
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end a completion besides EOS (e.g. end of turn)

    @property
    def cost(self) -> int:
        return len(self.ids) + self.max_tokens


@dataclass
class GenerateResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # With logprobs: each sampled token's logprob under the distribution it was drawn from (logits / T, top-p
    # renormalised: the processed scores generate() sampled from), and that distribution's top-k.
    logprobs: list[float] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    policy_version: int | None = None  # the weights' version that wrote it (servers that load new weights)


@torch.no_grad()
def generate_one(model, tokenizer, job: GenerateJob) -> GenerateResult:
    """Sampling (greedy at temperature 0) with the model's own generate(); EOS is kept in token_ids."""
    dev = next(model.parameters()).device
    end_ids = [tokenizer.eos_token_id, *(t for t in job.stop_token_ids if t != tokenizer.eos_token_id)]
    gen_kwargs = dict(max_new_tokens=job.max_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=end_ids)
    if job.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=job.temperature, top_p=job.top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False)
    if job.stop:
        gen_kwargs.update(stop_strings=list(job.stop), tokenizer=tokenizer)
    want_logprobs = job.logprobs is not None
    with torch.random.fork_rng(devices=[]):
        if job.seed is not None:
            torch.manual_seed(job.seed)
        out = model.generate(torch.tensor([job.ids], device=dev), attention_mask=torch.ones((1, len(job.ids)),
                             dtype=torch.long, device=dev), output_scores=want_logprobs,
                             return_dict_in_generate=True, **gen_kwargs)
    new = out.sequences[0, len(job.ids):].tolist()
    stopped = bool(new) and (new[-1] in end_ids or len(new) < job.max_tokens)
    if job.stop and not stopped:
        text = tokenizer.decode(new)
        stopped = any(s in text for s in job.stop)
    result = GenerateResult(new, "stop" if stopped else "length")
    if want_logprobs and new:
        # generate() pads a finished sequence's later steps; its scores stop with its tokens.
        logp = F.log_softmax(torch.cat(out.scores[: len(new)]).float(), dim=-1)  # [len(new), V]
        result.logprobs = logp.gather(1, torch.tensor(new, device=logp.device)[:, None]).squeeze(1).tolist()
        if job.logprobs:
            v, i = logp.topk(job.logprobs, dim=-1)
            result.topk_ids, result.topk_logprobs = i.tolist(), v.tolist()
    elif want_logprobs:
        result.logprobs = []
    return result
