"""The pipelined loop: bounded staleness on what reaches the update, metrics that tell the truth, exact resume."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import opd.loop
from opd.config import load_config
from opd.loop import run
from opd.monitor import read_metrics

TINY = [
    "prompts.batch_size=4", "eval.size=4", "eval.every=0", "eval.recovery_size=0", "student.warm_start_steps=0",
    "rollout.max_new_tokens=12", "monitor.live='off'", "monitor.tensorboard=false", "train.checkpoint_every=0",
    "train.warmup_steps=0",
]


def quiet(*a, **k):
    pass


def tiny(*extra):
    return load_config(None, TINY + list(extra))


@pytest.fixture
def updates(monkeypatch):
    """(trainer version, per-row policy versions) of every batch that reaches update_student."""
    seen = []
    real = opd.loop.update_student

    def spy(model, optimizer, scheduler, rollout, *a, version, **kw):
        seen.append((version, rollout.policy_version.tolist()))
        return real(model, optimizer, scheduler, rollout, *a, version=version, **kw)

    monkeypatch.setattr(opd.loop, "update_student", spy)
    return seen


def lags(seen):
    return [version - v for version, rows in seen for v in rows]


def test_max_policy_lag_0_never_trains_on_a_stale_token(tmp_path, updates):
    run(tiny("train.max_steps=4", "objective.name='pg'"), tmp_path, log=quiet)
    assert len(updates) == 4 and set(lags(updates)) == {0}
    rows = read_metrics(tmp_path)[1:]
    assert all(r["freshness/policy_lag"] == 0 and r["freshness/policy_lag_max"] == 0 for r in rows)


def test_max_policy_lag_2_is_never_exceeded_and_is_reached(tmp_path, updates):
    run(tiny("train.max_steps=6", "max_policy_lag=2", "objective.name='pg'"), tmp_path, log=quiet)
    per_step = [max(version - v for v in rows) for version, rows in updates]
    assert len(updates) == 6 and max(lags(updates)) <= 2
    assert per_step[:2] == [0, 1] and set(per_step[2:]) == {2}  # batches 1-3 share the first weights, then lag 2
    rows = read_metrics(tmp_path)[1:]
    assert [r["freshness/policy_lag_max"] for r in rows] == per_step
    assert [r["freshness/policy_lag"] for r in rows] == pytest.approx(per_step)  # one version per batch here
    # Stale tokens are measured against the policy that sampled them: the ratio moves away from 1.
    assert all(r["freshness/ratio_max"] > r["freshness/ratio_min"] for r in rows[2:])
    assert rows[0]["freshness/ratio_max"] == pytest.approx(1.0, abs=1e-4)  # fresh and one update: ratio 1


def test_updates_per_batch_count_toward_the_lag(tmp_path, updates):
    # max_policy_lag = 3 with 2 updates per batch: one step ahead, so a batch starts at most 2 versions stale
    # (and its second mini-batch one more, as in the plain loop).
    run(tiny("train.max_steps=4", "max_policy_lag=3", "train.updates_per_batch=2"), tmp_path, log=quiet)
    starts = [max(version - v for v in rows) for version, rows in updates]
    assert starts == [0, 2, 2, 2]


class Crash(Exception):
    pass


# bf16_weights: pipelined, the update trains through a bf16 copy of its own (not the rollout's, which samples ahead
# with older weights), whose state a resumed run rebuilds from the fp32 master weights
@pytest.mark.parametrize("extra", [(), ("train.bf16_weights=true", "rollout.dtype='bfloat16'")], ids=["fp32", "bf16_weights"])
def test_pipelined_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch, extra):
    cfg = tiny("train.max_steps=5", "max_policy_lag=2", "train.checkpoint_every=2", *extra)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(cfg, straight, log=quiet)

    def crash_at_step_4(phase, step):  # after the step-2 checkpoint, with batches 3 and 4 already made ahead
        if (phase, step) == ("update", 4):
            raise Crash

    monkeypatch.setattr(opd.loop, "crash_point", crash_at_step_4)
    with pytest.raises(Crash):
        run(cfg, split, log=quiet)
    monkeypatch.undo()
    run(cfg, split, resume=True, log=quiet)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time/", "tokens_per_s", "latency")
    comparable = lambda rows: [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]  # noqa: E731
    rows = comparable(read_metrics(straight))
    assert rows == comparable(read_metrics(split)) and rows[-1]["freshness/policy_lag"] == 2


def test_extending_a_finished_pipelined_run_says_its_next_batches_are_fresher(tmp_path, updates):
    # A run that reached max_steps made no batch past it; extended, its next `ahead` batches are sampled with the
    # newest weights (lag below the bound), and the loop says so instead of passing the run off as exact.
    run(tiny("train.max_steps=3", "max_policy_lag=2"), tmp_path, log=quiet)
    said = []
    run(tiny("train.max_steps=6", "max_policy_lag=2"), tmp_path, resume=True, log=said.append)
    assert any("holds 0 of the 2 batches made ahead" in m and "steps 4-5" in m for m in said), said
    per_step = [max(version - v for v in rows) for version, rows in updates[3:]]
    assert per_step == [0, 1, 2]  # then the bound again


def test_a_resume_with_a_lower_max_policy_lag_never_trains_past_the_new_bound(tmp_path, updates, monkeypatch):
    # The checkpoint holds batches made ahead under max_policy_lag = 2; resumed with 1, those that would train
    # at lag 2 are made again (and said so), instead of training past the new bound.
    class Stop(Exception):
        pass

    def crash_at_step_3(phase, step):
        if (phase, step) == ("update", 3):
            raise Stop

    monkeypatch.setattr(opd.loop, "crash_point", crash_at_step_3)
    with pytest.raises(Stop):
        run(tiny("train.max_steps=6", "max_policy_lag=2", "train.checkpoint_every=2"), tmp_path, log=quiet)
    monkeypatch.setattr(opd.loop, "crash_point", lambda *a: None)
    said, before = [], len(updates)
    run(tiny("train.max_steps=6", "max_policy_lag=1", "train.checkpoint_every=2"), tmp_path, resume=True,
        log=said.append)
    assert max(lags(updates[before:])) <= 1 and len(updates) - before == 4  # steps 3-6
    assert any("dropping" in m and "max_policy_lag is now 1" in m for m in said), said
    # the dropped batch's prompts are drawn again, not skipped: the stream ends where an uninterrupted run's does
    cfg = tiny()
    state = torch.load(tmp_path / "checkpoints" / "step-6" / "trainer_state.pt", weights_only=False)
    assert sum(state["prompts"]["draws"].values()) == 6 * cfg.prompts.batch_size
