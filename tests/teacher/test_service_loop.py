"""The loop end to end against `opd serve-teacher` running as a real process on 127.0.0.1: the same
teacher logprobs as the local teacher; a run that survives a killed server and 20% faulty answers."""

import math
import random
import threading
import time

import pytest

from fault_proxy import FaultProxy
from opd.config import load_config
from opd.loop import run
from opd.monitor import read_metrics

SMALL = [
    "prompts.batch_size=8", "eval.size=8", "eval.every=2", "student.warm_start_steps=0", "train.checkpoint_every=0",
    "rollout.max_new_tokens=40", "monitor.live='off'", "monitor.tensorboard=false", "objective.name='pg'",
]


def quiet(*a, **k):
    pass


def remote(url: str, *extra: str) -> list[str]:
    return [f"teacher.url='{url}'", "teacher.timeout_s=5.0", "teacher.backoff_s=0.1", *extra]


def test_loop_against_the_server_gets_the_local_teachers_logprobs(teacher_server, tmp_path):
    steps = ["train.max_steps=3"]
    run(load_config(None, SMALL + steps), tmp_path / "local", log=quiet)
    run(load_config(None, SMALL + steps + remote(teacher_server.url)), tmp_path / "remote", log=quiet)
    local, served = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "remote")
    assert [r["step"] for r in served] == [0, 1, 2, 3]
    for a, b in zip(local, served):
        for key in ("teacher/logprob_mean", "opd/reverse_kl", "eval/reverse_kl", "eval/teacher_nll"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
        if a["step"]:
            assert b["teacher/coverage"] == 1.0 and b["teacher/dropped"] == 0 and b["rollout/tokens"] == a["rollout/tokens"]
            assert b["budget/teacher_tokens"] == a["budget/teacher_tokens"]
            assert 0 < b["teacher/latency_p50_s"] <= b["teacher/latency_p99_s"]


def test_warm_start_data_comes_from_the_servers_generation(teacher_server, tmp_path):
    cfg = load_config(None, SMALL + remote(teacher_server.url, "teacher.api='sglang'") + [
        "train.max_steps=1", "student.warm_start_steps=3", "student.warm_start_samples=8"])
    lines = []
    run(cfg, tmp_path, log=lines.append)
    rows = read_metrics(tmp_path)
    assert any(line.startswith("warm start: ") for line in lines)
    assert rows[0]["budget/teacher_tokens"] > 8 * 20  # eight completions of the arith format, written remotely
    assert rows[1]["teacher/coverage"] == 1.0


def test_prompt_sources_are_routed_to_their_teachers(teacher_server, tmp_path):
    cfg = load_config(None, SMALL + ["train.max_steps=2", "eval.every=0"])
    data = cfg.model_dump()
    data["teachers"] = {"served": {"url": teacher_server.url, "timeout_s": 5.0}}
    data["prompts"]["sources"] = [{"kind": "builtin", "task": "arith", "name": "here"},
                                  {"kind": "builtin", "task": "arith", "name": "there", "teacher": "served"}]
    from opd.config import validate_config

    run(validate_config(data), tmp_path, log=quiet)
    rows = read_metrics(tmp_path)
    for r in rows[1:]:
        assert r["teacher/default/tokens"] + r["teacher/served/tokens"] == r["rollout/tokens"]
        assert r["teacher/coverage"] == 1.0 and "teacher/served/latency_p50_s" in r
    assert sum(r["teacher/served/tokens"] for r in rows[1:]) > 0 and sum(r["teacher/default/tokens"] for r in rows[1:]) > 0


@pytest.mark.slow
def test_run_survives_a_killed_server_and_20_percent_faulty_answers(tmp_path):
    from teacher_servers import ServerProcess

    server = ServerProcess().start()
    rng = random.Random(7)
    kinds = ["http500", "hang", "malformed", "wrong_count"]
    schedule = lambda n, body: rng.choice(kinds) if rng.random() < 0.2 else None  # noqa: E731
    proxy = FaultProxy(server.url, schedule, hang_s=4.0)
    restarted, finished = threading.Event(), threading.Event()
    kill_step = {}

    def kill_once(n: int) -> None:
        if n == 60:  # mid-run: SIGKILL the server, bring it back on the same port a second later
            server.kill()
            kill_step["at"] = len(read_metrics(tmp_path)) - 1  # the step whose scoring it interrupts

            def restart():
                time.sleep(1.0)
                server.start()
                restarted.set()
                # the server dies with the thread that started it (PR_SET_PDEATHSIG is per thread): keep it
                finished.wait()

            threading.Thread(target=restart, daemon=True).start()

    proxy.on_request = kill_once
    proxy.start()
    try:
        cfg = load_config(None, SMALL + remote(proxy.url, "teacher.timeout_s=2.0", "teacher.retries=10",
                                               "teacher.breaker_threshold=5", "teacher.breaker_cooldown_s=1.0")
                          + ["train.max_steps=6", "eval.every=3"])
        result = run(cfg, tmp_path, log=quiet)
    finally:
        proxy.stop()
        server.stop()
        finished.set()
    rows = read_metrics(tmp_path)
    assert restarted.is_set() and proxy.counts["upstream"] > 0  # the kill happened and was seen
    # and the run recovered: after the restart, steps are scored again
    assert any(r["teacher/coverage"] == 1.0 for r in rows[kill_step["at"] + 2 :]), [r.get("teacher/coverage") for r in rows]
    assert [r["step"] for r in rows] == list(range(7)) and (tmp_path / "final").is_dir() and result.steps == 6
    last = rows[-1]
    faults = proxy.faults
    assert min(faults[k] for k in kinds) > 0
    # Every fault shows in the metrics, once: the client's counts match what the proxy did.
    assert last["teacher/failures/http_total"] == faults["http500"] + faults["upstream"]
    assert last["teacher/failures/timeout_total"] == faults["hang"] + faults["client_gone"]
    assert last["teacher/failures/malformed_total"] == faults["malformed"]
    assert last["teacher/failures/mismatch_total"] == faults["wrong_count"]
    assert last["teacher/failures_total"] == sum(faults.values())
    # No batch lost or counted twice: each step's teacher budget is exactly the tokens it got scores for.
    for prev, r in zip(rows, rows[1:]):
        scored = round(r["rollout/tokens"] * r["teacher/coverage"])
        assert r["budget/teacher_tokens"] - prev["budget/teacher_tokens"] == scored
        assert (r["teacher/coverage"] < 1.0) == (r["teacher/dropped"] > 0)
        assert math.isfinite(r["update/loss"])
    assert sum(r["teacher/retries"] for r in rows[1:]) > 0


def test_a_ray_run_scores_through_the_teacher_server(teacher_server, tmp_path):
    # engine = "ray" with teacher.url: Ray actors sample, the trainer's own client scores on the server (no teacher
    # actors); every completion token gets the server's logprob and the faults counters come from that client
    pytest.importorskip("ray")
    ray_opts = ["engine='ray'", "ray.rollout_workers=1", "ray.num_cpus=2"]
    cfg = load_config(None, SMALL + remote(teacher_server.url) + ray_opts + ["train.max_steps=2"])
    run(cfg, tmp_path, log=quiet)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["teacher/coverage"] == 1.0 and r["teacher/latency_p50_s"] > 0 and r["engine/worker_retries"] == 0
    assert rows[-1]["budget/teacher_tokens"] == sum(r["rollout/tokens"] for r in rows[1:])
