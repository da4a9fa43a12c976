"""Wire formats: requests say what the servers expect, answers are accepted only whole and aligned."""

import json

import pytest

from opd.teacher.protocols import (
    BadResponse,
    ScoreRequest,
    check_finite,
    echo_parse,
    echo_request,
    pooling_parse,
    sglang_parse,
    sglang_request,
    vllm_parse,
    vllm_request,
)

IDS = [1, 20, 21, 16, 22]  # prompt [1, 20, 21] + completion [16, 22]
REQ = ScoreRequest(IDS, prompt_len=3, topk=2, temperature=0.7)


def vllm_body(ids=IDS, lp=None):
    """The shape vLLM serialises: first position null, then {"<id>": {logprob, rank, decoded_token}}."""
    lp = lp or {p: -0.1 * p for p in range(len(ids))}
    entries = [None]
    for p in range(1, len(ids)):
        entries.append({str(ids[p]): {"logprob": lp[p], "rank": 3, "decoded_token": "x"},
                        "7": {"logprob": -0.01, "rank": 1, "decoded_token": "a"},
                        "8": {"logprob": -0.5, "rank": 2, "decoded_token": "b"}})
    return json.loads(json.dumps({"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]}))


def test_vllm_request_sends_token_ids_and_prompt_logprobs():
    path, body = vllm_request(REQ)
    assert path == "/v1/completions"
    assert body["prompt"] == IDS and body["prompt_logprobs"] == 2 and body["max_tokens"] == 1
    assert body["temperature"] == 0.7 and "model" not in body
    assert vllm_request(ScoreRequest(IDS, 3, model="m"))[1]["model"] == "m"


def test_vllm_parse_takes_completion_positions_and_topk_best_first():
    s = vllm_parse(vllm_body(), REQ)
    assert s.logprobs == pytest.approx([-0.3, -0.4])
    assert s.topk_ids == [[7, 16], [7, 22]]  # the sent token (-0.3, -0.4) is better than id 8 (-0.5)
    assert s.topk_logprobs[1] == pytest.approx([-0.01, -0.4])


@pytest.mark.parametrize("damage, kind", [
    (lambda b: b["choices"][0]["prompt_logprobs"].pop(), "mismatch"),  # one position short
    (lambda b: b["choices"][0]["prompt_logprobs"][4].pop("22"), "mismatch"),  # not the token sent
    (lambda b: b["choices"][0].pop("prompt_logprobs"), "malformed"),
    (lambda b: b["choices"][0]["prompt_logprobs"][3]["16"].update(logprob="x"), "malformed"),
    (lambda b: b.update(choices=[]), "malformed"),
])
def test_vllm_parse_rejects_partial_or_misaligned_answers(damage, kind):
    body = vllm_body()
    damage(body)
    with pytest.raises(BadResponse) as e:
        vllm_parse(body, REQ)
    assert e.value.kind == kind


def test_echo_round_trip_checks_token_ids():
    path, body = echo_request(REQ)
    assert body["echo"] and body["max_tokens"] == 0 and body["logprobs"] == 2 and body["return_tokens_as_token_ids"]
    answer = {"choices": [{"logprobs": {
        "tokens": [f"token_id:{t}" for t in IDS], "token_logprobs": [None, -1.0, -2.0, -0.3, -0.4],
        "top_logprobs": [None] + [{f"token_id:{IDS[p]}": -0.3 - p, "token_id:7": -0.01, "token_id:8": -0.5}
                                  for p in range(1, 5)]}}]}
    s = echo_parse(answer, REQ)
    assert s.logprobs == [-0.3, -0.4] and s.topk_ids == [[7, 8], [7, 8]]
    answer["choices"][0]["logprobs"]["tokens"][4] = "token_id:99"
    with pytest.raises(BadResponse, match="not the token sent"):
        echo_parse(answer, REQ)


@pytest.mark.parametrize("start", [0, 2, 3])
def test_sglang_aligns_from_the_end_whatever_the_start(start):
    path, body = sglang_request(REQ)
    assert path == "/generate" and body["input_ids"] == IDS and body["sampling_params"]["max_new_tokens"] == 0
    assert body["return_logprob"] and body["top_logprobs_num"] == 2 and body["logprob_start_len"] == 2
    entries = [[None if p == 0 else -0.1 * p, IDS[p], None] for p in range(start, 5)]
    tops = [None if p == 0 else [[-0.01, 7, None], [-0.5, 8, None]] for p in range(start, 5)]
    s = sglang_parse({"text": "", "meta_info": {"input_token_logprobs": entries, "input_top_logprobs": tops}}, REQ)
    assert s.logprobs == pytest.approx([-0.3, -0.4]) and s.topk_ids == [[7, 8], [7, 8]]
    entries[-1][1] = 5
    with pytest.raises(BadResponse):
        sglang_parse({"meta_info": {"input_token_logprobs": entries, "input_top_logprobs": tops}}, REQ)


def test_pooling_reads_one_reward_and_non_finite_answers_are_rejected():
    assert pooling_parse({"data": [{"index": 0, "data": [0.1, [0.2, 0.75]]}]}, REQ).reward == 0.75
    with pytest.raises(BadResponse):
        pooling_parse({"data": []}, REQ)
    with pytest.raises(BadResponse, match="non-finite"):
        check_finite(vllm_parse(vllm_body(lp={p: float("nan") for p in range(5)}), REQ))


@pytest.mark.parametrize("where, value", [("sent", float("nan")), ("sent", float("inf")), ("sent", float("-inf")),
                                          ("topk", float("nan")), ("topk", float("inf"))])
def test_any_non_finite_value_in_an_answer_is_rejected(where, value):
    # vLLM clamps -inf to -9999, so any infinity or NaN is a broken server; in the top-k it would reach topk_kl
    lp = {p: -0.1 * p for p in range(5)}
    body = vllm_body(lp={**lp, 4: value} if where == "sent" else lp)
    if where == "topk":
        body["choices"][0]["prompt_logprobs"][4]["8"]["logprob"] = value
    with pytest.raises(BadResponse, match="non-finite"):
        check_finite(vllm_parse(body, REQ))
    # an entry that -inf keeps out of the top-k reaches no loss: accepted
    body = vllm_body()
    body["choices"][0]["prompt_logprobs"][4]["8"]["logprob"] = float("-inf")
    check_finite(vllm_parse(body, REQ))


def test_a_top_logprob_whose_token_id_is_not_an_integer_is_a_malformed_answer():
    entries = [[-0.1 * p, IDS[p], None] for p in range(2, 5)]
    tops = [[[-0.01, "7", None], [-0.5, 8, None]] for _ in range(2, 5)]
    with pytest.raises(BadResponse, match="expected a token id") as e:
        sglang_parse({"meta_info": {"input_token_logprobs": entries, "input_top_logprobs": tops}}, REQ)
    assert e.value.kind == "malformed"
