"""Recovery evaluation: hand-checked window rule, and a trained teacher against an untrained student."""

import numpy as np
import pytest
import torch

from opd.models import load_model, load_tokenizer
from opd.prompts.tasks import get_task
from opd.recovery import (RecoverySettings, likelihood_recovery, planted_error_recovery, recovered_within,
                          recovery_eval)
from opd.rollout import SamplingParams
from opd.teacher import LocalTeacher
from opd.types import Prompt

GOOD, BAD = -0.1, -9.0


def test_recovered_within_counts_tokens_to_the_end_of_the_first_good_window():
    lp = torch.tensor([[BAD, BAD, GOOD, GOOD, GOOD, GOOD, GOOD],  # window 3: first good window ends at token 5
                       [BAD, GOOD, BAD, GOOD, BAD, GOOD, BAD],  # never 3 good-on-average tokens in a row
                       [GOOD, GOOD, 0.0, 0.0, 0.0, 0.0, 0.0],  # ended after 2 tokens: the whole continuation counts
                       [BAD, GOOD, 0.0, 0.0, 0.0, 0.0, 0.0]])  # ... and here it is still broken
    mask = torch.tensor([[1] * 7, [1] * 7, [1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    assert recovered_within(lp, mask, window=3, threshold=-3.0).tolist() == [5, 0, 2, 0]
    # A single good token is no recovery with a window of 3 (row 0 would otherwise count at token 3).
    assert recovered_within(lp[:1], mask[:1], window=1, threshold=-3.0).tolist() == [3]


@pytest.fixture(scope="module")
def arith():
    tok = load_tokenizer("builtin:arith-teacher")
    teacher = load_model("builtin:arith-teacher", device="cpu")
    task = get_task("arith")
    prompts = [task.sample(np.random.default_rng([11, i])) for i in range(32)]
    return tok, teacher, prompts


def test_planted_errors_cost_the_teacher_and_an_untrained_student_never_recovers(arith, student):
    tok, teacher, prompts = arith
    params = SamplingParams(max_new_tokens=64)
    t = planted_error_recovery(teacher, tok, prompts[:16], params, seed=0)
    assert t["eval/recovery_clean_accuracy"] >= 0.9  # the correct prefix: the teacher finishes it
    assert t["eval/recovery_rate"] < t["eval/recovery_clean_accuracy"]  # the planted digit matters
    assert 0 <= min(t["recovery_by_step"].values()) and set(t["recovery_by_step"]) <= set(range(5))
    s = planted_error_recovery(student, tok, prompts[:8], params, seed=0)
    assert s["eval/recovery_rate"] == 0 and s["eval/recovery_clean_accuracy"] == 0
    assert planted_error_recovery(teacher, tok, [Prompt("hello", "t")], params, seed=0) is None  # no task, no plant


def test_likelihood_recovery_separates_the_teacher_from_an_untrained_student(arith, student):
    tok, teacher, prompts = arith
    settings = RecoverySettings(size=16, horizon=16, window=4, threshold=-3.0)
    judge = LocalTeacher(teacher)
    t = likelihood_recovery(teacher, judge, tok, prompts[:16], SamplingParams(max_new_tokens=64), settings, seed=0)
    s = likelihood_recovery(student, judge, tok, prompts[:16], SamplingParams(max_new_tokens=64), settings, seed=0)
    assert t["eval/recovery_rate_likelihood"] >= 0.8 and 1 <= t["eval/recovery_tokens_mean"] <= 16
    assert s["eval/recovery_rate_likelihood"] <= 0.2


def test_recovery_eval_keys_and_the_training_rng_is_untouched(arith, student):
    tok, teacher, prompts = arith
    settings = RecoverySettings(size=4)
    state = torch.get_rng_state()
    out = recovery_eval(teacher, LocalTeacher(teacher), tok, prompts, SamplingParams(max_new_tokens=64), settings,
                        seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert {"eval/recovery_rate", "eval/recovery_clean_accuracy", "eval/recovery_rate_likelihood",
            "recovery_by_step"} <= set(out)
    again = recovery_eval(teacher, LocalTeacher(teacher), tok, prompts, SamplingParams(max_new_tokens=64), settings,
                          seed=3)
    assert again == out  # deterministic by seed
    # Without a task that plants errors, the recovery rate is the likelihood one.
    plain = [Prompt(text=p.text, source="t") for p in prompts]
    out = recovery_eval(teacher, LocalTeacher(teacher), tok, plain, SamplingParams(max_new_tokens=64), settings, seed=3)
    assert out["eval/recovery_rate"] == out["eval/recovery_rate_likelihood"] and "recovery_by_step" not in out


def test_a_teacher_without_weights_here_skips_only_the_likelihood_recovery(arith):
    tok, teacher, prompts = arith
    local = LocalTeacher(teacher)

    class ScoreOnly:  # what a teacher server offers: scores, no weights in this process
        batch_size = 64
        score = staticmethod(local.score)

    params, settings = SamplingParams(max_new_tokens=64), RecoverySettings(size=4)
    out = recovery_eval(teacher, ScoreOnly(), tok, prompts, params, settings, seed=3)
    assert "eval/recovery_rate" in out and "eval/recovery_rate_likelihood" not in out
    given = recovery_eval(teacher, ScoreOnly(), tok, prompts, params, settings, seed=3, teacher_model=teacher)
    assert given == recovery_eval(teacher, local, tok, prompts, params, settings, seed=3)


def test_likelihood_recovery_keeps_the_question_in_the_teachers_and_students_context(arith, monkeypatch):
    # The teacher's state is prompt + its first j tokens; limited to max_prompt_tokens (the prompt's own limit),
    # encode_prompts kept only the end of it and dropped the question. Both sides now get the prefix's room.
    import opd.recovery as recovery

    tok, teacher, prompts = arith
    seen = []
    real = recovery._next_token_logprobs

    def spy(model, tokenizer, texts, temperature, max_prompt_tokens):
        seen.extend(len(tokenizer(t)["input_ids"]) <= max_prompt_tokens for t in texts)
        return real(model, tokenizer, texts, temperature, max_prompt_tokens)

    monkeypatch.setattr(recovery, "_next_token_logprobs", spy)
    longest = max(len(tok(p.text)["input_ids"]) for p in prompts[:6])
    recovery.likelihood_recovery(teacher, LocalTeacher(teacher), tok, prompts[:6], SamplingParams(max_new_tokens=64),
                                 RecoverySettings(size=6, horizon=8, window=4, threshold=-3.0), seed=0,
                                 max_prompt_tokens=longest)
    assert seen and all(seen)  # no context cut
