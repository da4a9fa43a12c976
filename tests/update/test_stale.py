"""Stale tokens (sampled by an older policy version) get the truncated importance weight min(pi_theta/pi_b, cap)."""

import copy

import pytest
import torch

from opd.config import FeedbackConfig, ObjectiveConfig, TrainConfig
from opd.feedback import compute_feedback
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.update import make_scheduler, update_student


def change(model, roll, scores, *, name, version, cap):
    m = copy.deepcopy(model)
    train = TrainConfig(grad_clip=0.0, warmup_steps=0)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)  # parameter change = minus the gradient
    fb = compute_feedback(roll, scores, FeedbackConfig())
    metrics, _ = update_student(m, opt, make_scheduler(opt, train, 10), roll, scores, fb,
                                objective=ObjectiveConfig(name=name, max_stale_weight=cap), train=train,
                                version=version, chunk_size=7)
    delta = torch.cat([(a - b).flatten() for a, b in zip(m.parameters(), model.parameters())])
    return delta, metrics


@pytest.mark.parametrize("name", ["pg", "reverse_kl"])
def test_stale_tokens_get_the_truncated_importance_weight(student, teacher_model, tokenizer, prompts, name):
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10), generator=torch.Generator().manual_seed(1))
    scores = LocalTeacher(teacher_model).score(roll, full=True)
    fresh, m_fresh = change(student, roll, scores, name=name, version=0, cap=0.5)
    # The same tokens, but the trainer is one version further: every token is stale. Here pi_theta = pi_behaviour
    # (the weights did not move), so the ratio is 1: below a cap of 2 the weight is 1, at a cap of 0.5 it is 0.5.
    stale, m_stale = change(student, roll, scores, name=name, version=1, cap=2.0)
    capped, _ = change(student, roll, scores, name=name, version=1, cap=0.5)
    assert fresh.abs().max() > 0
    torch.testing.assert_close(stale, fresh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(capped, 0.5 * fresh, rtol=1e-4, atol=1e-6)
    assert m_fresh["freshness/policy_lag"] == 0 and m_stale["freshness/policy_lag"] == 1
    # the drift check compares the current policy with its own sampling: with no fresh token it is not measured,
    # and a 0.0 would read as "no drift"
    assert m_fresh["freshness/logprob_drift"] < 1e-4 and "freshness/logprob_drift" not in m_stale


@pytest.mark.parametrize("name", ["pg", "reverse_kl"])
@pytest.mark.parametrize("how", ["top_p", "guided"])
def test_an_unchanged_student_weights_stale_guided_or_top_p_tokens_as_fresh(student, teacher_model, tokenizer, prompts,
                                                                            name, how):
    # Such tokens were drawn from q != pi_own. A distribution objective weighted a stale one by pi_theta / q: with the
    # weights unchanged that is pi_own / q, not 1 (a guided reverse_kl step's gradient halved, cosine 0.75).
    from opd.rollout.guidance import TeacherGuide

    params = SamplingParams(max_new_tokens=10, top_p=0.8 if how == "top_p" else 1.0)
    guide = TeacherGuide(teacher_model, topk=3) if how == "guided" else None
    roll = sample(student, tokenizer, prompts, params, generator=torch.Generator().manual_seed(1), guide=guide)
    assert roll.student_logprobs is not None and not torch.equal(roll.student_logprobs, roll.behaviour_logprobs)
    scores = LocalTeacher(teacher_model).score(roll, full=True)
    fresh, _ = change(student, roll, scores, name=name, version=0, cap=2.0)
    stale, _ = change(student, roll, scores, name=name, version=1, cap=2.0)
    assert fresh.abs().max() > 0
    torch.testing.assert_close(stale, fresh, rtol=1e-4, atol=1e-6)


def test_a_stale_token_whose_ratio_left_the_clip_range_still_learns(student, teacher_model, tokenizer, prompts):
    """PPO's clip around the behaviour policy would zero such a token's gradient; the truncated weight keeps it."""
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10), generator=torch.Generator().manual_seed(1))
    scores = LocalTeacher(teacher_model).score(roll)
    roll.behaviour_logprobs = torch.where(roll.completion_mask.bool(), roll.behaviour_logprobs - 1.0, 0.0)  # r = e
    scores.token_logprobs = scores.token_logprobs.abs() + roll.behaviour_logprobs + 5  # A_t > 0 everywhere
    fresh, _ = change(student, roll, scores, name="pg", version=0, cap=2.0)
    stale, m = change(student, roll, scores, name="pg", version=1, cap=2.0)
    assert fresh.abs().max() == 0  # every ratio is e > 1 + clip_eps with A > 0: clipped, no gradient
    assert stale.abs().max() > 0 and m["stability/clip_frac"] == 1.0  # weight min(e, 2) = 2, counted as truncated
