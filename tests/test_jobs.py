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
