"""`opd serve-teacher`'s app: the API subset, dynamic batching across concurrent requests, /metrics."""

import asyncio
import re
import threading

import httpx
import pytest
import torch

from opd.teacher.protocols import ScoreRequest, vllm_parse
from opd.teacher.scorer import ScoreJob, score_batch
from opd.teacher.server import build_app
from teacher_servers import AppThread


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_batched_scoring_matches_one_sequence_at_a_time(teacher_model, tokenizer):
    jobs = [ScoreJob([1, 20, 21, 16, 22, 5], 3, 4, 0.7), ScoreJob([1, 30, 31], 1, 0, 1.0), ScoreJob([1, 9, 9, 9], 2, 2)]
    together = score_batch(teacher_model, jobs, chunk_size=3)
    for job, got in zip(jobs, together):
        alone = score_batch(teacher_model, [job])[0]
        assert len(got.logprobs) == len(job.ids) - job.start
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), rtol=1e-5, atol=1e-5)
        assert got.topk_ids == alone.topk_ids and all(len(t) == job.topk for t in got.topk_ids)
        assert all(r >= 1 for r in got.ranks)


def test_a_job_that_starts_past_its_end_is_refused_before_it_shifts_its_batch_mates_answers(teacher_model):
    # n = len(ids) - start < 0 would move every later job's slice of the batch's logprobs backwards
    good = ScoreJob([1, 20, 21, 22, 23], 2)
    with pytest.raises(ValueError, match="outside its 3 tokens"):
        score_batch(teacher_model, [ScoreJob([1, 30, 31], 5), good])
    assert len(score_batch(teacher_model, [ScoreJob([1, 30, 31], 3), good])[1].logprobs) == 3  # start at the end: 0


def test_concurrent_requests_share_forward_passes(teacher_model, tokenizer):
    app = build_app(teacher_model, tokenizer, name="tiny", max_wait_ms=200)
    seqs = [[1] + [20 + (i * 7 + j) % 60 for j in range(12)] for i in range(8)]

    async def ask(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            bodies = [{"prompt": s, "max_tokens": 1, "prompt_logprobs": 3} for s in seqs]
            answers = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
            return [a.json() for a in answers], (await c.get("/metrics")).text, (await c.get("/health")).json()

    with AppThread(app) as srv:
        answers, text, health = asyncio.run(ask(srv.url))
    assert health["status"] == "ok"
    for s, a in zip(seqs, answers):
        parsed = vllm_parse(a, ScoreRequest(s, 1, topk=3))  # the client's own checks pass
        assert len(parsed.logprobs) == len(s) - 1 and a["usage"]["completion_tokens"] == 1
    batches = metric(text, "opd_teacher_batch_sequences_count")
    assert metric(text, "opd_teacher_batch_sequences_sum") == 8 and batches < 8  # several sequences per pass
    assert metric(text, 'opd_teacher_requests_total{endpoint="completions",status="200"}') == 8
    assert metric(text, "opd_teacher_tokens_scored_total") == 8 * 12


def model_threads() -> list[threading.Thread]:
    """The app's model thread, and asyncio's default-executor threads (asyncio.to_thread) that would be a second."""
    return [t for t in threading.enumerate() if t.name.startswith(("opd-teacher", "asyncio_"))]


def test_scoring_generation_and_weight_loads_share_one_model_thread_that_ends_with_the_app(
        teacher_model, tokenizer, tmp_path):
    # Each thread that runs torch's parallel ops keeps an OpenMP team; more teams than cores slow every op of the
    # process (server.py's docstring), so the app uses one thread for the model and ends it when it stops.
    teacher_model.save_pretrained(tmp_path / "w")
    before = set(model_threads())
    with AppThread(build_app(teacher_model, tokenizer, name="tiny")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/v1/completions", json={"prompt": [1, 20, 21], "max_tokens": 0,
                                                   "prompt_logprobs": 1}).status_code == 200
            assert c.post("/v1/completions", json={"prompt": [1, 20, 21], "max_tokens": 3}).status_code == 200
            assert c.post("/v1/load_weights", json={"path": str(tmp_path / "w"), "version": 1}).status_code == 200
            used = set(model_threads()) - before
            assert len(used) == 1
    assert not (set(model_threads()) - before)


@pytest.fixture
def client(teacher_model, tokenizer):
    from fastapi.testclient import TestClient

    with TestClient(build_app(teacher_model, tokenizer, name="tiny")) as c:
        yield c


def test_echo_generation_and_sglang_shapes(client):
    echo = client.post("/v1/completions", json={"prompt": [1, 20, 21], "max_tokens": 0, "echo": True, "logprobs": 2,
                                                "return_tokens_as_token_ids": True}).json()["choices"][0]
    assert echo["logprobs"]["tokens"] == ["token_id:1", "token_id:20", "token_id:21"]
    assert echo["logprobs"]["token_logprobs"][0] is None and len(echo["logprobs"]["top_logprobs"][1]) >= 2
    # echo with generation: the prompt's entries, then the generated tokens' (vLLM's shape; they had been left out)
    both = client.post("/v1/completions", json={"prompt": [1, 20, 21], "max_tokens": 3, "echo": True, "logprobs": 2,
                                                "temperature": 0, "return_tokens_as_token_ids": True,
                                                "return_token_ids": True}).json()["choices"][0]
    out = both["token_ids"]
    assert both["logprobs"]["tokens"] == [f"token_id:{t}" for t in [1, 20, 21, *out]] and 1 <= len(out) <= 3
    lps = both["logprobs"]["token_logprobs"]
    assert lps[:3] == echo["logprobs"]["token_logprobs"] and all(v <= 0 for v in lps[3:])
    assert len(both["logprobs"]["top_logprobs"]) == len(both["logprobs"]["text_offset"]) == 3 + len(out)
    offsets = both["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[3] > offsets[2]  # the generated text after the prompt's
    gen = client.post("/v1/completions", json={"prompt": [1, 20, 21], "max_tokens": 5, "temperature": 0,
                                               "return_token_ids": True}).json()["choices"][0]
    assert len(gen["token_ids"]) <= 5 and gen["prompt_token_ids"] == [1, 20, 21]
    sg = client.post("/generate", json={"input_ids": [[1, 20, 21, 22]], "return_logprob": True, "logprob_start_len": 0,
                                        "sampling_params": {"max_new_tokens": 0}}).json()
    assert isinstance(sg, list) and sg[0]["meta_info"]["input_token_logprobs"][0] == [None, 1, None]
    assert [e[1] for e in sg[0]["meta_info"]["input_token_logprobs"]] == [1, 20, 21, 22]


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": [1, 10_000], "max_tokens": 0, "prompt_logprobs": 1}, "token ids"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 0, "prompt_logprobs": 21}, "at most 20"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}}, "scores only"),
    ("/generate", {"input_ids": [1, 30, 31], "return_logprob": True, "logprob_start_len": 5,
                   "sampling_params": {"max_new_tokens": 0}}, "past the end"),
    # past the model's context (max_position_embeddings 256), as vLLM refuses past its max_model_len
    ("/v1/completions", {"prompt": [[1, 2], [1] * 256], "max_tokens": 1, "prompt_logprobs": 1},
     "maximum context length is 256 tokens. However, you requested 257 tokens (256 in the prompt, 1 in"),
    ("/v1/completions", {"prompt": [1] * 250, "max_tokens": 7}, "requested 257 tokens"),
    ("/generate", {"input_ids": [1] * 257, "return_logprob": True, "sampling_params": {"max_new_tokens": 0}},
     "maximum context length is 256"),
])
def test_bad_requests_are_400_with_a_reason(client, path, body, message):
    r = client.post(path, json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_max_model_len_sets_the_context_the_server_accepts(teacher_model, tokenizer):
    from fastapi.testclient import TestClient

    with TestClient(build_app(teacher_model, tokenizer, name="tiny")) as c:  # the config's 256
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] == 256
        ok = c.post("/v1/completions", json={"prompt": [1] * 255, "max_tokens": 1, "prompt_logprobs": 0})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["prompt_logprobs"]) == 255
    with TestClient(build_app(teacher_model, tokenizer, name="tiny", max_model_len=64)) as c:
        assert c.get("/v1/models").json()["data"][0]["max_model_len"] == 64
        r = c.post("/v1/completions", json={"prompt": [1] * 60, "max_tokens": 5})
        assert r.status_code == 400 and "maximum context length is 64 tokens" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": [1] * 60, "max_tokens": 4}).status_code == 200


def test_a_refused_weight_load_leaves_the_served_weights_as_they_were(tokenizer, tmp_path):
    # A folder whose first layers fit the served model and whose extra layer does not: torch's load_state_dict copies
    # the tensors that fit before it raises on the rest, so a refusal must be decided before anything is copied.
    from fastapi.testclient import TestClient
    from transformers import LlamaForCausalLM

    from opd.teacher.builtin import STUDENT_SHAPE, llama_config

    def model(seed: int, layers: int):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config(tokenizer, {**STUDENT_SHAPE, "num_hidden_layers": layers})).eval()

    served = model(1, layers=1)
    before = {k: v.clone() for k, v in served.state_dict().items()}
    model(2, layers=2).save_pretrained(tmp_path / "deeper")
    body = {"prompt": [1, 20, 21, 22], "max_tokens": 0, "prompt_logprobs": 1}

    with TestClient(build_app(served, tokenizer, name="tiny")) as c:
        scored_before = c.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
        r = c.post("/v1/load_weights", json={"path": str(tmp_path / "deeper"), "version": 3})
        assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
        assert c.get("/health").json()["policy_version"] == 0
        assert c.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"] == scored_before
    for k, v in served.state_dict().items():
        assert torch.equal(v, before[k]), k
