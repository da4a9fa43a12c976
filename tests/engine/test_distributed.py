"""Data-parallel update: 2 gloo processes on 127.0.0.1, each with half of a batch, end a step with the same
parameters as one process given the whole batch (token-mean over the global batch, summed gradients)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from opd.config import FeedbackConfig, ObjectiveConfig, TrainConfig, load_config
from opd.feedback import compute_feedback
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.update import make_scheduler, update_student

WORKER = textwrap.dedent("""
    import sys, torch
    from opd.engine.distributed import DataParallel
    from opd.update import make_scheduler, update_student
    data = torch.load(sys.argv[1], weights_only=False)
    dp = DataParallel.from_env()
    rows = list(range(len(data["roll"].texts)))[dp.shard(len(data["roll"].texts))]
    model, train = data["model"], data["train"]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the change is minus the gradient (AdamW's ~sign(g) would hide a scale error)
    sched = make_scheduler(opt, train, 10)
    metrics, _ = update_student(model, opt, sched, data["roll"].select(rows), data["scores"].select(rows),
                                data["fb"].select(rows), objective=data["objective"], train=train, version=0,
                                chunk_size=7, dp=dp)
    if dp.rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[2])
        torch.save(metrics, sys.argv[2] + ".metrics")
    dp.close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss_norm,updates_per_batch", [("token", 1), ("sequence", 2)])
def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path, student, teacher_model, tokenizer, prompts,
                                                               loss_norm, updates_per_batch):
    prompts = (prompts * 4)[:8]
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=12), generator=torch.Generator().manual_seed(6))
    assert len(set(roll.completion_mask.sum(1).tolist())) > 1  # uneven lengths: a per-rank mean of means would differ
    scores = LocalTeacher(teacher_model).score(roll)
    fb = compute_feedback(roll, scores, FeedbackConfig())
    objective = ObjectiveConfig(name="pg", loss_norm=loss_norm)
    train = TrainConfig(grad_clip=0.0, updates_per_batch=updates_per_batch, micro_batch_size=1, warmup_steps=0)
    torch.save({"model": copy.deepcopy(student), "roll": roll, "scores": scores, "fb": fb, "objective": objective,
                "train": train}, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)

    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "data.pt"),
                                       str(tmp_path / "dp.pt")], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    dp_params = torch.load(tmp_path / "dp.pt")

    # One process, the combined batch: global mini-batch j = every rank's local mini-batch j.
    half = len(prompts) // 2
    local_mbs = [torch.tensor_split(torch.arange(half), updates_per_batch)] * 2
    order = [int(i) + r * half for j in range(updates_per_batch) for r in range(2) for i in local_mbs[r][j]]
    single = copy.deepcopy(student)
    opt = torch.optim.SGD(single.parameters(), lr=1.0)
    metrics, _ = update_student(single, opt, make_scheduler(opt, train, 10), roll.select(order), scores.select(order),
                                fb.select(order), objective=objective, train=train, version=0, chunk_size=7)
    # the objective as minimised, of the global batch (a mean of the ranks' own losses differed with uneven lengths)
    assert torch.load(tmp_path / "dp.pt.metrics")["update/loss"] == pytest.approx(metrics["update/loss"], rel=1e-5)
    before = student.state_dict()
    moved = 0
    for k, v in single.state_dict().items():
        torch.testing.assert_close(dp_params[k], v, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(v, before[k]))
    assert moved > 0


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("train.bf16_weights=true",)], ids=["fp32", "bf16_weights"])
def test_a_torchrun_run_with_two_gloo_ranks_writes_the_whole_batch_and_resumes_exactly(tmp_path, extra):
    """`torchrun --nproc-per-node 2 -m opd.cli run`: rank 0 writes one metrics row per step, of both ranks' shares;
    stopped after step 2 and resumed, it ends with the weights of an uninterrupted run (each rank's sampler, RNG and
    pipelined batch made ahead are in the checkpoint)."""
    from safetensors.torch import load_file

    from opd.monitor import read_metrics

    sets = ["prompts.batch_size=4", "eval.size=4", "eval.every=0", "eval.recovery_size=0", "student.warm_start_steps=2",
            "student.warm_start_samples=8", "rollout.max_new_tokens=12", "monitor.tensorboard=false",
            "train.checkpoint_every=2", "max_policy_lag=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

    def torchrun(*args: str, crash_at: str = "") -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "opd.cli", "run", *args]
        p = subprocess.run(cmd, env={**env, "OPD_CRASH_AT": crash_at}, capture_output=True, text=True, timeout=600)
        assert (p.returncode != 0) == bool(crash_at), p.stderr[-3000:]

    straight, split = tmp_path / "straight", tmp_path / "split"
    config = ["--max-steps", "4", *[a for s in sets for a in ("--set", s)]]
    torchrun("--out", str(straight), *config)
    # SIGKILL in step 3's update, after the step-2 checkpoint (batch 3 was already made ahead on each rank)
    torchrun("--out", str(split), *config, crash_at="update:3")
    assert (split / "checkpoints" / "step-2").is_dir() and not (split / "final").exists()
    torchrun("--resume", str(split))
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["budget/student_tokens"] == sum(r["rollout/tokens"] for r in rows[1:])  # rank 1's tokens too
    for r in rows[1:]:  # the rows' means are of the whole batch: each rank's share is 2 of the 4 prompts
        assert r["rollout/length_mean"] == pytest.approx(r["rollout/tokens"] / 4)
    resumed = read_metrics(split)
    assert [r.get("rollout/tokens") for r in resumed] == [r.get("rollout/tokens") for r in rows]
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Resumed by one process instead of two ranks: whole batches again, not rank 0's half of the batch it made ahead.
    single = tmp_path / "single"
    torchrun("--out", str(single), *config, crash_at="update:3")
    env_one = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "opd.cli", "run", "--resume", str(single)], env=env_one,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    after = [r for r in read_metrics(single) if r["step"] >= 3]
    assert [r["step"] for r in after] == [3, 4]
    for r in after:
        assert r["rollout/length_mean"] == pytest.approx(r["rollout/tokens"] / 4)


RANK_1_CTRL_C = textwrap.dedent("""
    import os, signal, sys
    import opd.loop
    from opd.cli import app

    def ctrl_c_on_rank_1(phase, step):  # Ctrl-C reaches one rank only, in step 2's update
        if (phase, step) == ("update", 2) and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGINT)

    opd.loop.crash_point = ctrl_c_on_rank_1
    sys.argv = ["opd", *sys.argv[1:]]
    app()
""")


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A rank that stopped alone left the others in a collective of the next step (hung, or a gloo error)."""
    from opd.monitor import read_metrics

    (tmp_path / "ctrl_c.py").write_text(RANK_1_CTRL_C)
    sets = ["prompts.batch_size=4", "eval.size=4", "eval.every=0", "eval.recovery_size=0", "student.warm_start_steps=0",
            "rollout.max_new_tokens=12", "monitor.tensorboard=false", "train.checkpoint_every=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(tmp_path / "ctrl_c.py"), "run", "--out",
           str(tmp_path / "run"), "--max-steps", "4", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)  # ~40 s; the ranks hung before
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # torchrun and both ranks
        raise
    assert p.returncode != 0 and "exitcode  : 130" in err, out[-2000:] + err[-3000:]  # both ranks stopped
    assert (out + err).count("interrupted: checkpoint written at step 2") == 1  # rank 0 says it, once
    assert out.count("step 0/4") == 1  # and shows the run (rank 1 printed its step-0 and last lines too)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]
    assert sorted(c.name for c in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0", "step-2"]


RECORD_TRAINED = textwrap.dedent("""
    import json, os, sys
    import opd.loop
    from opd.cli import app

    real = opd.loop.verify

    def recorded(prompt, completion):  # the training rows this process drew, in order
        with open(os.environ["RECORD"] + "." + os.environ.get("RANK", "0"), "a") as f:
            f.write(json.dumps([prompt.text, completion]) + "\\n")
        return real(prompt, completion)

    opd.loop.verify = recorded
    sys.argv = ["opd", *sys.argv[1:]]
    app()
""")


@pytest.mark.slow
def test_a_pipelined_single_process_run_resumed_on_two_ranks_samples_each_ranks_own_share(tmp_path):
    """A resume on another number of processes gave every rank rank 0's sampler state (both ranks drew the same
    completions), rank 0 trained the whole batch the single process had made ahead, and that batch's prompts were
    never drawn again."""
    import json

    from opd.monitor import read_metrics

    (tmp_path / "record.py").write_text(RECORD_TRAINED)
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                                                 for a, b in zip(range(100, 160), range(900, 840, -1))))
    sets = ["prompts.batch_size=1", "rollout.samples_per_prompt=2", "max_policy_lag=1", "student.warm_start_steps=0",
            "eval.every=0", "eval.size=2", "eval.recovery_size=0", "prompts.eval_size=2", "train.checkpoint_every=2",
            "rollout.max_new_tokens=12", "monitor.tensorboard=false", "prompts.sources[0].kind='jsonl'",
            f"prompts.sources[0].path='{tmp_path / 'sums.jsonl'}'"]
    config = ["--max-steps", "5", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}

    def opd(*args: str, crash_at: str = "", record: str = "", ranks: int = 0) -> None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port())] if ranks else [sys.executable]
        p = subprocess.run([*launch, str(tmp_path / "record.py"), "run", *args], capture_output=True, text=True,
                           env={**env, "OPD_CRASH_AT": crash_at, "RECORD": str(tmp_path / record)}, timeout=300)
        assert (p.returncode != 0) == bool(crash_at), p.stderr[-3000:]
        return p.stdout + p.stderr

    opd("--out", str(tmp_path / "straight"), *config, record="straight")
    opd("--out", str(tmp_path / "split"), *config, crash_at="update:3", record="before")  # batch 3 made ahead
    said = opd("--resume", str(tmp_path / "split"), record="after", ranks=2)
    assert "the 1 batch(es) made ahead are made again" in " ".join(said.split())
    straight = [json.loads(line)[0] for line in (tmp_path / "straight.0").read_text().splitlines()]
    ranks = [[json.loads(line) for line in (tmp_path / f"after.{r}").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # steps 3-5, one row each: rank 0 did not train the whole batch 3
    for i, step in enumerate((3, 4, 5)):
        assert ranks[0][i][0] == ranks[1][i][0] == straight[2 * (step - 1)]  # each step's prompt, batch 3's too
        assert ranks[0][i][1] != ranks[1][i][1]  # the two samples of a prompt, not one drawn twice
    for r in read_metrics(tmp_path / "split")[1:]:
        assert r["rollout/length_mean"] == pytest.approx(r["rollout/tokens"] / 2)


def test_the_mean_break_position_is_over_every_ranks_broken_rows():
    from opd.engine.distributed import merge_rank_metrics

    merged = merge_rank_metrics([{"teacher/broken_rows": 1.0, "teacher/break_pos_mean": 2.0, "rollout/tokens": 10},
                                 {"teacher/broken_rows": 3.0, "teacher/break_pos_mean": 10.0, "rollout/tokens": 10}])
    assert merged["teacher/break_pos_mean"] == 8.0 and merged["teacher/broken_rows"] == 4.0  # was 6, a mean of means


def test_rank_metrics_merge_into_the_whole_batchs():
    from opd.engine.distributed import merge_rank_metrics

    rank0 = {"rollout/tokens": 30, "rollout/length_mean": 15.0, "time/step_s": 1.0, "freshness/ratio_max": 1.2,
             "teacher/failures/http": 1.0, "update/grad_norm": 2.0, "rollout/accuracy": 0.5}
    rank1 = {"rollout/tokens": 50, "rollout/length_mean": 25.0, "time/step_s": 1.5, "freshness/ratio_max": 1.1,
             "teacher/failures/http": 2.0, "update/grad_norm": 2.0}
    merged = merge_rank_metrics([rank0, rank1])
    assert merged == {"rollout/tokens": 80, "rollout/length_mean": 20.0, "time/step_s": 1.5, "freshness/ratio_max": 1.2,
                      "teacher/failures/http": 3.0, "update/grad_norm": 2.0, "rollout/accuracy": 0.5}
    assert list(merged) == list(rank0)  # rank 0's key order
    # a named teacher's counts and the score cache's hits add up too, and a minimum is the smallest
    named0 = {"teacher/math/tokens": 12.0, "teacher/math/failures/http": 1.0, "teacher/cache_hits": 3.0,
              "freshness/ratio_min": 0.8, "teacher/math/latency_s": 0.2}
    named1 = {"teacher/math/tokens": 13.0, "teacher/math/failures/http": 1.0, "teacher/cache_hits": 1.0,
              "freshness/ratio_min": 0.95, "teacher/math/latency_s": 0.4}
    assert merge_rank_metrics([named0, named1]) == {
        "teacher/math/tokens": 25.0, "teacher/math/failures/http": 2.0, "teacher/cache_hits": 4.0,
        "freshness/ratio_min": 0.8, "teacher/math/latency_s": pytest.approx(0.3)}


def test_rank_metrics_sum_feedback_counts_and_weight_token_means_by_tokens():
    # tokens_dropped (a count) was averaged; per-token means were means of the ranks' means, which is the batch's
    # only when every rank has as many tokens
    from opd.engine.distributed import merge_rank_metrics

    rank0 = {"rollout/tokens": 30, "feedback/tokens_dropped": 4.0, "reward/teacher_rows": 1.0, "opd/reverse_kl": 0.2,
             "stability/entropy": 1.0, "rollout/finished_frac": 0.5}
    rank1 = {"rollout/tokens": 10, "feedback/tokens_dropped": 6.0, "reward/teacher_rows": 2.0, "opd/reverse_kl": 0.6,
             "stability/entropy": 3.0, "rollout/finished_frac": 1.0}
    merged = merge_rank_metrics([rank0, rank1])
    assert merged["feedback/tokens_dropped"] == 10.0 and merged["reward/teacher_rows"] == 3.0
    assert merged["opd/reverse_kl"] == pytest.approx((0.2 * 30 + 0.6 * 10) / 40)
    assert merged["stability/entropy"] == pytest.approx((30 + 30) / 40)
    assert merged["rollout/finished_frac"] == 0.75  # a per-row mean of equal row shares


def test_run_counters_add_every_ranks_counts_to_those_before_the_resume():
    from opd.engine.distributed import run_counters

    before = {"teacher/retries_total": 3.0, "teacher/dropped_total": 1.0}  # saved by the run resumed from
    rank0 = {"teacher/retries_total": 2.0, "engine/worker_retries": 1.0}
    rank1 = {"teacher/retries_total": 5.0, "teacher/failures_total": 4.0}
    assert run_counters(before, [rank0, rank1]) == {"engine/worker_retries": 1.0, "teacher/dropped_total": 1.0,
                                                    "teacher/failures_total": 4.0, "teacher/retries_total": 10.0}
    assert run_counters({}, [rank0]) == rank0  # one process


def test_opd_offline_under_torchrun_is_refused_for_what_it_is(monkeypatch):
    from types import SimpleNamespace

    from opd.config import ConfigError
    from opd.loop import check_engine

    with pytest.raises(ConfigError, match="opd offline runs in one process: start it without torchrun"):
        check_engine(load_config(None, []), "offline", SimpleNamespace(world=2))
