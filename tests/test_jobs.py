import pytest

from opd.config import load_config
from opd.jobs import RunJob, run_jobs
from opd.monitor import read_metrics

TINY = ["student.warm_start_steps=2", "student.warm_start_samples=8", "prompts.batch_size=2", "eval.size=4",
        "eval.every=0", "eval.recovery_size=0", "train.max_steps=2", "monitor.tensorboard=false",
        "train.checkpoint_every=0"]


def test_runs_side_by_side_match_runs_one_after_the_other(tmp_path):
    jobs = [RunJob(f"seed {s}", load_config(None, TINY + [f"seed={s}"]), tmp_path / "par" / f"seed-{s}") for s in (0, 1)]
    run_jobs(jobs, 2, log=lambda *a: None)
    seq = [RunJob(j.name, j.cfg, tmp_path / "seq" / j.out.name) for j in jobs]
    run_jobs(seq, 1, log=lambda *a: None)
    for a, b in zip(jobs, seq):
        assert a.done and (a.out / "console.log").read_text()  # a worker's output goes to its run folder
        ra, rb = read_metrics(a.out), read_metrics(b.out)
        assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, 1, 2]
        # same seed, same work: the same losses up to float reduction order (1 vs 2 torch threads)
        assert ra[-1]["update/loss"] == pytest.approx(rb[-1]["update/loss"], rel=1e-3, abs=1e-5)
    logs = []
    run_jobs(jobs, 2, log=logs.append)  # finished runs are skipped, not trained again
    assert logs == []


def test_a_failing_run_is_named(tmp_path):
    bad = load_config(None, TINY + ["student.model='/nonexistent/model'", "student.init='pretrained'"])
    jobs = [RunJob("good", load_config(None, TINY), tmp_path / "good"), RunJob("bad", bad, tmp_path / "bad")]
    with pytest.raises(RuntimeError, match="bad failed"):
        run_jobs(jobs, 2, log=lambda *a: None)


def test_an_interrupted_run_stops_the_jobs_instead_of_passing_for_finished(tmp_path, monkeypatch):
    # Ctrl-C stopped one run (checkpoint written) and the jobs went on: the broken-prefix study reported the stopped
    # run's step-20 evaluation as its final one, and compare failed later on its missing final/.
    import opd.loop
    from opd.jobs import JobsInterrupted
    from opd.loop import RunResult

    ran = []

    def stopped(cfg, out, **k):
        ran.append(out.name)
        return RunResult(run_dir=out, steps=3, interrupted=True)

    monkeypatch.setattr(opd.loop, "run", stopped)
    jobs = [RunJob(name, load_config(None), tmp_path / name) for name in ("a", "b")]
    with pytest.raises(JobsInterrupted, match="a was interrupted"):
        run_jobs(jobs, 1, log=lambda *a: None)
    assert ran == ["a"]


def test_opd_compare_interrupted_exits_130_saying_how_to_continue(monkeypatch):
    from typer.testing import CliRunner

    import opd.compare
    from opd.cli import app
    from opd.jobs import JobsInterrupted

    def stopped(*a, **k):
        raise JobsInterrupted("onpolicy, seed 0 was interrupted (its checkpoint is in X)")

    monkeypatch.setattr(opd.compare, "run_compare", stopped)
    r = CliRunner().invoke(app, ["compare", "--out", "/tmp/somewhere"])
    assert r.exit_code == 130 and "--out /tmp/somewhere" in r.output and "Traceback" not in r.output
