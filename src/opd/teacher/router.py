"""Multi-teacher routing: each prompt source is scored by its own named teacher.

The rows of a rollout are grouped by the teacher of their prompt's source, each group is scored
by its teacher, and the answers are put back in row order. Metrics are reported per teacher
(`teacher/NAME/...`) next to the batch totals.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from opd.types import Rollout, TeacherScores


class TeacherRouter:
    def __init__(self, teachers: dict[str, object], source_teacher: dict[str, str], default: str):
        self.teachers = teachers
        self.source_teacher = source_teacher  # prompt source name -> teacher name
        self.default = default
        self.batch_size = min(getattr(t, "batch_size", 64) for t in teachers.values())

    def teacher_of(self, source: str) -> str:
        return self.source_teacher.get(source, self.default)

    def score(self, rollout: Rollout, *, full: bool = False) -> TeacherScores:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(rollout.prompts):
            groups[self.teacher_of(p.source)].append(i)
        if len(groups) == 1:  # the common case: no copying
            name = next(iter(groups))
            out = self.teachers[name].score(rollout, full=full)
            if len(self.teachers) > 1:
                out.metrics = {**out.metrics, **_per_teacher(name, out)}
            return out
        parts = {name: (rows, self.teachers[name].score(rollout.select(rows), full=full)) for name, rows in groups.items()}
        return merge(rollout, parts)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, t in self.teachers.items():
            if hasattr(t, "counters"):
                for k, v in t.counters().items():
                    out[k] = out.get(k, 0.0) + v
                    if len(self.teachers) > 1:
                        out[k.replace("teacher/", f"teacher/{name}/", 1)] = v
        return out


def _per_teacher(name: str, s: TeacherScores) -> dict[str, float]:
    out = {f"teacher/{name}/tokens": float(s.tokens_scored), f"teacher/{name}/latency_s": s.latency_s,
           f"teacher/{name}/failures": float(s.failures)}
    for k, v in s.metrics.items():
        out[k.replace("teacher/", f"teacher/{name}/", 1)] = v
    return out


def merge(rollout: Rollout, parts: dict[str, tuple[list[int], TeacherScores]]) -> TeacherScores:
    """Put each teacher's rows back in place. A field only some teachers give is filled where given; top-k lists
    of different lengths are padded to the longest with empty (-inf) entries (topk_kl, which compares bins, needs
    equal ones: the config refuses others there)."""
    from opd.feedback.broken import teacher_entropy  # the estimate the feedback stage would make of each part

    B, T = rollout.completion_ids.shape
    answers = [s for _, s in parts.values()]
    k = max((s.topk_ids.shape[-1] for s in answers if s.topk_ids is not None), default=0)
    entropies = {name: teacher_entropy(s) for name, (_, s) in parts.items()}
    full_v = next((s.full_logprobs.shape[-1] for s in answers if s.full_logprobs is not None), None)
    out = TeacherScores(
        token_logprobs=torch.zeros((B, T)),
        scored_mask=torch.zeros((B, T), dtype=rollout.completion_mask.dtype),
        topk_ids=torch.zeros((B, T, k), dtype=torch.long) if k else None,
        topk_logprobs=torch.full((B, T, k), float("-inf")) if k else None,
        full_logprobs=torch.zeros((B, T, full_v)) if full_v else None,
        # each part's own or estimated entropy (a teacher that returns none had read 0: no break, weight 1); NaN
        # where a part has no way to it, which the feedback stage refuses where entropy is needed
        entropy=torch.full((B, T), float("nan")) if any(e is not None for e in entropies.values()) else None,
        rewards=torch.full((B,), float("nan")) if any(s.rewards is not None for s in answers) else None,
        # a cross-tokenizer teacher hands over A_t itself; the others' rows get theirs from token logprobs
        advantages=torch.zeros((B, T)) if any(s.advantages is not None for s in answers) else None,
    )
    metrics: dict[str, float] = {}
    for name, (rows, s) in parts.items():
        idx = torch.as_tensor(rows, dtype=torch.long)
        for field in ("token_logprobs", "scored_mask", "full_logprobs", "rewards"):
            src, dst = getattr(s, field), getattr(out, field)
            if src is not None and dst is not None:
                dst[idx] = src.to(dst.dtype)
        if s.topk_ids is not None:
            width = s.topk_ids.shape[-1]
            out.topk_ids[idx, :, :width] = s.topk_ids
            out.topk_logprobs[idx, :, :width] = s.topk_logprobs.to(out.topk_logprobs.dtype)
        if entropies[name] is not None:
            out.entropy[idx] = entropies[name].to(out.entropy.dtype)
        if out.advantages is not None:  # A_t against the student's own logprob, as compute_feedback's
            out.advantages[idx] = (s.advantages if s.advantages is not None
                                   else s.token_logprobs - rollout.policy_logprobs[idx]).to(torch.float32)
        out.latency_s = max(out.latency_s, s.latency_s)
        out.failures += s.failures
        out.tokens_scored += s.tokens_scored
        for key, v in s.metrics.items():  # batch totals: counts add up, rates and percentiles are per teacher
            if not any(w in key for w in ("latency", "rate")):
                metrics[key] = metrics.get(key, 0.0) + v
        metrics.update(_per_teacher(name, s))
    out.metrics = metrics
    return out
