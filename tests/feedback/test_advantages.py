import pytest
import torch

from opd.config import FeedbackConfig
from opd.feedback import compute_feedback, discounted_returns, group_normalised_rewards, whiten
from opd.types import Prompt, Rollout, TeacherScores


def make(behaviour, teacher, mask, scored=None):
    B, T = behaviour.shape
    roll = Rollout(
        prompts=[Prompt("p", "t")] * B, prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
        completion_ids=torch.ones(B, T, dtype=torch.long), completion_mask=mask, behaviour_logprobs=behaviour,
        policy_version=torch.zeros(B, dtype=torch.long), texts=[""] * B, finished=torch.ones(B, dtype=torch.bool),
    )
    return roll, TeacherScores(token_logprobs=teacher, scored_mask=mask if scored is None else scored)


def test_advantage_signs_and_masks():
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -9.0]])
    teacher = torch.tensor([[-0.5, -4.0, -0.5], [-1.0, -7.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    fb = compute_feedback(*make(behaviour, teacher, mask), FeedbackConfig())
    # A_t = log pi_T - log pi_theta: positive where the teacher likes the token more.
    assert fb.advantages.tolist() == [[0.5, -2.0, 0.0], [2.0, -6.0, 0.0]]
    assert fb.loss_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert fb.metrics["opd/advantage_mean"] == pytest.approx((0.5 - 2 + 0 + 2 - 6) / 5)
    assert fb.metrics["opd/advantage_pos_frac"] == pytest.approx(2 / 5)


def test_unscored_tokens_never_enter_the_loss():
    behaviour = torch.full((1, 3), -1.0)
    teacher = torch.tensor([[-0.5, 0.0, -2.0]])
    scored = torch.tensor([[1, 0, 1]])
    fb = compute_feedback(*make(behaviour, teacher, torch.ones(1, 3, dtype=torch.long), scored), FeedbackConfig())
    assert fb.loss_mask.tolist() == [[1, 0, 1]] and fb.advantages[0, 1] == 0


def test_clip_and_discount_and_whiten():
    behaviour = torch.zeros(1, 3)
    teacher = torch.tensor([[3.0, -1.0, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.long)
    fb = compute_feedback(*make(behaviour, teacher, mask), FeedbackConfig(clip=1.0))
    assert fb.advantages.tolist() == [[1.0, -1.0, 0.5]] and fb.metrics["feedback/clip_frac"] == pytest.approx(1 / 3)
    fb = compute_feedback(*make(behaviour, teacher, mask), FeedbackConfig(gamma=0.5))
    # G_2 = 0.5, G_1 = -1 + 0.25, G_0 = 3 + 0.5 * -0.75
    torch.testing.assert_close(fb.advantages, torch.tensor([[3.0 - 0.375, -0.75, 0.5]]))
    fb = compute_feedback(*make(behaviour, teacher, mask), FeedbackConfig(normalize=True))
    torch.testing.assert_close(fb.advantages.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(fb.advantages.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert fb.raw_advantages.tolist() == [[3.0, -1.0, 0.5]]


def test_discount_stops_at_padding():
    v = torch.tensor([[1.0, 1.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert discounted_returns(v, m, 1.0).tolist() == [[2.0, 1.0, 0.0]]


def test_whiten_ignores_masked_values():
    v = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    w = whiten(v, m)
    assert w[0, 2] == 0 and abs(float(w[0, 0] + w[0, 1])) < 1e-6


def test_group_normalised_rewards_and_hybrid():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    g = group_normalised_rewards(r, 2)
    assert g[0] > 0 > g[1] and abs(float(g[2])) < 1e-6 and abs(float(g[3])) < 1e-6
    behaviour = torch.zeros(4, 2)
    teacher = torch.full((4, 2), -1.0)
    fb = compute_feedback(*make(behaviour, teacher, torch.ones(4, 2, dtype=torch.long)), FeedbackConfig(),
                          rewards=r, reward_weight=2.0, opd_weight=0.5, group_size=2)
    torch.testing.assert_close(fb.advantages[:, 0], 0.5 * -1.0 + 2.0 * g)


def test_discount_runs_on_through_an_unscored_token_inside_a_completion():
    # A cross-tokenizer teacher can leave a token unscored mid-completion; the tokens before it still get the
    # discounted credit of the later ones (the docstring's sum over k >= t), and the unscored token itself gets 0.
    v = torch.tensor([[0.0, 0.0, 7.0, -5.0, -5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    g = 0.9
    later = -5 + g * -5  # G at position 3
    expected = torch.tensor([[g**3 * later, g**2 * later, 0.0, later, -5.0]])
    torch.testing.assert_close(discounted_returns(v, m, g), expected)


def test_whitening_under_data_parallelism_uses_the_whole_batchs_statistics():
    # Each rank holds its share of the batch; whitening each share by its own mean and std would make A_t depend
    # on the world size. sum_over_ranks hands whiten the sums of every rank's statistics.
    torch.manual_seed(0)
    values = torch.randn(6, 5) * 2 + 0.5
    mask = (torch.rand(6, 5) > 0.3).float()
    whole = whiten(values, mask)
    shares = [(values[:3], mask[:3]), (values[3:], mask[3:])]

    def stats(v, m):
        sel = v[m.bool()].double()
        return [float(m.sum()), float(sel.sum()), float((sel * sel).sum())]

    totals = [a + b for a, b in zip(*(stats(v, m) for v, m in shares))]
    per_rank = torch.cat([whiten(v, m, sum_over_ranks=lambda mine: totals) for v, m in shares])
    torch.testing.assert_close(per_rank, whole, rtol=1e-5, atol=1e-6)
    alone = torch.cat([whiten(v, m) for v, m in shares])
    assert (alone - whole).abs().max() > 1e-3  # the rank-local statistics differ: the test can fail


def test_the_teacher_free_control_is_exactly_the_constant():
    # The control's "scores" are behaviour + c; behaviour + c - behaviour is c only up to fp32 rounding (and, for a
    # top-p rollout, the student's own logprob is not the behaviour one): A_t is set to c itself.
    behaviour = torch.tensor([[-1e-3, -17.3, -0.123456], [-3.7, -1e-7, -9.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    roll, scores = make(behaviour, behaviour - 0.5, mask)
    roll.student_logprobs = behaviour - 0.25
    fb = compute_feedback(roll, scores, FeedbackConfig(constant_advantage=-0.5))
    assert fb.advantages[mask.bool()].tolist() == [-0.5] * 5


@pytest.mark.parametrize("shaping", [{"normalize": True}, {"gamma": 0.9}, {"clip": 0.2}])
def test_the_control_refuses_settings_that_would_change_its_constant(shaping):
    from opd.config import ConfigError, load_config

    sets = ["objective.name='pg'", "feedback.constant_advantage=-0.5"] + [f"feedback.{k}={str(v).lower()}"
                                                                         for k, v in shaping.items()]
    with pytest.raises(ConfigError, match="feedback.normalize = false"):
        load_config(None, sets)
    load_config(None, sets[:2] + ["feedback.clip=1.0"])  # a clip the constant stays inside is fine
