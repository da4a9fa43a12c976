"""Teacher-guided rollouts: the mixture sampler and top-k correction record the distribution they really draw from."""

import math

import pytest
import torch

from opd.logprobs import completion_hidden, per_position
from opd.models import load_model
from opd.rollout import SamplingParams, TeacherGuide, sample
from opd.config import ConfigError
from opd.rollout.guidance import align_vocab, draw, make_guide, mixture_choice, topk_correction_choice
from opd.teacher import LocalTeacher
from opd.types import Prompt


@pytest.fixture(scope="module")
def arith_teacher():
    # A sharp, trained teacher: its top-k and the student's guesses differ a lot (a random one is near-uniform).
    return load_model("builtin:arith-teacher", device="cpu")


@pytest.fixture
def arith_prompts():
    return [Prompt(text=t, source="t") for t in ("47213+38581=", "12345+67890=", "11111+99999=", "50505+40404=")]


def full_student_logprobs(model, roll):
    """[N, V] the student's distribution at every real completion position, recomputed in one pass."""
    h = completion_hidden(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    (lp,) = per_position(model, h, lambda logp, sl: (logp,), roll.temperature, 64)
    return lp


def test_mixture_with_p_zero_is_plain_student_sampling(student, teacher_model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=12)
    plain = sample(student, tokenizer, prompts, params, generator=torch.Generator().manual_seed(3))
    mixed = sample(student, tokenizer, prompts, params, generator=torch.Generator().manual_seed(3),
                   guide=TeacherGuide(teacher_model, mix=0.0))
    assert torch.equal(plain.completion_ids, mixed.completion_ids) and plain.texts == mixed.texts
    # the plain sampler's logprobs may come from opd's C draw (cpu_kernels.sample_rows), the guided one's from
    # torch's log_softmax: the same numbers up to float rounding
    torch.testing.assert_close(plain.behaviour_logprobs, mixed.behaviour_logprobs, rtol=0, atol=1e-5)
    assert torch.equal(mixed.student_logprobs, mixed.behaviour_logprobs)
    assert mixed.teacher_share.abs().sum() == 0
    # importance ratios pi_theta / behaviour, with pi_theta recomputed by the scorer: all 1
    mask = mixed.completion_mask.bool()
    lp = full_student_logprobs(student, mixed).gather(1, mixed.completion_ids[mask][:, None]).squeeze(1)
    torch.testing.assert_close(torch.exp(lp - mixed.behaviour_logprobs[mask]), torch.ones_like(lp), rtol=0, atol=1e-4)


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_recorded_mixture_logprob_is_log_of_the_mixture(student, arith_teacher, tokenizer, arith_prompts, p):
    roll = sample(student, tokenizer, arith_prompts, SamplingParams(max_new_tokens=20, temperature=0.8),
                  generator=torch.Generator().manual_seed(1), guide=TeacherGuide(arith_teacher, mix=p))
    mask = roll.completion_mask.bool()
    ids = roll.completion_ids[mask][:, None]
    student_lp = full_student_logprobs(student, roll).gather(1, ids).squeeze(1)
    teacher_lp = LocalTeacher(arith_teacher).score(roll).token_logprobs[mask]  # at the rollout temperature
    mixture = torch.log(p * teacher_lp.exp() + (1 - p) * student_lp.exp())
    torch.testing.assert_close(roll.behaviour_logprobs[mask], mixture, rtol=0, atol=5e-5)
    torch.testing.assert_close(roll.student_logprobs[mask], student_lp, rtol=0, atol=5e-5)
    torch.testing.assert_close(roll.teacher_share[mask], p * teacher_lp.exp() / mixture.exp(), rtol=0, atol=1e-4)
    # The teacher really steers: its expected share is exactly p (the mixture weight), and an untrained student
    # alone never writes text the teacher finds this likely (its share would be ~0).
    assert float(roll.teacher_share[mask].mean()) > 0.5 * p
    if p == 1.0:
        assert float(teacher_lp.mean()) > -1.0


def test_topk_correction_replaces_exactly_the_proposals_outside_the_teachers_topk():
    V, B, k = 6, 4000, 2
    student = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5]), -1).expand(B, V)
    teacher = torch.log_softmax(torch.tensor([0.0, 3.0, -1.0, 2.5, -2.0, -3.0]), -1).expand(B, V)  # top-2 = {1, 3}
    pick = topk_correction_choice(student, teacher, k, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the draws: the proposal first, then the teacher's sample
    proposal = draw(student.exp(), g)
    in_k = torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.bool)
    pt_k = teacher[0].exp() * in_k / teacher[0].exp()[in_k].sum()  # the teacher restricted to its top-k
    teacher_draw = draw(pt_k.expand(B, V), g)
    outside = ~torch.isin(proposal, torch.tensor([1, 3]))
    assert torch.equal(pick.teacher_share.bool(), outside)  # replaced <=> proposed outside the top-k
    assert torch.equal(pick.tokens[~outside], proposal[~outside])  # the others are the student's own
    assert torch.equal(pick.tokens[outside], teacher_draw[outside])  # replacements are teacher samples
    assert torch.isin(pick.tokens, torch.tensor([1, 3])).all()  # so every token is in the teacher's top-k
    # The recorded behaviour distribution q is the one the tokens follow, it sums to 1, and q >= pi_theta on K.
    ps = student[0].exp()
    q = ps * in_k + ps[~in_k].sum() * pt_k
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6) and (q[in_k] >= ps[in_k]).all()
    torch.testing.assert_close(pick.behaviour_logprobs, q.log()[pick.tokens])
    torch.testing.assert_close(pick.student_logprobs, student[0][pick.tokens])
    freq = torch.bincount(pick.tokens, minlength=V).float() / B
    assert (freq - q).abs().max() < 0.03  # 4000 draws: sd <= 0.008


def test_mixture_draws_follow_the_recorded_distribution():
    V, B, p = 5, 4000, 0.25
    student = torch.log_softmax(torch.tensor([2.0, 0.0, 0.0, -1.0, 1.0]), -1).expand(B, V)
    teacher = torch.log_softmax(torch.tensor([-2.0, 3.0, 0.0, 0.0, -1.0]), -1).expand(B, V)
    pick = mixture_choice(student, teacher, p, torch.Generator().manual_seed(0))
    q = p * teacher[0].exp() + (1 - p) * student[0].exp()
    torch.testing.assert_close(pick.behaviour_logprobs, q.log()[pick.tokens])
    freq = torch.bincount(pick.tokens, minlength=V).float() / B
    assert (freq - q).abs().max() < 0.03
    # expected share of teacher-drawn tokens: sum_v p * pi_T(v) = p
    assert float(pick.teacher_share.mean()) == pytest.approx(p, abs=0.03)


def test_topk_correction_in_the_sampler(student, arith_teacher, tokenizer, arith_prompts):
    k = 2
    roll = sample(student, tokenizer, arith_prompts * 2, SamplingParams(max_new_tokens=20),
                  generator=torch.Generator().manual_seed(2), guide=TeacherGuide(arith_teacher, topk=k))
    mask = roll.completion_mask.bool()
    tokens = roll.completion_ids[mask]
    scores = LocalTeacher(arith_teacher, topk=k).score(roll, full=True)
    replaced = roll.teacher_share[mask].bool()
    in_topk = (scores.topk_ids[mask] == tokens[:, None]).any(1)
    assert replaced.any() and (~replaced).any()
    assert in_topk.all()  # kept or replaced, every token is one of the teacher's top-k
    # behaviour logprob = log q, q(v) = pi_S(v) [v in K] + pi_S(outside K) pi_T(v | K), from recomputed distributions
    ps = full_student_logprobs(student, roll).exp()
    in_k = torch.zeros_like(ps, dtype=torch.bool).scatter(1, scores.topk_ids[mask], True)
    pt_k = scores.full_logprobs[mask].exp() * in_k
    pt_k = pt_k / pt_k.sum(1, keepdim=True)
    q = ps * in_k + (ps * ~in_k).sum(1, keepdim=True) * pt_k
    torch.testing.assert_close(roll.behaviour_logprobs[mask], q.gather(1, tokens[:, None]).squeeze(1).log(),
                               rtol=0, atol=1e-4)


def test_align_vocab_pads_or_cuts_the_teachers_head():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert align_vocab(logits, 5)[0, 3:].tolist() == [-math.inf, -math.inf]
    assert align_vocab(logits, 2).tolist() == [[1.0, 2.0]]


def test_make_guide_needs_local_weights_and_the_students_vocabulary(teacher_model, tokenizer, monkeypatch):
    import opd.models

    assert make_guide(0.0, 0, None, tokenizer, "not-even-a-model") is None  # off: nothing is checked or loaded
    guide = make_guide(0.3, 0, teacher_model, tokenizer, "builtin:arith-teacher")
    assert guide.model is teacher_model and guide.mix == 0.3 and guide.topk == 0
    with pytest.raises(ConfigError, match="server"):
        make_guide(0.3, 0, None, tokenizer, "builtin:arith-teacher")

    class OtherVocab:
        def get_vocab(self):
            return {"a": 0}

    monkeypatch.setattr(opd.models, "load_tokenizer", lambda spec: OtherVocab())
    with pytest.raises(ConfigError, match="shared tokenizer"):
        make_guide(0.0, 4, teacher_model, tokenizer, "other-family")


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    # Unnormalised rows, zeros at both ends and in the middle, one tiny mass: frequencies within sampling error.
    probs = torch.tensor([0.0, 3.0, 0.0, 1.0, 1e-9, 4.0, 0.0])
    B = 20000
    tok = draw(probs.expand(B, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=7).double() / B
    want = probs.double() / probs.sum()
    assert (freq - want).abs().max() < 0.015  # sd <= 0.0035
    assert freq[[0, 2, 6]].sum() == 0
    # Seeded: the same generator state gives the same tokens; a one-hot row always gives its token.
    again = draw(probs.expand(B, -1), torch.Generator().manual_seed(0))
    assert torch.equal(tok, again)
    onehot = torch.zeros(3, 5)
    onehot[torch.arange(3), torch.tensor([0, 4, 2])] = 1.0
    assert draw(onehot, None).tolist() == [0, 4, 2]
