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


def test_teachers_with_different_topk_cannot_be_merged(student, teacher_model, tokenizer):
    prompts = [Prompt("1+1=", "a"), Prompt("2+2=", "b")]
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    router = TeacherRouter({"default": LocalTeacher(teacher_model, topk=2), "x": LocalTeacher(student, topk=3)},
                           {"b": "x"}, "default")
    with pytest.raises(ValueError, match="same `topk`"):
        router.score(roll)
