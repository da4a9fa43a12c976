"""Wire formats of teacher servers: how to ask for the logprobs of prompt + completion token ids,
and how to read them back, checked token by token against what was sent.

- `vllm`:      OpenAI-compatible `/v1/completions` with vLLM's `prompt_logprobs: k`. The response's
               `choices[0].prompt_logprobs` holds one entry per prompt token: null for the first, else
               a dict `{"<token id>": {"logprob", "rank", "decoded_token"}}` with the sent token plus the
               top-k. (`max_tokens = 1`: vLLM rejects 0 without `echo`; the one sampled token is ignored.)
- `vllm-echo`: the OpenAI-legacy form, `echo: true, logprobs: k, max_tokens: 0`, with
               `return_tokens_as_token_ids` so tokens come back as "token_id:N" and can be checked.
- `sglang`:    SGLang's native `/generate` with `return_logprob`, `logprob_start_len`,
               `top_logprobs_num` and `max_new_tokens = 0` (as slime queries its teacher servers);
               `meta_info.input_token_logprobs` is a list of `[logprob, token_id, text]`.
- `pooling`:   a score-only teacher (a reward model behind vLLM's `/pooling`): one number per sequence,
               the last value of `data[0].data`.

A sequence's answer is only accepted whole: any missing position, a token id that differs from the
one sent, or a non-number raises `BadResponse`, and the client retries or drops the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class BadResponse(Exception):
    """The server answered, but not with a complete, aligned score for the tokens sent."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "malformed" (not the expected JSON) or "mismatch" (tokens do not line up)


@dataclass
class SequenceScore:
    """The teacher's answer for one sequence, over its completion tokens only."""

    logprobs: list[float] | None = None  # log pi_T(a_t | s, a_<t), one per completion token
    topk_ids: list[list[int]] | None = None  # [T][k], best first
    topk_logprobs: list[list[float]] | None = None
    reward: float | None = None  # score-only teachers: one number for the whole sequence


@dataclass(frozen=True)
class ScoreRequest:
    ids: list[int]  # prompt + completion token ids, exactly as the student saw them
    prompt_len: int
    topk: int = 0
    temperature: float = 1.0
    model: str = ""  # served model name; empty = the server's default

    @property
    def completion_len(self) -> int:
        return len(self.ids) - self.prompt_len


def _number(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise BadResponse("malformed", f"{where}: expected a number, got {x!r}")
    if x != x:  # NaN: anywhere in an answer a broken server (and it would sort anywhere in a top-k)
        raise BadResponse("malformed", f"{where}: non-finite value nan in the teacher's answer")
    return float(x)


def _integer(x: Any, where: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise BadResponse("malformed", f"{where}: expected a token id, got {x!r}")
    return x


def _get(d: Any, key: str | int, where: str) -> Any:
    try:
        return d[key]
    except (KeyError, IndexError, TypeError):
        raise BadResponse("malformed", f"{where}: missing `{key}`") from None


def _first_choice(body: Any) -> dict:
    choices = _get(body, "choices", "response")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("malformed", "response: `choices` must be a non-empty list of objects")
    return choices[0]


def _topk_of(entries: list[tuple[int, float]], k: int, where: str) -> tuple[list[int], list[float]]:
    best = sorted(entries, key=lambda e: -e[1])[:k]
    if len(best) < k:
        raise BadResponse("mismatch", f"{where}: {len(best)} top logprobs, asked for {k}")
    return [i for i, _ in best], [v for _, v in best]


# ------------------------------------------------------------------------------ vLLM prompt_logprobs
def vllm_request(req: ScoreRequest) -> tuple[str, dict]:
    body = {"prompt": req.ids, "max_tokens": 1, "temperature": req.temperature, "prompt_logprobs": req.topk,
            "add_special_tokens": False}
    if req.model:
        body["model"] = req.model
    return "/v1/completions", body


def vllm_parse(body: Any, req: ScoreRequest) -> SequenceScore:
    entries = _get(_first_choice(body), "prompt_logprobs", "choices[0]")
    if not isinstance(entries, list):
        raise BadResponse("malformed", "choices[0].prompt_logprobs must be a list (is prompt_logprobs supported?)")
    if len(entries) != len(req.ids):
        raise BadResponse("mismatch", f"prompt_logprobs has {len(entries)} positions for {len(req.ids)} tokens sent")
    out = SequenceScore(logprobs=[], topk_ids=[] if req.topk else None, topk_logprobs=[] if req.topk else None)
    for pos in range(req.prompt_len, len(req.ids)):
        where = f"prompt_logprobs[{pos}]"
        entry = entries[pos]
        if not isinstance(entry, dict) or not entry:
            raise BadResponse("malformed", f"{where}: expected a dict of token id -> logprob, got {entry!r}")
        parsed: dict[int, float] = {}
        for key, val in entry.items():
            try:
                tok = int(key)
            except (TypeError, ValueError):
                raise BadResponse("malformed", f"{where}: key {key!r} is not a token id") from None
            parsed[tok] = _number(_get(val, "logprob", where), where)
        sent = req.ids[pos]
        if sent not in parsed:
            raise BadResponse("mismatch", f"{where}: no logprob for the token sent ({sent})")
        out.logprobs.append(parsed[sent])
        if req.topk:
            ids, lps = _topk_of(list(parsed.items()), req.topk, where)
            out.topk_ids.append(ids)
            out.topk_logprobs.append(lps)
    return out


# ---------------------------------------------------------------------------------- echo + logprobs
def echo_request(req: ScoreRequest) -> tuple[str, dict]:
    body = {"prompt": req.ids, "max_tokens": 0, "echo": True, "logprobs": max(req.topk, 1),
            "temperature": req.temperature, "return_tokens_as_token_ids": True, "add_special_tokens": False}
    if req.model:
        body["model"] = req.model
    return "/v1/completions", body


def _token_id(token: Any, where: str) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise BadResponse("malformed", f"{where}: expected 'token_id:N' (return_tokens_as_token_ids), got {token!r}")
    try:
        return int(token.split(":", 1)[1])
    except ValueError:
        raise BadResponse("malformed", f"{where}: bad token {token!r}") from None


def echo_parse(body: Any, req: ScoreRequest) -> SequenceScore:
    lp = _get(_first_choice(body), "logprobs", "choices[0]")
    tokens = _get(lp, "tokens", "choices[0].logprobs")
    values = _get(lp, "token_logprobs", "choices[0].logprobs")
    tops = _get(lp, "top_logprobs", "choices[0].logprobs") if req.topk else None
    if not isinstance(tokens, list) or not isinstance(values, list):
        raise BadResponse("malformed", "choices[0].logprobs.tokens / token_logprobs must be lists")
    if len(tokens) != len(req.ids) or len(values) != len(req.ids) or (tops is not None and len(tops) != len(req.ids)):
        raise BadResponse("mismatch", f"echo returned {len(tokens)} tokens / {len(values)} logprobs for {len(req.ids)} sent")
    out = SequenceScore(logprobs=[], topk_ids=[] if req.topk else None, topk_logprobs=[] if req.topk else None)
    for pos in range(req.prompt_len, len(req.ids)):
        where = f"logprobs[{pos}]"
        if _token_id(tokens[pos], where) != req.ids[pos]:
            raise BadResponse("mismatch", f"{where}: token {tokens[pos]!r} is not the token sent ({req.ids[pos]})")
        out.logprobs.append(_number(values[pos], where))
        if req.topk:
            top = tops[pos]
            if not isinstance(top, dict):
                raise BadResponse("malformed", f"{where}: top_logprobs entry must be a dict, got {top!r}")
            entries = [(_token_id(t, where), _number(v, where)) for t, v in top.items()]
            ids, lps = _topk_of(entries, req.topk, where)
            out.topk_ids.append(ids)
            out.topk_logprobs.append(lps)
    return out


# ----------------------------------------------------------------------------------- SGLang /generate
def sglang_request(req: ScoreRequest) -> tuple[str, dict]:
    # Start one position before the completion: entries then cover every completion token whether the
    # server counts logprob_start_len inclusively or not; parsing aligns from the end and checks ids.
    body = {"input_ids": req.ids, "return_logprob": True, "logprob_start_len": max(req.prompt_len - 1, 0),
            "top_logprobs_num": req.topk,
            "sampling_params": {"max_new_tokens": 0, "temperature": req.temperature, "skip_special_tokens": False}}
    if req.model:
        body["model"] = req.model
    return "/generate", body


def sglang_parse(body: Any, req: ScoreRequest) -> SequenceScore:
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    meta = _get(body, "meta_info", "response")
    entries = _get(meta, "input_token_logprobs", "meta_info")
    tops = _get(meta, "input_top_logprobs", "meta_info") if req.topk else None
    T = req.completion_len
    if not isinstance(entries, list) or (tops is not None and not isinstance(tops, list)):
        raise BadResponse("malformed", "meta_info.input_token_logprobs must be a list")
    if len(entries) < T or (tops is not None and len(tops) != len(entries)):
        raise BadResponse("mismatch", f"{len(entries)} input logprobs for {T} completion tokens")
    offset = len(req.ids) - len(entries)  # entries cover the last len(entries) positions
    if offset < 0:
        raise BadResponse("mismatch", f"{len(entries)} input logprobs for {len(req.ids)} tokens sent")
    out = SequenceScore(logprobs=[], topk_ids=[] if req.topk else None, topk_logprobs=[] if req.topk else None)
    for j in range(len(entries) - T, len(entries)):
        pos = offset + j
        where = f"input_token_logprobs[{j}]"
        e = entries[j]
        if not isinstance(e, list) or len(e) < 2:
            raise BadResponse("malformed", f"{where}: expected [logprob, token_id, ...], got {e!r}")
        if e[1] != req.ids[pos]:
            raise BadResponse("mismatch", f"{where}: token {e[1]!r} is not the token sent ({req.ids[pos]})")
        out.logprobs.append(_number(e[0], where))
        if req.topk:
            top = tops[j]
            if not isinstance(top, list) or not all(isinstance(t, list) and len(t) >= 2 for t in top):
                raise BadResponse("malformed", f"input_top_logprobs[{j}]: expected a list of [logprob, token_id, ...]")
            ids, lps = _topk_of([(_integer(t[1], where), _number(t[0], where)) for t in top], req.topk, where)
            out.topk_ids.append(ids)
            out.topk_logprobs.append(lps)
    return out


# --------------------------------------------------------------------------- score-only: /pooling
def pooling_request(req: ScoreRequest) -> tuple[str, dict]:
    body = {"input": req.ids}
    if req.model:
        body["model"] = req.model
    return "/pooling", body


def pooling_parse(body: Any, req: ScoreRequest) -> SequenceScore:
    data = _get(_get(_get(body, "data", "response"), 0, "data"), "data", "data[0]")
    while isinstance(data, list) and data:  # per-token or nested outputs: the sequence's score is the last
        data = data[-1]
    return SequenceScore(reward=_number(data, "data[0].data"))


PROTOCOLS = {
    "vllm": (vllm_request, vllm_parse),
    "vllm-echo": (echo_request, echo_parse),
    "sglang": (sglang_request, sglang_parse),
    "pooling": (pooling_request, pooling_parse),
}


def check_finite(score: SequenceScore) -> None:
    """vLLM clamps -inf to -9999 and SGLang's log-softmax of finite logits is finite: a NaN or an infinity anywhere
    (a token's logprob, its top-k, a reward) can only come from a broken server, and would cost the whole step."""
    values = (score.logprobs or []) + ([score.reward] if score.reward is not None else [])
    values += [v for row in score.topk_logprobs or [] for v in row]
    for v in values:
        if not math.isfinite(v):
            raise BadResponse("malformed", f"non-finite value {v} in the teacher's answer")
