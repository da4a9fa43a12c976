"""Health signals: green / yellow / red at the threshold edges, for every thresholded quantity."""

from __future__ import annotations

import pytest

from opd.config import MonitorConfig
from opd.monitor import Signal, assess, health_metrics
from opd.monitor.health import LEVELS

GREEN, YELLOW, RED = 0, 1, 2
# Thresholds exactly representable in binary, so "at the limit" really is at the limit.
CFG = MonitorConfig(
    max_policy_lag=(1.0, 4.0),
    ratio_dev=(0.25, 1.0),
    min_coverage=(0.75, 0.5),
    max_failures=(1, 10),
    max_grad_norm=(10.0, 100.0),
    max_reverse_kl=(2.0, 5.0),
    max_clip_frac=(0.25, 0.5),
    max_broken_frac=(0.5, 0.9),
)


def by_name(signals: list[Signal]) -> dict[str, Signal]:
    return {s.name: s for s in signals}


def item(signal: Signal, label: str) -> tuple[str, float | None, int]:
    return next(i for i in signal.items if i[0] == label)


# (row, signal, item label, expected level): for "above" limits a value AT a limit is still the lower level;
# for coverage (lower is worse) a value AT a limit is still the better level.
CASES = [
    # Freshness: policy lag
    ({"freshness/policy_lag": 0.0}, "Freshness", "policy lag", GREEN),
    ({"freshness/policy_lag": 1.0}, "Freshness", "policy lag", GREEN),
    ({"freshness/policy_lag": 1.001}, "Freshness", "policy lag", YELLOW),
    ({"freshness/policy_lag": 4.0}, "Freshness", "policy lag", YELLOW),
    ({"freshness/policy_lag": 4.001}, "Freshness", "policy lag", RED),
    # Freshness: max |ratio - 1| from both ends
    ({"freshness/ratio_max": 1.25, "freshness/ratio_min": 0.75}, "Freshness", "max |ratio-1|", GREEN),
    ({"freshness/ratio_max": 1.375, "freshness/ratio_min": 1.0}, "Freshness", "max |ratio-1|", YELLOW),
    ({"freshness/ratio_max": 1.0, "freshness/ratio_min": 0.625}, "Freshness", "max |ratio-1|", YELLOW),
    ({"freshness/ratio_max": 2.0, "freshness/ratio_min": 0.0}, "Freshness", "max |ratio-1|", YELLOW),
    ({"freshness/ratio_max": 2.25, "freshness/ratio_min": 1.0}, "Freshness", "max |ratio-1|", RED),
    ({"freshness/ratio_max": 1.25}, "Freshness", "max |ratio-1|", GREEN),  # ratio_min missing = 1
    ({"freshness/ratio_max": 0.5}, "Freshness", "max |ratio-1|", YELLOW),
    # Teacher access: coverage, lower is worse
    ({"teacher/coverage": 1.0}, "Teacher access", "coverage", GREEN),
    ({"teacher/coverage": 0.75}, "Teacher access", "coverage", GREEN),
    ({"teacher/coverage": 0.749}, "Teacher access", "coverage", YELLOW),
    ({"teacher/coverage": 0.5}, "Teacher access", "coverage", YELLOW),
    ({"teacher/coverage": 0.499}, "Teacher access", "coverage", RED),
    ({"teacher/coverage": 0.0}, "Teacher access", "coverage", RED),
    # Teacher access: failures
    ({"teacher/failures": 0}, "Teacher access", "failures", GREEN),
    ({"teacher/failures": 1}, "Teacher access", "failures", GREEN),
    ({"teacher/failures": 2}, "Teacher access", "failures", YELLOW),
    ({"teacher/failures": 10}, "Teacher access", "failures", YELLOW),
    ({"teacher/failures": 11}, "Teacher access", "failures", RED),
    # Stability: grad norm
    ({"stability/grad_norm": 10.0}, "Stability", "grad norm", GREEN),
    ({"stability/grad_norm": 10.5}, "Stability", "grad norm", YELLOW),
    ({"stability/grad_norm": 100.0}, "Stability", "grad norm", YELLOW),
    ({"stability/grad_norm": 100.5}, "Stability", "grad norm", RED),
    ({"stability/grad_norm": float("inf")}, "Stability", "grad norm", RED),
    # Stability: reverse KL
    ({"opd/reverse_kl": 2.0}, "Stability", "reverse KL", GREEN),
    ({"opd/reverse_kl": 2.01}, "Stability", "reverse KL", YELLOW),
    ({"opd/reverse_kl": 5.0}, "Stability", "reverse KL", YELLOW),
    ({"opd/reverse_kl": 5.01}, "Stability", "reverse KL", RED),
    # Stability: clip fraction
    ({"stability/clip_frac": 0.25}, "Stability", "clip frac", GREEN),
    ({"stability/clip_frac": 0.26}, "Stability", "clip frac", YELLOW),
    ({"stability/clip_frac": 0.5}, "Stability", "clip frac", YELLOW),
    ({"stability/clip_frac": 0.51}, "Stability", "clip frac", RED),
    # Teacher access: fraction of sequences with a broken prefix
    ({"teacher/broken_frac": 0.5}, "Teacher access", "broken", GREEN),
    ({"teacher/broken_frac": 0.51}, "Teacher access", "broken", YELLOW),
    ({"teacher/broken_frac": 0.9}, "Teacher access", "broken", YELLOW),
    ({"teacher/broken_frac": 0.91}, "Teacher access", "broken", RED),
]


@pytest.mark.parametrize("row, signal, label, level", CASES)
def test_threshold_edges(row, signal, label, level):
    signals = by_name(assess({"step": 1, **row}, CFG))
    assert item(signals[signal], label)[2] == level
    assert signals[signal].level == level  # the only measured item decides the signal
    for other, s in signals.items():
        if other != signal:
            assert s.level == GREEN


def test_default_thresholds_edges():
    cfg = MonitorConfig()
    s = by_name(assess({"teacher/coverage": 0.99, "stability/grad_norm": 10.0}, cfg))
    assert s["Teacher access"].level == GREEN and s["Stability"].level == GREEN
    s = by_name(assess({"teacher/coverage": 0.95, "stability/grad_norm": 101.0}, cfg))
    assert s["Teacher access"].level == YELLOW and s["Stability"].level == RED
    s = by_name(assess({"teacher/coverage": 0.89, "freshness/policy_lag": 2.0}, cfg))
    assert s["Teacher access"].level == RED and s["Freshness"].level == YELLOW


def test_signal_level_is_the_worst_item():
    row = {"opd/reverse_kl": 1.0, "stability/grad_norm": 50.0, "stability/clip_frac": 0.9, "stability/entropy": 3.0}
    stab = by_name(assess(row, CFG))["Stability"]
    assert [i[2] for i in stab.items if i[0] in ("reverse KL", "grad norm", "clip frac")] == [GREEN, YELLOW, RED]
    assert stab.level == RED and stab.colour == "red"
    row["stability/clip_frac"] = 0.0
    assert by_name(assess(row, CFG))["Stability"].colour == "yellow"


def test_missing_values_are_green_and_shown_as_none():
    signals = assess({"step": 3}, CFG)
    assert [s.name for s in signals] == ["Freshness", "Teacher access", "Stability"]
    for s in signals:
        assert s.level == GREEN and s.colour == "green"
        assert all(value is None and level == GREEN for _, value, level in s.items)


def test_informational_items_never_colour_a_signal():
    row = {"teacher/tokens_per_s": 1e-9, "stability/entropy": 1e9, "stability/kl_ref": 1e9}
    signals = by_name(assess(row, CFG))
    assert signals["Teacher access"].level == GREEN and signals["Stability"].level == GREEN
    assert item(signals["Stability"], "KL to ref") == ("KL to ref", 1e9, GREEN)
    assert item(signals["Teacher access"], "tokens/s")[1] == 1e-9


def test_kl_to_ref_only_when_present():
    labels = [i[0] for i in by_name(assess({}, CFG))["Stability"].items]
    assert "KL to ref" not in labels
    labels = [i[0] for i in by_name(assess({"stability/kl_ref": 0.1}, CFG))["Stability"].items]
    assert "KL to ref" in labels


def test_items_carry_the_values():
    row = {"freshness/policy_lag": 0.5, "freshness/ratio_max": 1.5, "freshness/ratio_min": 0.875, "teacher/failures": 3}
    s = by_name(assess(row, CFG))
    assert item(s["Freshness"], "policy lag")[1] == 0.5
    assert item(s["Freshness"], "max |ratio-1|")[1] == 0.5
    assert item(s["Teacher access"], "failures")[1] == 3


def test_health_metrics_keys_and_levels():
    signals = assess({"freshness/policy_lag": 2.0, "teacher/coverage": 0.1}, CFG)
    assert health_metrics(signals) == {"health/freshness": YELLOW, "health/teacher_access": RED, "health/stability": GREEN}
    assert health_metrics([]) == {}


def test_levels_are_colours():
    assert LEVELS == ("green", "yellow", "red")
    assert [Signal("x", lvl, []).colour for lvl in (0, 1, 2)] == ["green", "yellow", "red"]


def test_teacher_server_latency_and_drops_join_the_teacher_access_signal():
    labels = [i[0] for i in by_name(assess({"teacher/coverage": 1.0}, CFG))["Teacher access"].items]
    assert "latency p50 s" not in labels  # a local teacher has no request latency
    row = {"teacher/latency_p50_s": 0.2, "teacher/latency_p99_s": 3.5, "teacher/retries": 4, "teacher/dropped": 1,
           "teacher/coverage": 0.875}
    access = by_name(assess(row, CFG))["Teacher access"]
    assert item(access, "latency p99 s") == ("latency p99 s", 3.5, GREEN)
    assert item(access, "dropped")[1] == 1 and item(access, "retries")[1] == 4
    assert access.level == GREEN  # the dropped sequence already counts through coverage


def test_teacher_tokens_of_guided_rollouts_show_in_freshness_without_colouring_it():
    fresh = by_name(assess({"rollout/teacher_token_frac": 0.4}, CFG))["Freshness"]
    assert item(fresh, "teacher tokens") == ("teacher tokens", 0.4, GREEN) and fresh.level == GREEN
    assert "teacher tokens" not in [i[0] for i in by_name(assess({}, CFG))["Freshness"].items]
    access = by_name(assess({"teacher/break_pos_mean": 17.0, "teacher/entropy": 3.0}, CFG))["Teacher access"]
    assert item(access, "break pos")[1] == 17.0 and item(access, "entropy")[1] == 3.0 and access.level == GREEN
