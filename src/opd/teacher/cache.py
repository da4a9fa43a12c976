"""Teacher cache: an identical (teacher, token ids, temperature, top-k) sequence is scored once per run.

Wraps any teacher with `score(rollout, full)`. Rows already seen are filled from the cache; only
the others go to the teacher. Only complete answers are stored (a dropped sequence is asked again
next time), and full-distribution requests bypass the cache (V floats per token is too much to keep).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from opd.teacher.remote import sequence_ids
from opd.types import Rollout, TeacherScores


@dataclass
class _Entry:
    logprobs: torch.Tensor  # [n] over the completion tokens
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    reward: float | None


class CachingTeacher:
    def __init__(self, teacher, *, max_entries: int = 100_000):
        self.teacher = teacher
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self.hits = 0
        self.lookups = 0

    def __getattr__(self, name):  # batch_size, topk, ... of the wrapped teacher
        return getattr(self.teacher, name)

    def counters(self) -> dict[str, float]:
        """The wrapped teacher's run counts and the cache's: run counters are saved with every checkpoint, so the hit
        rate over the run (the loop's teacher/cache_hit_rate) goes on across a resume. The entries themselves are
        not saved (up to max_entries sequences with their top-k): a resumed run asks the teacher again for them."""
        inner = self.teacher.counters() if hasattr(self.teacher, "counters") else {}
        return {**inner, "teacher/cache_hits_total": float(self.hits), "teacher/cache_lookups_total": float(self.lookups)}

    def score(self, rollout: Rollout, *, full: bool = False) -> TeacherScores:
        if full:
            return self.teacher.score(rollout, full=True)
        keys = [(tuple(ids), p_len, rollout.temperature) for ids, p_len in sequence_ids(rollout)]
        hit_rows = [i for i, k in enumerate(keys) if k in self.entries]
        miss_rows = [i for i, k in enumerate(keys) if k not in self.entries]
        self.lookups += len(keys)
        self.hits += len(hit_rows)
        if miss_rows:
            fresh = self.teacher.score(rollout.select(miss_rows) if hit_rows else rollout)
        else:
            fresh = None
        out = _empty_like(rollout, fresh, self._template())
        if fresh is not None:
            for j, i in enumerate(miss_rows):
                _copy_row(out, i, fresh, j)
                # a whole answer: every token scored, or (a score-only teacher) a finite reward for the sequence
                by_reward = fresh.rewards is not None and bool(torch.isfinite(fresh.rewards[j]))
                if by_reward or bool((fresh.scored_mask[j] == rollout.completion_mask[i]).all()):
                    self._store(keys[i], fresh, j, rollout.completion_mask[i].bool())
            out.latency_s, out.failures = fresh.latency_s, fresh.failures
            out.metrics = dict(fresh.metrics)
        for i in hit_rows:
            self._fill(out, i, self.entries[keys[i]], rollout.completion_mask[i].bool())
            self.entries.move_to_end(keys[i])
        out.tokens_scored = fresh.tokens_scored if fresh is not None else 0  # cached rows cost the teacher nothing
        out.metrics["teacher/cache_hits"] = float(len(hit_rows))
        out.metrics["teacher/cache_hit_rate"] = self.hits / max(1, self.lookups)  # this process's; the loop: the run's
        return out

    def _template(self) -> _Entry | None:
        return next(iter(self.entries.values()), None)

    def _store(self, key: tuple, s: TeacherScores, j: int, cols: torch.Tensor) -> None:
        pick = lambda t: None if t is None else t[j, cols].clone()  # noqa: E731
        reward = None if s.rewards is None or not torch.isfinite(s.rewards[j]) else float(s.rewards[j])
        self.entries[key] = _Entry(pick(s.token_logprobs), pick(s.topk_ids), pick(s.topk_logprobs), pick(s.entropy),
                                   reward)
        if len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    @staticmethod
    def _fill(out: TeacherScores, i: int, e: _Entry, cols: torch.Tensor) -> None:
        out.token_logprobs[i, cols] = e.logprobs
        if e.reward is not None:
            out.rewards[i] = e.reward
        else:
            out.scored_mask[i, cols] = 1
        for name in ("topk_ids", "topk_logprobs", "entropy"):
            val = getattr(e, name)
            if val is not None and getattr(out, name) is not None:
                getattr(out, name)[i, cols] = val


def _empty_like(rollout: Rollout, fresh: TeacherScores | None, cached: _Entry | None) -> TeacherScores:
    """An unscored TeacherScores of the rollout's shape, with the optional fields this teacher returns
    (read from its fresh answer, or from any cached one when every row was a hit)."""
    B, T = rollout.completion_ids.shape
    if fresh is not None:
        k = 0 if fresh.topk_ids is None else fresh.topk_ids.shape[-1]
        has_topk, has_entropy, score_only = fresh.topk_ids is not None, fresh.entropy is not None, fresh.rewards is not None
    else:
        k = 0 if cached.topk_ids is None else cached.topk_ids.shape[-1]
        has_topk, has_entropy, score_only = cached.topk_ids is not None, cached.entropy is not None, cached.reward is not None
    return TeacherScores(
        token_logprobs=torch.zeros((B, T)),
        scored_mask=torch.zeros((B, T), dtype=rollout.completion_mask.dtype),
        topk_ids=torch.zeros((B, T, k), dtype=torch.long) if has_topk else None,
        topk_logprobs=torch.full((B, T, k), float("-inf")) if has_topk else None,
        entropy=torch.zeros((B, T)) if has_entropy else None,
        rewards=torch.full((B,), float("nan")) if score_only else None,
    )


def _copy_row(out: TeacherScores, i: int, s: TeacherScores, j: int) -> None:
    for name in ("token_logprobs", "scored_mask", "topk_ids", "topk_logprobs", "entropy", "rewards"):
        src, dst = getattr(s, name), getattr(out, name)
        if src is not None and dst is not None:
            dst[i] = src[j]
