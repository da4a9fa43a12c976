"""Rollouts sampled by an inference server (`rollout.backend = "server"`) against `opd serve-teacher` running
as a real process on 127.0.0.1: the server's behaviour logprobs are the student's own, weights synced after
an update are the ones it samples with, every sample carries the version that wrote it, and `opd run`
works end to end with it.

(Named test_remote_rollout.py, not test_remote.py: tests/ has no __init__.py files, so two test modules
called test_remote would collide under pytest's default import mode.)"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "teacher"))
from teacher_servers import SRC, ServerProcess  # noqa: E402

from opd.config import ConfigError, load_config  # noqa: E402
from opd.logprobs import sampled_logprobs  # noqa: E402
from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.prompts.tasks import get_task  # noqa: E402
from opd.rollout import SamplingParams  # noqa: E402
from opd.rollout.remote import ServerRollout, parse_sampled  # noqa: E402
from opd.teacher.protocols import BadResponse  # noqa: E402
from opd.teacher.remote import RemoteSettings  # noqa: E402


def student_model(seed: int):
    return load_model("builtin:arith-student", init="random", device="cpu", seed=seed).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server started on a random-init student saved to a folder (the run replaces its weights anyway)."""
    folder = tmp_path_factory.mktemp("student") / "v-init"
    tokenizer = load_tokenizer("builtin:arith-student")
    student_model(0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    server = ServerProcess(str(folder)).start()
    yield server, tokenizer
    server.stop()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [get_task("arith").sample(rng) for _ in range(6)]


def backend(url, tmp_path, tokenizer):
    return ServerRollout(RemoteSettings(url, timeout_s=30.0, retries=1, backoff_s=0.05), tokenizer,
                         weights_dir=tmp_path / "weights", seed=0)


def assert_logprobs_are_the_models(model, roll):
    local = sampled_logprobs(model, roll, roll.temperature)
    served_lp = roll.behaviour_logprobs[roll.completion_mask.bool()]
    torch.testing.assert_close(served_lp, local, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_server_samples_carry_the_students_own_logprobs(served, prompts, tmp_path, temperature):
    server, tokenizer = served
    rollouts = backend(server.url, tmp_path, tokenizer)
    rollouts.publish(student_model(0), 0)
    roll = rollouts.sample(prompts, SamplingParams(temperature=temperature, max_new_tokens=24), version=0)
    assert roll.completion_ids.shape[0] == len(prompts) and roll.num_tokens > len(prompts)
    assert_logprobs_are_the_models(student_model(0), roll)
    assert roll.policy_version.tolist() == [0] * len(prompts)
    # The local sampler's layout: mask is a prefix, the end token inside it, padding after it.
    eos = tokenizer.eos_token_id
    for i in range(len(prompts)):
        n = int(roll.completion_mask[i].sum())
        assert roll.completion_mask[i, :n].all() and not roll.completion_mask[i, n:].any()
        assert bool(roll.finished[i]) == (roll.completion_ids[i, n - 1] == eos)
        assert (roll.completion_ids[i, n:] == tokenizer.pad_token_id).all()
    assert roll.temperature == temperature


def test_server_seeds_follow_the_step_and_the_rank_not_a_count_of_calls(served, prompts, tmp_path):
    # A resumed run makes a new client whose count of calls starts at 0: seeds keyed on that count made its
    # samples differ from an uninterrupted run's. And data-parallel ranks drew the same completions of a prompt.
    server, tokenizer = served
    params = SamplingParams(max_new_tokens=16)
    uninterrupted = backend(server.url, tmp_path / "a", tokenizer)
    uninterrupted.publish(student_model(0), 0)
    for step in (1, 2):
        uninterrupted.sample(prompts, params, version=0, step=step)
    third = uninterrupted.sample(prompts, params, version=0, step=3)
    resumed = backend(server.url, tmp_path / "b", tokenizer)
    assert resumed.sample(prompts, params, version=0, step=3).texts == third.texts
    from opd.config import load_config
    from opd.rollout.backend import make_server_backend

    cfg = load_config(None, ["rollout.backend='server'", f"rollout.url='{server.url}'"])
    texts = [make_server_backend(cfg, student_model(0), tokenizer, params, version=0, run_dir=tmp_path / f"r{rank}",
                                 private_copy=False, rank=rank).rollout(prompts, step=3).texts for rank in (0, 1)]
    assert texts[0] != texts[1]


def test_after_a_weight_sync_the_server_samples_from_the_new_weights(served, prompts, tmp_path):
    server, tokenizer = served
    rollouts = backend(server.url, tmp_path, tokenizer)
    old, new = student_model(0), student_model(7)
    rollouts.publish(old, 0)
    params = SamplingParams(temperature=1.0, max_new_tokens=20)
    rollouts.publish(new, 3)
    roll = rollouts.sample(prompts, params, version=3)
    assert roll.policy_version.tolist() == [3] * len(prompts)
    assert_logprobs_are_the_models(new, roll)
    with pytest.raises(AssertionError):  # and not the old weights'
        assert_logprobs_are_the_models(old, roll)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["v3"]  # older folders are removed
    assert httpx.get(server.url + "/health").json()["policy_version"] == 3
    assert rollouts.metrics()["rollout/server_version_lag_max"] == 0


def test_a_rollout_from_older_weights_reports_its_own_version(served, prompts, tmp_path):
    server, tokenizer = served
    rollouts = backend(server.url, tmp_path, tokenizer)
    rollouts.publish(student_model(0), 4)
    roll = rollouts.sample(prompts, SamplingParams(max_new_tokens=8), version=6)  # the trainer moved on, no sync yet
    assert roll.policy_version.tolist() == [4] * len(prompts)
    assert rollouts.metrics()["rollout/server_version_lag_max"] == 2
    # ... and training on it reports that lag in the freshness metrics, not 0
    from opd.config import FeedbackConfig, ObjectiveConfig, TrainConfig
    from opd.feedback import compute_feedback
    from opd.types import TeacherScores
    from opd.update import make_optimizer, make_scheduler, update_student

    model, train = student_model(0), TrainConfig()
    optimizer = make_optimizer(model, train)
    scores = TeacherScores(roll.behaviour_logprobs - 0.1, roll.completion_mask.clone())
    feedback = compute_feedback(roll, scores, FeedbackConfig())
    metrics, _ = update_student(model, optimizer, make_scheduler(optimizer, train, 10), roll, scores, feedback,
                                objective=ObjectiveConfig(name="pg"), train=train, version=6)
    assert metrics["freshness/policy_lag"] == 2 and metrics["freshness/policy_lag_max"] == 2


def test_loading_weights_that_do_not_fit_is_refused(served, tmp_path):
    server, _ = served
    bigger = load_model("builtin:arith-teacher", device="cpu")
    bigger.save_pretrained(tmp_path / "teacher")
    r = httpx.post(server.url + "/v1/load_weights", json={"path": str(tmp_path / "teacher"), "version": 9})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_weights", json={"path": str(tmp_path / "nothing"), "version": 9})
    assert r.status_code == 400 and "config.json" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["policy_version"] != 9


def test_opd_run_with_the_server_backend(served, tmp_path):
    server, _ = served
    out = tmp_path / "run"
    sets = ["prompts.batch_size=4", "eval.size=4", "eval.every=0", "student.warm_start_steps=0",
            "train.checkpoint_every=0", "rollout.max_new_tokens=24", "monitor.live='off'", "monitor.tensorboard=false",
            "rollout.backend='server'", f"rollout.url='{server.url}'", "rollout.retries=1"]
    args = [sys.executable, "-m", "opd.cli", "run", "--max-steps", "3", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    env = {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["freshness/policy_lag"] == 0 and row["freshness/policy_lag_max"] == 0  # synced every step
        assert row["freshness/logprob_drift"] < 1e-4  # the server's behaviour logprobs are the trainer's
        assert row["rollout/server_requests"] == 4 and row["rollout/server_dropped"] == 0
        assert row["rollout/weight_sync_s"] > 0
    # The server holds the weights of the last update, and the run's saved rollout weights are that version.
    assert httpx.get(server.url + "/health").json()["policy_version"] == 3
    assert [p.name for p in (out / "rollout-weights").iterdir()] == ["v3"]


def test_bad_sampled_answers_are_rejected():
    ok = {"choices": [{"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.1, -2.0]}, "finish_reason": "stop",
                       "policy_version": 2}]}
    assert parse_sampled(ok) == {"token_ids": [5, 6], "logprobs": [-0.1, -2.0], "finished": True, "policy_version": 2}
    vllm_style = {"choices": [{"logprobs": {"tokens": ["token_id:5"], "token_logprobs": [-0.5]}, "finish_reason": "length"}]}
    assert parse_sampled(vllm_style)["token_ids"] == [5] and parse_sampled(vllm_style)["policy_version"] is None
    for bad in ({"choices": [{"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.1]}}]},
                {"choices": [{"token_ids": [5], "logprobs": {"token_logprobs": [float("nan")]}}]},
                {"choices": [{"token_ids": [5], "logprobs": None}]}, {"error": "x"}):
        with pytest.raises(BadResponse):
            parse_sampled(bad)


@pytest.mark.parametrize("sets, message", [
    (["rollout.backend='server'"], "needs rollout.url"),
    (["rollout.url='http://127.0.0.1:1'"], "rollout.backend = 'local'"),
    (["rollout.backend='server'", "rollout.url='http://127.0.0.1:1'", "rollout.teacher_mix=0.5"], "teacher-guided"),
    (["rollout.backend='server'", "rollout.url='http://127.0.0.1:1'", "engine='ray'"], "pick one"),
    (["rollout.backend='server'", "rollout.url='http://127.0.0.1:1'", "rollout.dtype='int8'"], "dtype it serves"),
    (["rollout.backend='server'", "rollout.url='http://127.0.0.1:1'", "rollout.top_p=0.9"], "rollout.top_p = 1.0"),
])
def test_rollout_backend_config_errors_say_what_to_set(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)
