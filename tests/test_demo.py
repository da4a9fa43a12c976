"""The demo's promise, checked on the real built-in default: distillation improves the student."""

import json

import pytest

from opd.demo import run_demo
from opd.monitor import read_metrics


@pytest.mark.slow
def test_demo_improves_the_student(tmp_path):
    summary = run_demo(tmp_path, overrides=["monitor.live='off'"])
    rows = read_metrics(tmp_path)
    first, last = rows[0], rows[-1]
    assert last["eval/reverse_kl"] < first["eval/reverse_kl"]
    assert last["eval/accuracy"] > first["eval/accuracy"]
    assert summary["teacher_accuracy"] >= 0.95
    assert json.loads((tmp_path / "summary.json").read_text())["after"]["eval/accuracy"] == last["eval/accuracy"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
