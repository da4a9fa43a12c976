"""The demo's promise, checked on the real built-in default: distillation improves the student, and the
demo ends with on-policy vs offline on the same teacher-token budget."""

import json

import pytest

from opd.demo import run_demo
from opd.monitor import read_metrics


@pytest.mark.slow
def test_demo_improves_the_student_and_compares_with_offline(tmp_path):
    summary = run_demo(tmp_path, overrides=["monitor.live='off'"])
    rows = [r for r in read_metrics(tmp_path / "onpolicy" / "seed-0") if "eval/accuracy" in r]
    first, last = rows[0], rows[-1]
    assert last["eval/reverse_kl"] < first["eval/reverse_kl"]
    assert last["eval/accuracy"] > first["eval/accuracy"]
    assert summary["teacher_accuracy"] >= 0.85  # the built-in teacher scores ~0.92 at temperature 1
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["after"]["eval/accuracy"] == last["eval/accuracy"]
    offline = [r for r in read_metrics(tmp_path / "offline" / "seed-0") if "eval/accuracy" in r][-1]
    assert saved["offline"]["eval/accuracy"] == offline["eval/accuracy"]
    assert last["eval/accuracy"] > offline["eval/accuracy"]  # 0.93 vs 0.81 here: the gap the demo exists to show
    # matched budgets: the offline data holds as many teacher completions as on-policy scored
    assert abs(offline["budget/teacher_tokens"] - last["budget/teacher_tokens"]) < 0.2 * last["budget/teacher_tokens"]
    assert (tmp_path / "onpolicy" / "seed-0" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "report" / "report.md").is_file()
