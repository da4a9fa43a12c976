"""Routing: each prompt source is scored by its own teacher, answers come back in row order."""

import pytest
import torch

from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.teacher.router import TeacherRouter
from opd.types import Prompt


def test_rows_are_scored_by_their_sources_teacher(student, teacher_model, tokenizer):
    prompts = [Prompt(text=t, source=s) for t, s in
               [("12+3=", "a"), ("9+9=", "b"), ("1+5=", "a"), ("7+8=", "c"), ("44+1=", "b")]]
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=8), generator=torch.Generator().manual_seed(0))
    first, second = LocalTeacher(teacher_model, topk=3), LocalTeacher(student, topk=3)
    router = TeacherRouter({"default": first, "other": second}, {"b": "other"}, "default")
    out = router.score(roll)
    alone_first, alone_second = first.score(roll), second.score(roll)
    for i, p in enumerate(prompts):
        want = alone_second if p.source == "b" else alone_first
        torch.testing.assert_close(out.token_logprobs[i], want.token_logprobs[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.topk_ids[i], want.topk_ids[i])
    assert torch.equal(out.scored_mask, roll.completion_mask)
    rows_b = [1, 4]
    assert out.metrics["teacher/other/tokens"] == int(roll.completion_mask[rows_b].sum())
    assert out.metrics["teacher/default/tokens"] + out.metrics["teacher/other/tokens"] == roll.num_tokens
    assert out.tokens_scored == roll.num_tokens


def test_single_teacher_keeps_its_metrics_flat(student, teacher_model, tokenizer, prompts):
    roll = sample(student, tokenizer, prompts[:2], SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    out = TeacherRouter({"default": LocalTeacher(teacher_model)}, {}, "default").score(roll)
    assert not any(k.startswith("teacher/default/") for k in out.metrics)


class _Edited:
    """A teacher whose answers lose (or gain) a field, as a server's or a cross-tokenizer teacher's do."""

    def __init__(self, teacher, **fields):
        self.teacher, self.fields = teacher, fields

    def score(self, rollout, *, full=False):
        out = self.teacher.score(rollout, full=full)
        for k, v in self.fields.items():
            setattr(out, k, v(rollout) if callable(v) else v)
        return out


def _two_sources(student, tokenizer, **params):
    prompts = [Prompt("1+1=", "a"), Prompt("2+2=", "b"), Prompt("3+3=", "a"), Prompt("4+4=", "b")]
    return sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=6, **params),
                  generator=torch.Generator().manual_seed(0))


def test_teachers_with_different_topk_are_padded_with_empty_entries(student, teacher_model, tokenizer):
    # A config error for topk_kl only; other objectives crashed in the merge at step 1.
    roll = _two_sources(student, tokenizer)
    two, three = LocalTeacher(teacher_model, topk=2), LocalTeacher(student, topk=3)
    out = TeacherRouter({"default": two, "x": three}, {"b": "x"}, "default").score(roll)
    alone_two, alone_three = two.score(roll), three.score(roll)
    assert out.topk_ids.shape[-1] == 3
    for i in (0, 2):
        assert torch.equal(out.topk_ids[i, :, :2], alone_two.topk_ids[i])
        assert torch.isneginf(out.topk_logprobs[i, :, 2]).all()
    for i in (1, 3):
        assert torch.equal(out.topk_ids[i], alone_three.topk_ids[i])


def test_a_teacher_without_entropy_gets_its_top_k_estimate_not_zero(student, teacher_model, tokenizer):
    # The merge zero-filled the rows of a teacher that returns no entropy: no entropy break, weight 1 under downweight.
    from opd.config import ConfigError, FeedbackConfig
    from opd.feedback.broken import handle_broken_prefixes, teacher_entropy

    roll = _two_sources(student, tokenizer)
    local, server_like = LocalTeacher(teacher_model, topk=3), _Edited(LocalTeacher(student, topk=3), entropy=None)
    out = TeacherRouter({"default": local, "x": server_like}, {"b": "x"}, "default").score(roll)
    mask = roll.completion_mask.bool()
    want = teacher_entropy(server_like.score(roll))
    torch.testing.assert_close(out.entropy[1:4:2][mask[1:4:2]], want[1:4:2][mask[1:4:2]])
    assert out.entropy[1:4:2][mask[1:4:2]].min() > 0
    torch.testing.assert_close(out.entropy[0:4:2], local.score(roll).entropy[0:4:2])
    # a teacher with no way to its entropy (no top-k, no distribution): downweight refuses, as for that teacher alone
    bare = _Edited(LocalTeacher(student, topk=0), entropy=None)
    out = TeacherRouter({"default": local, "x": bare}, {"b": "x"}, "default").score(roll)
    with pytest.raises(ConfigError, match="downweight"):
        handle_broken_prefixes(out, roll.completion_mask, FeedbackConfig(broken_prefix="downweight"))


def test_rows_beside_a_cross_tokenizer_teacher_take_a_t_against_the_students_own_logprob(student, teacher_model,
                                                                                        tokenizer):
    # A top-p rollout's behaviour logprob is the nucleus's: A_t of the same-tokenizer rows used it (off by log of
    # the nucleus mass) where compute_feedback and the cross-tokenizer teacher use the student's own.
    roll = _two_sources(student, tokenizer, top_p=0.7)
    assert not torch.equal(roll.policy_logprobs, roll.behaviour_logprobs)
    same = LocalTeacher(teacher_model)
    cross = _Edited(LocalTeacher(student), advantages=lambda r: torch.zeros(r.completion_ids.shape))
    out = TeacherRouter({"default": same, "x": cross}, {"b": "x"}, "default").score(roll)
    mask = roll.completion_mask.bool()
    want = same.score(roll).token_logprobs - roll.policy_logprobs
    torch.testing.assert_close(out.advantages[0:4:2][mask[0:4:2]], want[0:4:2][mask[0:4:2]])
    assert (out.advantages[1:4:2] == 0).all()
