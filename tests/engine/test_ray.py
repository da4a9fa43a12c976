"""engine = "ray": rollout and teacher workers as Ray actors on a local cluster (2 CPUs, 2 workers)."""

from __future__ import annotations

import glob

import pytest
import torch

pytest.importorskip("ray")

from opd.config import load_config  # noqa: E402
from opd.loop import run  # noqa: E402
from opd.monitor import read_metrics  # noqa: E402

TINY = [
    "prompts.batch_size=4", "eval.size=4", "eval.every=0", "eval.recovery_size=0", "student.warm_start_steps=0",
    "rollout.max_new_tokens=12", "monitor.live='off'", "monitor.tensorboard=false", "train.checkpoint_every=0",
    "objective.name='pg'",
]
RAY = ["engine='ray'", "ray.rollout_workers=1", "ray.teacher_workers=1", "ray.num_cpus=2"]


def quiet(*a, **k):
    pass


def opd_ray_folders() -> set[str]:
    return set(glob.glob("/tmp/opd-ray-*"))


def test_a_ray_run_writes_the_metrics_of_a_local_run_and_cleans_up(tmp_path):
    import ray

    before = opd_ray_folders()
    run(load_config(None, TINY + ["train.max_steps=2"]), tmp_path / "local", log=quiet)
    run(load_config(None, TINY + RAY + ["train.max_steps=2"]), tmp_path / "ray", log=quiet)
    local, remote = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "ray")
    assert [r["step"] for r in remote] == [0, 1, 2]
    for a, b in zip(local, remote):
        assert set(a) == {k for k in b if not k.startswith("engine/")}
    assert remote[-1]["engine/worker_retries"] == 0 and remote[1]["freshness/policy_lag"] == 0
    assert remote[-1]["budget/student_tokens"] == sum(r["rollout/tokens"] for r in remote[1:])
    assert not ray.is_initialized() and opd_ray_folders() == before  # Ray stopped, its session folder removed


@pytest.mark.slow
def test_killed_workers_are_replaced_and_their_calls_reissued(tmp_path, monkeypatch):
    """A rollout worker and a teacher worker SIGKILL themselves in the middle of a call (pipelined run, lag 1)."""
    monkeypatch.setenv("OPD_WORKER_CRASH_AT", "rollout:2,teacher:3")
    monkeypatch.setenv("OPD_WORKER_CRASH_ONCE", str(tmp_path / "killed"))
    cfg = load_config(None, TINY + RAY + ["train.max_steps=4", "max_policy_lag=1", "ray.rollout_workers=2",
                                          "ray.num_cpus=3"])
    run(cfg, tmp_path / "run", log=quiet)
    assert (tmp_path / "killed.rollout-2").exists() and (tmp_path / "killed.teacher-3").exists()  # the kills happened
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["engine/worker_retries"] >= 2  # the two killed calls (and any that met a worker restarting)
    # Nothing counted twice: the budget is exactly the tokens of the batches trained on.
    assert rows[-1]["budget/student_tokens"] == sum(r["rollout/tokens"] for r in rows[1:])
    assert max(r["freshness/policy_lag_max"] for r in rows[1:]) == 1


@pytest.mark.parametrize("dtype, lacks_bf16", [("bfloat16", False), ("int8", False), ("int8", True)])
def test_rollout_workers_sample_with_rollout_dtype_like_the_local_loop(dtype, lacks_bf16, monkeypatch):
    # The worker itself (what a Ray actor runs), in this process: with rollout.dtype it samples from a refreshed
    # low-precision copy, and its rows equal the local sampler's from the same copy and seed.
    import torch

    from opd import matmul
    from opd.engine.ray_workers import RolloutWorker
    from opd.prompts.tasks import get_task
    from opd.rollout import SamplingCopy, SamplingParams, sample

    monkeypatch.setattr(matmul, "cpu_lacks_bf16", lambda: lacks_bf16)
    cfg = load_config(None, TINY + RAY + [f"rollout.dtype='{dtype}'"])
    worker = RolloutWorker(cfg.model_dump(mode="json"))
    student = worker.model
    torch.manual_seed(3)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in student.state_dict().items()}  # "trained" weights
    worker.load_weights(state, version=5)
    # int8 on a CPU without bf16 instructions: the fp32 model itself prefills (opd.rollout.sampling_copy_for)
    fp32_sampler = dtype == "int8" and lacks_bf16
    want_dtype = torch.float32 if fp32_sampler else torch.bfloat16
    assert next(worker.sampler.parameters()).dtype == want_dtype and worker.params.int8 == (dtype == "int8")
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [get_task("arith").sample(rng) for _ in range(4)]
    got = worker.rollout(prompts, step=1, seed=11)
    assert (got.policy_version == 5).all()
    reference = type(student)(student.config)
    reference.load_state_dict(state)
    copy = reference if fp32_sampler else SamplingCopy(reference, torch.bfloat16).refresh(reference)
    want = sample(copy, worker.tokenizer, prompts, SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p,
                  cfg.rollout.max_new_tokens, cfg.rollout.stop, cfg.rollout.decoder, int8=dtype == "int8"),
                  generator=torch.Generator().manual_seed(11), max_prompt_tokens=cfg.prompts.max_prompt_tokens)
    assert torch.equal(got.completion_ids, want.completion_ids)
    assert torch.equal(got.behaviour_logprobs, want.behaviour_logprobs)


def test_a_worker_restarted_while_idle_loads_the_latest_weights_it_is_handed(monkeypatch):
    # Ray restarts a worker that died between calls blank; no call failed, so the trainer did not re-send weights
    # and its next rollout tripped "sampled before it was sent weights". Every rollout call now carries the latest
    # weights (as an object ref in a list, fetched only by a blank worker).
    import numpy as np
    import torch

    from opd.engine.ray_workers import RolloutWorker
    from opd.prompts.tasks import get_task

    cfg = load_config(None, TINY + RAY)
    worker = RolloutWorker(cfg.model_dump(mode="json"))
    state = {k: v + 0.01 for k, v in worker.model.state_dict().items()}
    prompts = [get_task("arith").sample(np.random.default_rng(0)) for _ in range(2)]
    got = worker.rollout(prompts, step=3, seed=1, latest=([state], 7))
    assert (got.policy_version == 7).all() and worker.version == 7
    assert torch.equal(worker.model.state_dict()["lm_head.weight"], state["lm_head.weight"])
    worker.load_weights({k: v - 0.01 for k, v in state.items()}, 8)
    assert (worker.rollout(prompts, step=4, seed=1, latest=([state], 7)).policy_version == 8).all()  # not blank: kept


def test_joined_shares_coverage_is_the_fraction_of_their_text_bytes():
    # weighted by each share's scored tokens, a share whose alignment failed (0 scored) vanished: 0.0 and 1.0 over
    # equal bytes joined to 1.0, and Teacher access could not turn red
    import torch

    from opd.engine.ray_workers import concat_scores
    from opd.types import TeacherScores

    def share(covered, total, scored):
        mask = torch.zeros(2, 5, dtype=torch.long)
        mask.view(-1)[:scored] = 1
        return TeacherScores(token_logprobs=torch.zeros(2, 5), scored_mask=mask, coverage=covered / total,
                             coverage_bytes=(covered, total))

    joined = concat_scores([share(0, 40, 0), share(40, 40, 10)])
    assert joined.coverage == 0.5 and joined.coverage_bytes == (40, 80)
    assert concat_scores([share(4, 40, 1), share(20, 20, 10)]).coverage == pytest.approx(24 / 60)


def test_sigterm_stops_a_pipelined_ray_run_at_a_step_with_a_checkpoint(tmp_path, monkeypatch):
    # ray.init replaced the run's SIGTERM handler with its own (exit at once: steps since the last checkpoint lost);
    # the workers were shut down before the producer, whose call in flight then failed, was "re-issued", and started
    # a second Ray cluster that outlived the run.
    import os
    import signal

    import ray

    import opd.loop as loop

    def sigterm_in_update_2(phase, step):
        if (phase, step) == ("update", 2):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "crash_point", sigterm_in_update_2)
    said = []
    before = opd_ray_folders()
    result = run(load_config(None, TINY + RAY + ["train.max_steps=4", "max_policy_lag=1"]), tmp_path / "run",
                 log=lambda *a: said.append(" ".join(map(str, a))))
    assert result.interrupted and (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
    assert any("interrupted: checkpoint written at step 2" in s for s in said)
    assert not any("re-issuing" in s for s in said)
    assert not ray.is_initialized() and opd_ray_folders() == before


def test_actors_the_cluster_cannot_place_are_refused(tmp_path):
    # They waited forever for CPUs, deaf to Ctrl-C and SIGTERM.
    import ray

    from opd.config import ConfigError

    cfg = load_config(None, TINY + RAY + ["train.max_steps=1", "ray.rollout_workers=2"])  # 3 actors, 2 CPUs
    with pytest.raises(ConfigError, match="3 Ray actors x ray.cpus_per_worker = 1.0 need 3 CPUs.*has 2"):
        run(cfg, tmp_path / "run", log=quiet)
    assert not ray.is_initialized()


def test_a_worker_lost_for_good_stops_the_run_with_its_steps_checkpointed(tmp_path, monkeypatch):
    # With its restarts spent, the call ended in a raw ActorDiedError traceback (after a "re-issuing the call" line
    # that did not happen) and the steps since the last checkpoint were lost.
    from safetensors.torch import load_file

    from opd.faults import RunAborted

    sets = TINY + RAY + ["train.max_steps=4", "ray.max_restarts=0"]
    run(load_config(None, sets), tmp_path / "straight", log=quiet)
    monkeypatch.setenv("OPD_WORKER_CRASH_AT", "rollout:3")
    monkeypatch.setenv("OPD_WORKER_CRASH_ONCE", str(tmp_path / "killed"))
    said = []
    with pytest.raises(RunAborted, match="ray.max_restarts = 0 restarts are spent"):
        run(load_config(None, sets), tmp_path / "split", log=lambda *a: said.append(" ".join(map(str, a))))
    assert not any("re-issuing" in s for s in said)
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step-0", "step-2"]
    monkeypatch.delenv("OPD_WORKER_CRASH_AT")
    run(load_config(None, sets), tmp_path / "split", resume=True, log=quiet)
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_lost_while_the_trainer_updates_keeps_that_step(tmp_path, monkeypatch):
    # Found when the new weights are handed out (not by a rollout): the run stopped with only checkpoint 0.
    import psutil

    import opd.loop as loop
    from opd.faults import RunAborted

    real, updates = loop.update_student, {"n": 0}

    def update_then_lose_the_rollout_worker(*a, **k):
        out = real(*a, **k)
        updates["n"] += 1
        if updates["n"] == 3:  # as the OOM killer would, while step 3 trains
            for p in psutil.process_iter(["cmdline"]):
                if any("RolloutWorker" in c for c in (p.info["cmdline"] or [])):
                    p.kill()
        return out

    monkeypatch.setattr(loop, "update_student", update_then_lose_the_rollout_worker)
    with pytest.raises(RunAborted, match="restarts are spent"):
        run(load_config(None, TINY + RAY + ["train.max_steps=4", "ray.max_restarts=0"]), tmp_path / "run", log=quiet)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0", "step-3"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]
