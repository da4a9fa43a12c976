"""RemoteTeacher against a real `opd serve-teacher` process: same logprobs as the local teacher through
every protocol; retries, drops, the circuit breaker and the cache, with faults injected by a proxy."""

import time
from collections import Counter

import numpy as np
import pytest
import torch

from fault_proxy import FaultProxy
from opd.models import load_model, load_tokenizer
from opd.prompts.tasks import get_task
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.teacher.cache import CachingTeacher
from opd.teacher.remote import CircuitBreaker, RemoteSettings, RemoteTeacher


@pytest.fixture(scope="module")
def arith():
    tokenizer = load_tokenizer("builtin:arith-teacher")
    teacher = load_model("builtin:arith-teacher", device="cpu")
    student = load_model("builtin:arith-student", init="random", device="cpu")
    rng = np.random.default_rng(0)
    prompts = [get_task("arith").sample(rng) for _ in range(6)]
    roll = sample(student, tokenizer, prompts, SamplingParams(temperature=0.8, max_new_tokens=24),
                  generator=torch.Generator().manual_seed(0))
    return tokenizer, teacher, roll


def settings(url, **kw):
    return RemoteSettings(url, **{"timeout_s": 10.0, "retries": 2, "backoff_s": 0.05, "breaker_threshold": 0, **kw})


@pytest.mark.parametrize("api", ["vllm", "vllm-echo", "sglang"])
def test_server_scores_equal_the_local_teacher(teacher_server, arith, api):
    tokenizer, teacher, roll = arith
    local = LocalTeacher(teacher, topk=5).score(roll)
    remote = RemoteTeacher(settings(teacher_server.url, api=api, topk=5)).score(roll)
    m = roll.completion_mask.bool()
    assert torch.equal(remote.scored_mask, roll.completion_mask)
    torch.testing.assert_close(remote.token_logprobs[m], local.token_logprobs[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(remote.topk_logprobs[m], local.topk_logprobs[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(remote.topk_ids[m], local.topk_ids[m])
    assert remote.tokens_scored == roll.num_tokens and remote.failures == 0
    assert remote.metrics["teacher/latency_p99_s"] >= remote.metrics["teacher/latency_p50_s"] > 0


def test_plain_generation_through_the_server(teacher_server, arith):
    tokenizer, _, roll = arith
    out = RemoteTeacher(settings(teacher_server.url)).generate(tokenizer, roll.prompts, SamplingParams(max_new_tokens=60),
                                                               seed=1, batch_size=4)
    assert [len(r.prompts) for r in out] == [4, 2]
    r = out[0]
    assert r.texts[0].endswith("|" + roll.prompts[0].answer) or r.finished.sum() < 4  # the teacher is 98% right
    assert int(r.completion_mask.sum()) > 0 and r.completion_ids.shape[1] <= 60


def first_attempt_fails(kinds):
    """Fail the first request of every sequence, cycling through the fault kinds; retries pass."""
    seen = []

    def schedule(n, body):
        key = str(body.get("prompt") or body.get("input_ids"))
        if key in seen:
            return None
        seen.append(key)
        return kinds[(len(seen) - 1) % len(kinds)]

    return schedule


@pytest.mark.parametrize("api", ["vllm", "sglang"])
def test_every_fault_is_retried_and_counted(teacher_server, arith, api):
    tokenizer, teacher, roll = arith
    kinds = ["http500", "hang", "malformed", "wrong_count", "cut_utf8", "http500"]
    proxy = FaultProxy(teacher_server.url, first_attempt_fails(kinds), hang_s=3.0).start()
    try:
        scores = RemoteTeacher(settings(proxy.url, api=api, timeout_s=1.0)).score(roll)
    finally:
        proxy.stop()
    assert torch.equal(scores.scored_mask, roll.completion_mask)  # every sequence scored, whole
    local = LocalTeacher(teacher).score(roll)
    m = roll.completion_mask.bool()
    torch.testing.assert_close(scores.token_logprobs[m], local.token_logprobs[m], rtol=1e-5, atol=1e-5)
    got = scores.metrics
    assert got["teacher/failures/http"] == proxy.faults["http500"] == 2
    assert got["teacher/failures/timeout"] == proxy.faults["hang"] == 1
    assert got["teacher/failures/malformed"] == proxy.faults["malformed"] + proxy.faults["cut_utf8"] == 2
    assert got["teacher/failures/mismatch"] == proxy.faults["wrong_count"] == 1
    assert scores.failures == got["teacher/retries"] == 6 and got["teacher/dropped"] == 0


def test_an_answer_that_comes_after_the_clients_timeout_counts_once_as_a_timeout(teacher_server, arith):
    # The fault accounting of the service tests rests on this: an upstream that answers after the client gave up
    # (here an inner proxy that hangs each sequence's first attempt) is a timeout for the client and "client_gone"
    # for the outer proxy, not an extra "upstream" failure.
    tokenizer, _, roll = arith
    inner = FaultProxy(teacher_server.url, first_attempt_fails(["hang"]), hang_s=3.0).start()
    outer = FaultProxy(inner.url).start()
    try:
        scores = RemoteTeacher(settings(outer.url, timeout_s=1.5)).score(roll)
    finally:
        outer.stop()
        inner.stop()
    assert torch.equal(scores.scored_mask, roll.completion_mask)
    assert scores.metrics["teacher/failures/timeout"] == outer.faults["client_gone"] == inner.faults["hang"] == 6
    assert outer.faults["upstream"] == 0 and scores.failures == 6


def test_scoring_calls_share_one_tls_context(teacher_server, arith, monkeypatch):
    # Each call makes its own client; building TLS settings for each (httpx's default) cost 25-90 ms a call.
    import ssl

    made = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(1) or real(*a, **k))
    tokenizer, _, roll = arith
    teacher = RemoteTeacher(settings(teacher_server.url))
    for _ in range(3):
        assert torch.equal(teacher.score(roll).scored_mask, roll.completion_mask)
    assert len(made) <= 1  # none where an earlier test already made the shared context


def test_a_scoring_call_searches_no_module_path(teacher_server, arith, monkeypatch):
    # A module imported on every request and not installed is a search of sys.path each time (httpcore's sniffio:
    # ~3.5 ms of a 48 ms call of 8 sequences): after its first call, scoring must import nothing it has not already.
    import importlib.machinery

    tokenizer, _, roll = arith
    teacher = RemoteTeacher(settings(teacher_server.url))
    teacher.score(roll)
    searched = []
    real = importlib.machinery.PathFinder.find_spec
    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec",
                        classmethod(lambda cls, name, *a, **k: searched.append(name) or real(name, *a, **k)))
    assert torch.equal(teacher.score(roll).scored_mask, roll.completion_mask)
    assert searched == []


def test_a_sequence_that_never_gets_an_answer_is_dropped_not_half_scored(teacher_server, arith):
    tokenizer, _, roll = arith
    victim = roll.prompt_ids[2][roll.prompt_mask[2].bool()].tolist()
    schedule = lambda n, body: "wrong_count" if body["prompt"][: len(victim)] == victim else None  # noqa: E731
    proxy = FaultProxy(teacher_server.url, schedule).start()
    try:
        teacher = RemoteTeacher(settings(proxy.url, retries=2))
        scores = teacher.score(roll)
    finally:
        proxy.stop()
    assert scores.scored_mask[2].sum() == 0 and torch.all(scores.token_logprobs[2] == 0)
    others = [0, 1, 3, 4, 5]
    assert torch.equal(scores.scored_mask[others], roll.completion_mask[others])
    assert scores.metrics["teacher/dropped"] == 1 and scores.metrics["teacher/failures/mismatch"] == 3
    assert scores.tokens_scored == roll.num_tokens - int(roll.completion_mask[2].sum())
    assert teacher.counters()["teacher/dropped_total"] == 1


def test_open_breaker_holds_requests_back_from_a_dead_server(arith):
    tokenizer, _, roll = arith
    proxy = FaultProxy("http://127.0.0.1:9", lambda n, body: None).start()  # upstream refuses: every answer is 502
    try:
        teacher = RemoteTeacher(settings(proxy.url, retries=3, breaker_threshold=2, breaker_cooldown_s=0.3,
                                         max_in_flight=6))
        scores = teacher.score(roll)
    finally:
        proxy.stop()
    assert scores.scored_mask.sum() == 0 and scores.metrics["teacher/dropped"] == 6
    assert teacher.breaker.opened >= 1 and scores.metrics["teacher/breaker_rejections"] > 0
    # Without the breaker all 6 x 4 attempts would be sent; with it, attempts made while it is open are not.
    assert proxy.counts["upstream"] == scores.failures < 6 * 4


def test_requests_wait_for_a_slow_half_open_probe_without_spending_their_retries(teacher_server, arith):
    # The server is healthy again but takes 0.5 s an answer: while the probe is out, the other sequences wait for
    # its verdict; spending attempts on that wait used to drop them without their ever being sent.
    tokenizer, _, roll = arith
    proxy = FaultProxy(teacher_server.url).start()
    proxy.on_request = lambda n: time.sleep(0.5)
    try:
        teacher = RemoteTeacher(settings(proxy.url, retries=1, breaker_threshold=2, breaker_cooldown_s=0.3))
        teacher.breaker.record(False)
        teacher.breaker.record(False)  # opened by earlier failures ...
        teacher.breaker.open_until = 0  # ... and its cooldown is over: the next attempt is the probe
        scores = teacher.score(roll)
    finally:
        proxy.stop()
    assert torch.equal(scores.scored_mask, roll.completion_mask) and scores.metrics["teacher/dropped"] == 0
    assert proxy.counts["requests"] == 6 and scores.failures == 0


def test_breaker_states():
    b = CircuitBreaker(threshold=2, cooldown_s=60)
    b.record(False)
    assert b.wait_s() == 0
    b.record(False)
    assert b.wait_s() > 50 and b.opened == 1
    b.open_until = 0  # cooldown over: one probe goes, the others wait for its answer
    assert b.wait_s() == 0 and b.wait_s() > 0
    b.record(True)
    assert b.wait_s() == 0 and b.consecutive == 0


def test_identical_sequences_are_scored_once(teacher_server, arith):
    tokenizer, _, roll = arith
    proxy = FaultProxy(teacher_server.url).start()
    try:
        teacher = CachingTeacher(RemoteTeacher(settings(proxy.url, topk=3)))
        first = teacher.score(roll)
        sent = proxy.counts["requests"]
        again = teacher.score(roll.select([5, 0, 3]))
    finally:
        proxy.stop()
    assert sent == 6 and proxy.counts["requests"] == 6  # nothing new was sent
    assert again.metrics["teacher/cache_hits"] == 3 and again.metrics["teacher/cache_hit_rate"] == 3 / 9
    assert torch.equal(again.token_logprobs, first.token_logprobs[[5, 0, 3]])
    assert torch.equal(again.topk_ids, first.topk_ids[[5, 0, 3]]) and again.tokens_scored == 0
    # the cache's counts are run counters (saved with every checkpoint), so a resumed run's hit rate is the run's
    counts = teacher.counters()
    assert counts["teacher/cache_hits_total"] == 3 and counts["teacher/cache_lookups_total"] == 9
    assert teacher.teacher.counters().items() <= counts.items()  # the wrapped client's still come through


def test_a_probe_cut_short_by_an_exception_does_not_hold_the_next_call():
    # The half-open wait lasts while a probe is out; a call that ended with its probe's flag still set (an exception
    # in the middle of it) must not leave the next call waiting for that probe forever.
    from opd.teacher.remote import ResilientRequests

    requests = ResilientRequests(settings("http://127.0.0.1:9", retries=0))
    requests.breaker.probing = True  # as left by a call cut short
    stats = Counter()
    assert requests.run([("/v1/completions", {}, lambda body: body)], stats, []) == [None]  # refused port: dropped
    assert stats["failures/connect"] == 1 and not requests.breaker.probing


def test_a_request_the_server_refuses_is_not_retried_and_its_answer_is_named(teacher_server, arith, caplog):
    # A wrong served_model (HTTP 404) was retried like a server fault, the breaker waited it out, and the server's
    # words reached no one: the warm start's generation then ended in a traceback minutes later.
    from opd.config import ConfigError

    tokenizer, _, roll = arith
    teacher = RemoteTeacher(settings(teacher_server.url, served_model="no-such-model", retries=3, breaker_threshold=2))
    with caplog.at_level("WARNING", logger="opd.teacher.remote"):
        scores = teacher.score(roll)
    assert scores.tokens_scored == 0 and scores.metrics["teacher/dropped"] == len(roll.prompts)
    assert scores.metrics["teacher/failures/rejected"] == len(roll.prompts) and scores.metrics["teacher/retries"] == 0
    assert scores.metrics["teacher/breaker_rejections"] == 0  # the server is healthy: it answered
    assert "does not exist" in caplog.text and "6 of 6 requests dropped" in caplog.text
    with pytest.raises(ConfigError, match="wrote none of 4 completions .*no-such-model.* does not exist"):
        teacher.generate(tokenizer, roll.prompts, SamplingParams(max_new_tokens=8), seed=1, batch_size=4)
    # nothing listening: the first batch's failures end the generation with the cause (was 16 batches, minutes)
    down = RemoteTeacher(settings("http://127.0.0.1:9", retries=0))
    with pytest.raises(ConfigError, match="127.0.0.1:9 wrote none of 4 completions .*connect"):
        down.generate(tokenizer, roll.prompts * 3, SamplingParams(max_new_tokens=8), seed=1, batch_size=4)
    assert down.totals["dropped"] == 4
