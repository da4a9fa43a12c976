"""Stage 3 through a teacher server (`opd serve-teacher`, vLLM or SGLang): same `score()` as LocalTeacher.

Each sequence (prompt + completion token ids, exactly as the student saw them) is one request.
Requests run concurrently, at most `max_in_flight` at once; each has a timeout and is retried
with exponential backoff and jitter. A circuit breaker stops hammering a server that keeps
failing: after `breaker_threshold` consecutive failures it opens for `breaker_cooldown_s`, during
which attempts are not sent (they wait, and count as spent), then lets one probe through; the other
requests wait for the probe's verdict without spending attempts.

A request the server refuses as such (HTTP 4xx but 408/429: a wrong model name, a sequence too long) is not
retried: it would be refused again. Dropped requests are logged with the server's last answer.

A sequence is never trained on with partial scores: its answer is accepted whole (every
completion token, ids checked) or, once retries are spent, the sequence is dropped — its
`scored_mask` row stays 0, so none of its tokens reaches a loss — and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache, partial

import httpx
import numpy as np
import torch

from opd.config import ConfigError
from opd.rollout.sampler import SamplingParams, encode_prompts
from opd.teacher.protocols import PROTOCOLS, BadResponse, ScoreRequest, SequenceScore, check_finite
from opd.types import Prompt, Rollout, TeacherScores

log = logging.getLogger(__name__)


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open for cooldown_s -> half-open: one probe."""

    def __init__(self, threshold: int, cooldown_s: float):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.consecutive = 0
        self.open_until = 0.0
        self.probing = False
        self.opened = 0  # times it opened (a metric)

    def wait_s(self) -> float:
        """Seconds to wait before sending; 0 = send now (and, when half-open, this call is the probe)."""
        if self.threshold == 0 or self.consecutive < self.threshold:
            return 0.0
        now = time.monotonic()
        if now < self.open_until:
            return self.open_until - now
        if self.probing:  # a probe is out; ResilientRequests waits for its verdict before asking
            return min(0.05 + self.cooldown_s / 10, 1.0)
        self.probing = True
        return 0.0

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.threshold and self.consecutive >= self.threshold:
            if time.monotonic() >= self.open_until:
                self.opened += 1
            self.open_until = time.monotonic() + self.cooldown_s


@dataclass
class RemoteSettings:
    url: str
    api: str = "vllm"
    served_model: str = ""
    topk: int = 0
    timeout_s: float = 60.0
    max_in_flight: int = 16
    retries: int = 4
    backoff_s: float = 0.5
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 5.0


@cache
def tls_context():
    """The TLS settings every client of this process shares. httpx builds a new context for each client, loading the
    CA bundle (25-90 ms here), and a client lives for one batch of calls (one training step's scoring): made once,
    that cost leaves the teacher's latency. The same settings httpx's default (verify=True) would make."""
    return httpx.create_ssl_context()


class ResilientRequests:
    """Concurrent POSTs to one server, each with a timeout, retries with backoff and jitter, behind a circuit
    breaker (RemoteSettings). Shared by the remote teacher and the remote rollout backend (opd.rollout.remote).

    A call is (path, body, parse): `parse(json)` returns the answer or raises BadResponse (counted as a
    failure and retried). An answer is the parsed value, or None once retries are spent (counted as dropped).
    """

    def __init__(self, settings: RemoteSettings, *, seed: int = 0):
        self.settings = settings
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
        self.rng = random.Random(seed)
        self.last_failure = ""  # the latest failed attempt's kind and the server's words, for messages

    def run(self, calls: list, stats: Counter, latencies: list[float]) -> list:
        """The answers in call order (a None call is answered None); `stats` and `latencies` are filled in."""
        answers = asyncio.run(self._run_all(calls, stats, latencies))
        if stats["dropped"]:  # said where a user reads it: the metrics count drops, this says why
            log.warning("%s: %d of %d requests dropped (last failure: %s)", self.settings.url, stats["dropped"],
                        sum(1 for c in calls if c), self.last_failure)
        return answers

    async def _run_all(self, calls: list, stats: Counter, latencies: list[float]) -> list:
        """Run the calls concurrently (None = nothing to ask: answered None); answers in call order."""
        s = self.settings
        # No probe outlives the call that sent it: one cut short by an exception must not hold the next call's
        # requests waiting for a verdict that never comes.
        self.breaker.probing = False
        limits = httpx.Limits(max_connections=s.max_in_flight, max_keepalive_connections=s.max_in_flight)
        gate = asyncio.Semaphore(s.max_in_flight)
        async with httpx.AsyncClient(base_url=s.url, timeout=s.timeout_s, limits=limits, verify=tls_context()) as client:
            done = iter(await asyncio.gather(*(self._one(client, gate, c, stats, latencies) for c in calls if c)))
            return [next(done) if c else None for c in calls]

    async def _one(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, call: tuple, stats: Counter,
                   latencies: list[float]):
        """One request, retried with backoff; the parsed answer, or None once retries are spent (dropped)."""
        path, body, parse = call
        for attempt in range(self.settings.retries + 1):
            if attempt:
                stats["retries"] += 1
                await asyncio.sleep(self._backoff(attempt))
            while self.breaker.probing:
                # Half-open: another request is the probe. Its verdict (success closes the circuit, failure reopens
                # it) is what this request waits for, and the wait spends no attempt: a slow but healthy server's
                # probe would otherwise use up the others' retries before any of them was sent.
                await asyncio.sleep(0.02)
            if (wait := self.breaker.wait_s()) > 0:
                # Open circuit: this attempt is not sent; it is spent waiting for the breaker to let a probe through.
                stats["breaker_rejections"] += 1
                await asyncio.sleep(wait)
                continue
            async with gate:
                t0 = time.perf_counter()
                kind, detail = await self._attempt(client, path, body, parse)
                latencies.append(time.perf_counter() - t0)
            # a refusal is the server's verdict on this request, not a sign that the server is failing
            self.breaker.record(ok=kind in (None, "rejected"))
            if kind is None:
                return detail
            stats["failures"] += 1
            stats[f"failures/{kind}"] += 1
            self.last_failure = f"{kind}: {detail}"
            log.debug("teacher request failed (%s): %s", kind, detail)
            if kind == "rejected":  # asked again, it would be refused again
                break
        stats["dropped"] += 1
        return None

    async def _attempt(self, client: httpx.AsyncClient, path: str, body: dict, parse):
        """(None, parsed answer) on success, else (failure kind, message)."""
        try:
            resp = await client.post(path, json=body)
        except httpx.TimeoutException as e:
            return "timeout", repr(e)
        except httpx.TransportError as e:  # refused, reset, server gone mid-answer
            return "connect", repr(e)
        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):  # not timeout / rate limit
            return "rejected", f"HTTP {resp.status_code}: {resp.text[:300]}"
        if resp.status_code != 200:
            return "http", f"HTTP {resp.status_code}: {resp.text[:200]}"
        try:
            body = json.loads(resp.content)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # e.g. a body cut inside a multi-byte character
            return "malformed", f"not JSON: {e}"
        try:
            return None, parse(body)
        except BadResponse as e:
            return e.kind, str(e)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # a shape the parser's checks did not foresee: one failed answer (retried, counted), not a crashed run
            return "malformed", f"unexpected answer ({type(e).__name__}: {e})"

    def _backoff(self, attempt: int) -> float:
        # Exponential with full jitter, so clients retrying together do not arrive together.
        cap = self.settings.backoff_s * 2 ** min(attempt - 1, 6)
        return cap * (0.5 + 0.5 * self.rng.random())


class RemoteTeacher:
    """A teacher behind an HTTP server. Scores are aligned with `Rollout.completion_ids` like LocalTeacher's."""

    def __init__(self, settings: RemoteSettings, *, batch_size: int = 64, seed: int = 0):
        if settings.api not in PROTOCOLS:
            raise ValueError(f"unknown teacher api {settings.api!r}; known: {', '.join(PROTOCOLS)}")
        self.settings = settings
        self.build_request, parse = PROTOCOLS[settings.api]

        def checked(body, req):
            out = parse(body, req)
            check_finite(out)
            return out

        self.parse = checked
        self.score_only = settings.api == "pooling"
        self.topk = settings.topk
        self.batch_size = batch_size  # used by evaluation to size its sampling batches
        self.requests = ResilientRequests(settings, seed=seed)
        self.breaker = self.requests.breaker
        self.totals: Counter = Counter()  # cumulative over the run (eval scoring included)

    # ------------------------------------------------------------------------------------ scoring
    def score(self, rollout: Rollout, *, full: bool = False) -> TeacherScores:
        if full:
            raise ValueError("a teacher server returns top-k logprobs, not the full distribution; use objective "
                             "'pg' or 'topk_kl' with a remote teacher")
        t0 = time.perf_counter()
        calls = []
        for ids, p_len in sequence_ids(rollout):
            req = ScoreRequest(ids, p_len, self.topk, rollout.temperature, self.settings.served_model)
            calls.append(None if req.completion_len == 0 else (*self.build_request(req), partial(self.parse, req=req)))
        stats, latencies = Counter(), []
        results = self.requests.run(calls, stats, latencies)
        results = [_empty(self.topk) if c is None else r for c, r in zip(calls, results)]
        scores = assemble(rollout, results, self.topk, self.score_only)
        scores.latency_s = time.perf_counter() - t0
        scores.tokens_scored = int(scores.scored_mask.sum())
        scores.failures = stats["failures"]
        self.totals.update(stats)
        scores.metrics = request_metrics(stats, latencies, len(calls))
        return scores

    # --------------------------------------------------------------------------------- generation
    def generate(self, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int, batch_size: int = 64,
                 max_prompt_tokens: int = 256) -> list[Rollout]:
        """Plain generation through /v1/completions (the warm start's teacher data). A prompt whose
        request fails after every retry is left out (and counted)."""
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            prompt_ids, prompt_mask = encode_prompts(tokenizer, chunk, max_prompt_tokens)
            calls = []
            for i in range(len(chunk)):
                body = {"prompt": prompt_ids[i][prompt_mask[i].bool()].tolist(), "max_tokens": params.max_new_tokens,
                        "temperature": params.temperature, "top_p": params.top_p, "stop": list(params.stop),
                        "seed": seed + start + i, "return_token_ids": True, "add_special_tokens": False}
                if self.settings.served_model:
                    body["model"] = self.settings.served_model
                calls.append(("/v1/completions", body, parse_generation))
            stats = Counter()
            results = self.requests.run(calls, stats, [])
            self.totals.update(stats)
            keep = [i for i, r in enumerate(results) if r is not None]
            if not out and not keep:  # the first batch: every request failed after its retries; the rest would too
                raise ConfigError(f"the teacher server at {self.settings.url} wrote none of {len(chunk)} completions "
                                  f"(last failure: {self.requests.last_failure}): is it up, and are teacher.url and "
                                  "teacher.served_model right?")
            if keep:
                out.append(generated_rollout([chunk[i] for i in keep], prompt_ids[keep], prompt_mask[keep],
                                             [results[i] for i in keep], tokenizer, params))
        return out

    def counters(self) -> dict[str, float]:
        """Cumulative counts of the run so far (training and evaluation scoring)."""
        return {f"teacher/{k}_total": float(v) for k, v in sorted(self.totals.items())}


# ------------------------------------------------------------------------------------------ helpers
def sequence_ids(rollout: Rollout) -> list[tuple[list[int], int]]:
    """(prompt + completion token ids without padding, prompt length) for every row."""
    out = []
    for i in range(rollout.completion_ids.shape[0]):
        p = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        c = rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()
        out.append((p + c, len(p)))
    return out


def assemble(rollout: Rollout, results: list[SequenceScore | None], topk: int, score_only: bool) -> TeacherScores:
    """Per-sequence answers -> [B, T] tensors aligned with completion_ids; dropped rows stay unscored."""
    B, T = rollout.completion_ids.shape
    lp = torch.zeros((B, T), dtype=torch.float32)
    scored = torch.zeros((B, T), dtype=rollout.completion_mask.dtype)
    tk_ids = torch.zeros((B, T, topk), dtype=torch.long) if topk and not score_only else None
    tk_lp = torch.full((B, T, topk), float("-inf")) if topk and not score_only else None
    rewards = torch.full((B,), float("nan")) if score_only else None
    for i, res in enumerate(results):
        if res is None:
            continue
        if score_only:
            if res.reward is not None:
                rewards[i] = res.reward
            continue
        cols = rollout.completion_mask[i].bool()
        lp[i, cols] = torch.tensor(res.logprobs, dtype=torch.float32)
        scored[i, cols] = 1
        if tk_ids is not None:
            tk_ids[i, cols] = torch.tensor(res.topk_ids, dtype=torch.long).view(-1, topk)
            tk_lp[i, cols] = torch.tensor(res.topk_logprobs, dtype=torch.float32).view(-1, topk)
    return TeacherScores(token_logprobs=lp, scored_mask=scored, topk_ids=tk_ids, topk_logprobs=tk_lp, rewards=rewards)


def request_metrics(stats: Counter, latencies: list[float], n_sequences: int) -> dict[str, float]:
    out = {"teacher/requests": float(n_sequences), "teacher/retries": float(stats["retries"]),
           "teacher/dropped": float(stats["dropped"]), "teacher/breaker_rejections": float(stats["breaker_rejections"])}
    for k, v in stats.items():
        if k.startswith("failures/"):
            out[f"teacher/{k}"] = float(v)
    if latencies:
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        out.update({"teacher/latency_p50_s": float(p50), "teacher/latency_p90_s": float(p90),
                    "teacher/latency_p99_s": float(p99)})
    return out


def _empty(topk: int) -> SequenceScore:
    """The (complete) answer for a sequence without completion tokens."""
    return SequenceScore(logprobs=[], topk_ids=[] if topk else None, topk_logprobs=[] if topk else None)


def parse_generation(body) -> dict:
    choice = body["choices"][0] if isinstance(body, dict) and body.get("choices") else None
    if not isinstance(choice, dict) or not isinstance(choice.get("token_ids"), list):
        raise BadResponse("malformed", "generation answer without choices[0].token_ids (return_token_ids)")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in choice["token_ids"]):
        raise BadResponse("malformed", "choices[0].token_ids must be integers")
    return {"token_ids": choice["token_ids"], "finished": choice.get("finish_reason") == "stop"}


def generated_rollout(prompts: list[Prompt], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: list[dict],
                      tokenizer, params: SamplingParams) -> Rollout:
    """Teacher-written completions as a Rollout (behaviour logprobs unknown: zeros; only SFT reads it).
    A completion that stopped without a stop string ended on EOS, which belongs to the completion."""
    eos = tokenizer.eos_token_id
    rows = []
    for a in answers:
        ids = list(a["token_ids"])[: params.max_new_tokens]
        if a["finished"] and not params.stop and (not ids or ids[-1] != eos) and len(ids) < params.max_new_tokens:
            ids.append(eos)
        rows.append(ids)
    T = max(1, max(len(r) for r in rows))
    completion_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        completion_mask[i, : len(r)] = 1
    return Rollout(prompts=prompts, prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, behaviour_logprobs=torch.zeros((len(rows), T)),
                   policy_version=torch.zeros(len(rows), dtype=torch.long),
                   texts=[tokenizer.decode(r, skip_special_tokens=True) for r in rows],
                   finished=torch.tensor([a["finished"] for a in answers]), temperature=params.temperature)
