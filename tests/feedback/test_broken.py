"""Broken-prefix detection on constructed sequences with known break points, and what each handling does."""

import math

import pytest
import torch

from opd.config import ConfigError, FeedbackConfig
from opd.feedback import compute_feedback
from opd.feedback.broken import NO_BREAK, find_breaks, handle_broken_prefixes, teacher_entropy, windowed_mean
from opd.types import Prompt, Rollout, TeacherScores

GOOD, BAD = -0.1, -9.0


def make(teacher, mask=None, behaviour=None, entropy=None):
    B, T = teacher.shape
    mask = torch.ones(B, T, dtype=torch.long) if mask is None else mask
    behaviour = torch.full((B, T), -0.5) if behaviour is None else behaviour
    roll = Rollout(
        prompts=[Prompt("p", "t")] * B, prompt_ids=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long), completion_ids=torch.ones(B, T, dtype=torch.long),
        completion_mask=mask, behaviour_logprobs=behaviour, policy_version=torch.zeros(B, dtype=torch.long),
        texts=[""] * B, finished=torch.ones(B, dtype=torch.bool),
    )
    return roll, TeacherScores(token_logprobs=teacher, scored_mask=mask.clone(), entropy=entropy)


def seq(*values):
    return torch.tensor([list(values)], dtype=torch.float32)


def test_windowed_mean_by_hand():
    v = seq(1.0, 2.0, 3.0, 4.0, 100.0)
    m = torch.tensor([[1, 1, 1, 1, 0]])
    # window 2, the last two scored values: [1], [1,2], [2,3], [3,4], [3,4] (the masked 100 never counts)
    torch.testing.assert_close(windowed_mean(v, m, 2), seq(1.0, 1.5, 2.5, 3.5, 3.5))
    torch.testing.assert_close(windowed_mean(v, m, 10), seq(1.0, 1.5, 2.0, 2.5, 2.5))


def test_the_window_counts_scored_tokens_and_survives_an_infinite_logprob():
    # Holes in the scored mask (a cross-tokenizer teacher's unaligned tokens) shrank a window counted in positions,
    # so one unlikely token broke a sequence the window should have smoothed; and a scored -inf made every later
    # window -inf - (-inf) = NaN, so recovery after it was never seen.
    g = -0.1
    v = seq(g, 0, g, 0, g, 0, -9.0, 0, g, 0, g, 0, g)
    m = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]])
    assert float(windowed_mean(v, m, 4)[0, 12]) == pytest.approx((-9.0 + 3 * g) / 4)  # the last 4 scored tokens
    assert bool((windowed_mean(v, m, 4)[0][m[0].bool()] > -3.0).all())  # never below the default threshold
    w = windowed_mean(seq(float("-inf"), *[g] * 7), torch.ones(1, 8, dtype=torch.long), 4)
    assert bool(torch.isfinite(w).all()) and float(w[0, 0]) < -1000 and w[0, 4:].tolist() == pytest.approx([g] * 4)


@pytest.mark.parametrize(
    "values, window, threshold, expected",
    [
        # a clean sequence never breaks
        ([GOOD] * 8, 4, -3.0, NO_BREAK),
        # a run of bad tokens from position 3: window 1 breaks on the first bad token
        ([GOOD] * 3 + [BAD] * 5, 1, -3.0, 3),
        # window 2: mean(GOOD, BAD) = -4.55 < -3 already at position 3
        ([GOOD] * 3 + [BAD] * 5, 2, -3.0, 3),
        # window 4: means at 3, 4 are (-0.3-9)/4 = -2.33, (-0.2-18)/4 = -4.55 -> position 4
        ([GOOD] * 3 + [BAD] * 5, 4, -3.0, 4),
        # one isolated unlikely token is smoothed away by a window of 4 ...
        ([GOOD] * 3 + [BAD] + [GOOD] * 4, 4, -3.0, NO_BREAK),
        # ... but not by a window of 1
        ([GOOD] * 3 + [BAD] + [GOOD] * 4, 1, -3.0, 3),
        # a broken start (a partial window of one token is enough)
        ([BAD] + [GOOD] * 7, 4, -3.0, 0),
        # the threshold decides: mean of (GOOD, BAD) is -4.55, above -5
        ([GOOD] * 3 + [BAD] + [GOOD] * 4, 2, -5.0, NO_BREAK),
    ],
)
def test_detection_finds_the_known_break(values, window, threshold, expected):
    pos = find_breaks(seq(*values), torch.ones(1, len(values)), window=window, threshold=threshold)
    assert pos.tolist() == [expected]


def test_padding_never_breaks_and_rows_are_independent():
    teacher = torch.tensor([[GOOD, GOOD, BAD, BAD], [GOOD, GOOD, GOOD, BAD], [BAD, GOOD, GOOD, GOOD]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])  # row 1's BAD is padding; row 2 is empty
    assert find_breaks(teacher, mask, window=1, threshold=-3.0).tolist() == [2, NO_BREAK, NO_BREAK]


def test_entropy_spike_is_a_break_only_when_asked():
    teacher = seq(*[GOOD] * 6)
    entropy = seq(0.1, 0.1, 0.1, 2.5, 0.1, 0.1)
    assert find_breaks(teacher, torch.ones(1, 6), window=2, threshold=-3.0, entropy=entropy).tolist() == [NO_BREAK]
    assert find_breaks(teacher, torch.ones(1, 6), window=2, threshold=-3.0, entropy=entropy,
                       entropy_threshold=2.0).tolist() == [3]
    with pytest.raises(ConfigError, match="break_entropy"):
        find_breaks(teacher, torch.ones(1, 6), window=2, threshold=-3.0, entropy_threshold=2.0)


def test_metrics_broken_frac_break_pos_and_entropy():
    teacher = torch.tensor([[GOOD, BAD, BAD, BAD], [GOOD] * 4, [GOOD, GOOD, GOOD, BAD], [GOOD] * 4])
    entropy = torch.full((4, 4), 0.5)
    entropy[0] = 1.5
    roll, scores = make(teacher, entropy=entropy)
    fb = compute_feedback(roll, scores, FeedbackConfig(break_window=1))
    assert fb.metrics["teacher/broken_frac"] == 0.5
    assert fb.metrics["teacher/break_pos_mean"] == (1 + 3) / 2
    assert fb.metrics["teacher/entropy"] == pytest.approx((4 * 1.5 + 12 * 0.5) / 16)
    assert fb.metrics["feedback/tokens_dropped"] == 0  # "keep" keeps everything
    assert fb.loss_mask.tolist() == [[1.0] * 4] * 4
    clean = compute_feedback(*make(torch.full((2, 4), GOOD)), FeedbackConfig())
    assert clean.metrics["teacher/broken_frac"] == 0 and "teacher/break_pos_mean" not in clean.metrics


def test_truncate_drops_every_token_past_the_cut():
    teacher = torch.tensor([[GOOD, GOOD, BAD, BAD, BAD, GOOD], [GOOD] * 6])
    roll, scores = make(teacher)
    fb = compute_feedback(roll, scores, FeedbackConfig(break_window=1, broken_prefix="truncate", keep_after_break=1))
    # break at 2, one more token kept: positions 0..3 train, 4..5 do not; the clean row keeps all.
    assert fb.loss_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert fb.advantages[0, 4:].tolist() == [0.0, 0.0]
    assert fb.metrics["feedback/tokens_dropped"] == 2
    fb0 = compute_feedback(roll, scores, FeedbackConfig(break_window=1, broken_prefix="truncate"))
    assert fb0.loss_mask[0].tolist() == [1, 1, 1, 0, 0, 0]  # keep_after_break = 0 keeps the breaking token itself


def test_keep_after_break_counts_scored_tokens_past_holes_in_the_mask():
    # A cross-tokenizer teacher leaves some student tokens unscored; keep_after_break = 2 keeps two scored tokens
    # after the break, not two positions (which here would have kept one).
    teacher = torch.tensor([[GOOD, GOOD, BAD, 0.0, GOOD, 0.0, GOOD, GOOD]])
    roll, scores = make(teacher)
    scores.scored_mask = torch.tensor([[1, 1, 1, 0, 1, 0, 1, 1]])
    fb = compute_feedback(roll, scores, FeedbackConfig(break_window=1, broken_prefix="truncate", keep_after_break=2))
    assert fb.loss_mask.tolist() == [[1, 1, 1, 0, 1, 0, 1, 0]]  # the break at 2, then the scored 4 and 6


def test_truncated_tokens_cannot_reach_earlier_advantages_through_returns_or_whitening():
    cfg = FeedbackConfig(break_window=1, broken_prefix="truncate", gamma=0.9, normalize=True, clip=5.0)
    teacher = torch.tensor([[GOOD, -1.0, BAD, -2.0, -3.0, -4.0], [GOOD, -0.3, -0.7, -1.0, -0.2, -0.4]])
    a = compute_feedback(*make(teacher.clone()), cfg)
    garbage = teacher.clone()
    garbage[0, 3:] = torch.tensor([float("nan"), float("inf"), -1e9])  # past the cut (break at 2)
    b = compute_feedback(*make(garbage), cfg)
    assert torch.equal(a.advantages, b.advantages) and torch.isfinite(b.advantages).all()
    assert torch.equal(a.loss_mask, b.loss_mask)
    # With "keep" the same garbage does reach the advantages (the comparison above can fail).
    kept = compute_feedback(*make(garbage), FeedbackConfig(break_window=1, gamma=0.9))
    assert not torch.isfinite(kept.advantages[0, :3]).all()


def test_downweight_uses_the_teachers_confidence_and_keeps_the_scale_of_the_loss():
    teacher = torch.full((1, 4), GOOD)
    entropy = seq(0.0, math.log(2), math.log(4), 0.0)
    fb = compute_feedback(*make(teacher, entropy=entropy), FeedbackConfig(broken_prefix="downweight"))
    torch.testing.assert_close(fb.loss_mask, seq(1.0, 0.5, 0.25, 1.0))
    assert fb.metrics["feedback/tokens_dropped"] == 0
    assert fb.metrics["feedback/loss_weight_mean"] == pytest.approx(2.75 / 4)


def test_teacher_entropy_from_full_or_topk_when_not_returned():
    full = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    scores = TeacherScores(token_logprobs=torch.zeros(1, 1), scored_mask=torch.ones(1, 1), full_logprobs=full)
    assert float(teacher_entropy(scores)) == pytest.approx(1.5 * math.log(2))
    topk = TeacherScores(token_logprobs=torch.zeros(1, 1), scored_mask=torch.ones(1, 1),
                         topk_logprobs=full[..., :1], topk_ids=torch.zeros(1, 1, 1, dtype=torch.long))
    # top-1 (0.5) plus one tail bin of 0.5: log 2, a lower bound on the true 1.5 log 2
    assert float(teacher_entropy(topk)) == pytest.approx(math.log(2))


def test_feedback_compares_the_teacher_with_the_students_own_logprob_on_guided_rollouts():
    teacher = seq(-1.0, -2.0)
    roll, scores = make(teacher, behaviour=seq(-0.1, -0.1))
    roll.student_logprobs = seq(-3.0, -0.5)  # the behaviour logprob is the guided distribution's
    fb = compute_feedback(roll, scores, FeedbackConfig())
    assert fb.raw_advantages.tolist() == [[2.0, -1.5]]


def test_handle_broken_prefixes_needs_entropy_to_downweight():
    scores = TeacherScores(token_logprobs=seq(GOOD, GOOD), scored_mask=torch.ones(1, 2))
    with pytest.raises(ConfigError, match="teacher.topk > 0"):
        handle_broken_prefixes(scores, torch.ones(1, 2), FeedbackConfig(broken_prefix="downweight"))


def test_a_nan_here_and_there_is_no_missing_entropy_but_a_row_without_any_is():
    # An overflow's NaN at one position was taken for "this teacher returns no entropy" (exit 2, "a server"), where
    # the non-finite guard skips the step; a routed teacher without entropy leaves its whole rows NaN.
    lp = torch.full((2, 3), GOOD)
    spotty = TeacherScores(token_logprobs=lp, scored_mask=torch.ones(2, 3),
                           entropy=torch.tensor([[0.5, float("nan"), 0.5], [0.5, 0.5, 0.5]]))
    out = handle_broken_prefixes(spotty, torch.ones(2, 3), FeedbackConfig(broken_prefix="downweight"))
    assert out.loss_weight[1].tolist() == pytest.approx([math.exp(-0.5)] * 3)
    missing = TeacherScores(token_logprobs=lp, scored_mask=torch.ones(2, 3),
                            entropy=torch.tensor([[0.5, 0.5, 0.5], [float("nan")] * 3]))
    with pytest.raises(ConfigError, match="teacher.topk > 0"):
        handle_broken_prefixes(missing, torch.ones(2, 3), FeedbackConfig(broken_prefix="downweight"))
