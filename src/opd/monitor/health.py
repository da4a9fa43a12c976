"""The three health signals of a run, each green / yellow / red against thresholds from [monitor].

Freshness:      are rollouts from the current student? (policy lag, importance ratios, and the
                share of tokens a teacher-guided rollout took from the teacher)
Teacher access: does the teacher return logprobs for every token, fast and without failures, and
                is its feedback still meaningful (how many sequences have a broken prefix)?
Stability:      are KL, clipping and gradients under control?
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opd.config import MonitorConfig

LEVELS = ("green", "yellow", "red")


@dataclass
class Signal:
    name: str
    level: int  # 0 green, 1 yellow, 2 red
    items: list[tuple[str, float | None, int]]  # (label, value, level)

    @property
    def colour(self) -> str:
        return LEVELS[self.level]


def _above(value: float | None, limits: tuple[float, float]) -> int:
    if value is None:
        return 0
    if not math.isfinite(value):
        return 2  # NaN/inf (e.g. every mini-batch skipped) is never healthy
    return 2 if value > limits[1] else 1 if value > limits[0] else 0


def _below(value: float | None, limits: tuple[float, float]) -> int:
    if value is None:
        return 0
    if not math.isfinite(value):
        return 2
    return 2 if value < limits[1] else 1 if value < limits[0] else 0


def assess(m: dict, cfg: MonitorConfig) -> list[Signal]:
    g = m.get
    ratio_dev = None
    if g("freshness/ratio_max") is not None:
        ratio_dev = max(abs(g("freshness/ratio_max") - 1), abs(g("freshness/ratio_min", 1.0) - 1))
    fresh = [
        ("policy lag", g("freshness/policy_lag"), _above(g("freshness/policy_lag"), cfg.max_policy_lag)),
        ("max |ratio-1|", ratio_dev, _above(ratio_dev, cfg.ratio_dev)),
    ]
    if g("rollout/teacher_token_frac") is not None:
        fresh.append(("teacher tokens", g("rollout/teacher_token_frac"), 0))
    teacher = [
        ("coverage", g("teacher/coverage"), _below(g("teacher/coverage"), cfg.min_coverage)),
        ("failures", g("teacher/failures"), _above(g("teacher/failures"), cfg.max_failures)),
        ("tokens/s", g("teacher/tokens_per_s"), 0),
        ("broken", g("teacher/broken_frac"), _above(g("teacher/broken_frac"), cfg.max_broken_frac)),
        ("break pos", g("teacher/break_pos_mean"), 0),
        ("entropy", g("teacher/entropy"), 0),
    ]
    # A teacher server also reports request latency percentiles, retries and dropped sequences.
    for label, key in (("latency p50 s", "teacher/latency_p50_s"), ("latency p99 s", "teacher/latency_p99_s"),
                       ("retries", "teacher/retries"), ("dropped", "teacher/dropped")):
        if g(key) is not None:
            teacher.append((label, g(key), 0))
    stab = [
        ("reverse KL", g("opd/reverse_kl"), _above(g("opd/reverse_kl"), cfg.max_reverse_kl)),
        ("grad norm", g("stability/grad_norm"), _above(g("stability/grad_norm"), cfg.max_grad_norm)),
        ("clip frac", g("stability/clip_frac"), _above(g("stability/clip_frac"), cfg.max_clip_frac)),
        ("entropy", g("stability/entropy"), 0),
    ]
    if g("stability/kl_ref") is not None:
        stab.append(("KL to ref", g("stability/kl_ref"), 0))
    return [
        Signal("Freshness", max(i[2] for i in fresh), fresh),
        Signal("Teacher access", max(i[2] for i in teacher), teacher),
        Signal("Stability", max(i[2] for i in stab), stab),
    ]


def health_metrics(signals: list[Signal]) -> dict[str, int]:
    """Numeric levels for the logs (0 green, 1 yellow, 2 red)."""
    return {"health/" + s.name.lower().replace(" ", "_"): s.level for s in signals}
