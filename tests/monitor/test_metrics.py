"""Metrics sinks (metrics.jsonl, TensorBoard) and the plain-line run display."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from rich.console import Console

from opd.config import MonitorConfig
from opd.monitor import MetricsLog, RunDisplay, read_metrics


def lines(run_dir) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def tb_scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------------------------------------------- metrics.jsonl
def test_one_json_line_per_write_with_nan_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 0, "eval/accuracy": 0.25})
    log.write({"step": 1, "loss": float("nan"), "kl": float("inf"), "neg": float("-inf"), "ok": 1.5, "name": "x"})
    # flushed per write: readable before close
    assert len(lines(tmp_path)) == 2
    log.write({"step": 2, "np": np.float32(0.5), "np_nan": np.float32("nan"), "t": torch.tensor(3.0), "i": np.int64(4)})
    log.close()
    raw = lines(tmp_path)
    assert len(raw) == 3
    assert all("NaN" not in ln and "Infinity" not in ln for ln in raw)
    rows = [json.loads(ln) for ln in raw]
    assert rows[0] == {"step": 0, "eval/accuracy": 0.25}
    assert rows[1] == {"step": 1, "loss": None, "kl": None, "neg": None, "ok": 1.5, "name": "x"}
    assert rows[2] == {"step": 2, "np": 0.5, "np_nan": None, "t": 3.0, "i": 4}
    assert read_metrics(tmp_path) == rows
    assert not (tmp_path / "tensorboard").exists()


def test_a_fresh_run_starts_a_fresh_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "old": 1}\n{"step": 1, "old": 1}\n')
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 0, "new": 1})
    log.close()
    assert read_metrics(tmp_path) == [{"step": 0, "new": 1}]


def test_a_fresh_start_drops_earlier_tensorboard_events_too(tmp_path):
    # A resume that finds no intact checkpoint starts at step 0 with a fresh metrics.jsonl; TensorBoard kept the
    # earlier start's events, showing step 0 twice.
    log = MetricsLog(tmp_path)
    for step in range(3):
        log.write({"step": step, "loss": float(step)})
    log.close()
    time.sleep(1.1)  # event files are named by the second
    log = MetricsLog(tmp_path)
    log.write({"step": 0, "loss": 10.0})
    log.close()
    assert tb_scalars(tmp_path, "loss") == [(0, 10.0)]


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(6):
        log.write({"step": step, "loss": float(step)})
    log.close()
    log = MetricsLog(tmp_path, tensorboard=False, resume_after_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    log.write({"step": 4, "loss": 40.0})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3]["loss"] == 3.0 and rows[4]["loss"] == 40.0


def test_resume_without_a_file_and_after_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False, resume_after_step=5)  # nothing to keep
    log.close()
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n\n{"step": 2, "lo')  # crash mid-write
    log = MetricsLog(tmp_path, tensorboard=False, resume_after_step=1)
    log.close()
    assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]


# ---------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "update/loss": 0.5, "eval/accuracy": float("nan"), "name": "text"})
    log.write({"step": 2, "update/loss": 0.25, "eval/accuracy": 0.75})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert tb_scalars(tmp_path, "update/loss") == [(1, 0.5), (2, 0.25)]
    assert tb_scalars(tmp_path, "eval/accuracy") == [(2, 0.75)]  # NaN is not plotted
    assert tb_scalars(tmp_path, "step") == [] and tb_scalars(tmp_path, "name") == []


def test_tensorboard_resume_keeps_the_checkpoint_step(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(1, 5):
        log.write({"step": step, "loss": float(step)})
    log.close()
    first = int(time.time())
    while int(time.time()) == first:  # event files sort by their creation second
        time.sleep(0.05)
    log = MetricsLog(tmp_path, tensorboard=True, resume_after_step=2)
    log.write({"step": 3, "loss": 30.0})
    log.close()
    assert tb_scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ------------------------------------------------------------------------------------- display
def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def step_row(step: int, **extra) -> dict:
    return {"step": step, "rollout/tokens": 100, "opd/reverse_kl": 1.5, "stability/grad_norm": 250.0,
            "teacher/coverage": 1.0, "freshness/policy_lag": 0.0, **extra}


def test_display_off_prints_lines_every_log_every_steps():
    con, buf = console()
    cfg = MonitorConfig(live="off", log_every=5)
    with RunDisplay(cfg, total_steps=12, console=con) as display:
        display.update({"step": 0, "eval/accuracy": 0.125, "eval/reverse_kl": 3.0})  # no rollout: always shown
        for step in range(1, 13):
            display.update(step_row(step, **({"eval/accuracy": 0.5} if step == 12 else {})))
    out = buf.getvalue().splitlines()
    assert [ln.split(" |")[0] for ln in out] == ["step 0/12", "step 5/12", "step 10/12", "step 12/12"]
    assert "eval: accuracy=0.125 reverse_kl=3" in out[0]
    line = out[1]
    assert "Freshness: policy lag=0" in line
    assert "Teacher access: coverage=1" in line
    assert "Stability (red): reverse KL=1.5 grad norm=250" in line  # the level in words: no colour in a log file
    assert "eval:" not in line
    assert "eval: accuracy=0.5" in out[3]
    assert "[" not in buf.getvalue()  # markup rendered, not printed
    assert display.last_eval == {"eval/accuracy": 0.5}
    assert [s.level for s in display.signals] == [0, 0, 2]


def test_display_auto_on_a_non_terminal_prints_lines():
    con, buf = console()
    with RunDisplay(MonitorConfig(live="auto", log_every=1), total_steps=2, console=con) as display:
        assert display._live is None
        display.update(step_row(1, **{"stability/grad_norm": 12345.0}))
    assert buf.getvalue().startswith("step 1/2 | ")
    assert "grad norm=12,345" in buf.getvalue()


def test_display_on_renders_a_panel_instead_of_lines():
    con, buf = console()
    with RunDisplay(MonitorConfig(live="on", log_every=1), total_steps=3, start_step=1, console=con) as display:
        display.update(step_row(2, **{"eval/accuracy": 0.5}))
    out = buf.getvalue()
    assert "on-policy distillation" in out and "Stability" in out and "accuracy 0.5" in out
    assert "step 2/3" not in out


@pytest.mark.parametrize("value, shown", [(None, "-"), (0.123456, "0.123"), (1234.5, "1,234"), (-2.0, "-2"), (1e-5, "1e-05")])
def test_number_format(value, shown):
    from opd.monitor.display import _fmt

    assert _fmt(value) == shown


def test_display_auto_on_a_dumb_terminal_prints_lines_and_step_0_names_no_empty_signal():
    # TERM=dumb is a terminal rich never redraws: the live panel showed nothing until the run ended.
    import io

    con = Console(file=io.StringIO(), force_terminal=True, force_interactive=False, width=200)
    with RunDisplay(MonitorConfig(live="auto", log_every=1), total_steps=2, console=con) as display:
        assert display._live is None
        display.update({"step": 0, "eval/accuracy": 0.25})
    assert "step 0/2 | eval: accuracy=0.25" in con.file.getvalue()  # not "| Freshness:  | Teacher access:  | ..."


def test_display_on_into_a_file_ends_its_last_line():
    con, buf = console()
    with RunDisplay(MonitorConfig(live="on", log_every=1), total_steps=1, console=con) as display:
        display.update(step_row(1))
    assert buf.getvalue().endswith("\n")
