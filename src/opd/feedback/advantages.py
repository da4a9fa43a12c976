"""Stage 4: token feedback A_t = log pi_T(a_t | s_t) - log pi_theta(a_t | s_t).

A_t > 0 where the teacher likes the sampled token more than the student did (push it up),
A_t < 0 where the teacher rates it poorly (push it down). The student logprob is the behaviour
logprob recorded at sampling time: the update's first forward recomputes it and the two must
agree while the policy has not changed (reported as freshness/logprob_drift).

Options, applied in this order: clip to [-c, c]; discounted return with gamma (0 keeps the
per-token signal; > 0 gives MiniLLM-style credit to earlier tokens for later disagreement);
whitening over the batch. For `hybrid`, a GRPO-style group-normalised task reward is added.
Broken prefixes are found first (opd.feedback.broken); with broken_prefix = "truncate" the tokens
past the cut are out of every one of these steps, with "downweight" only their loss weight changes.

With teacher-guided rollouts the behaviour logprob is the guided distribution's; A_t still
compares the teacher with the *student's* logprob of the token (Rollout.policy_logprobs).
"""

from __future__ import annotations

import torch

from opd.config import FeedbackConfig
from opd.feedback.broken import handle_broken_prefixes
from opd.types import Feedback, Rollout, TeacherScores


def discounted_returns(values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k-t) * v_k within each sequence (masked tokens contribute 0, and the sum runs on
    through them: an unscored token inside a completion does not cut earlier tokens off from later feedback).
    Masked positions get G = 0."""
    out = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype)
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] * mask[:, t] + gamma * running
        out[:, t] = running * mask[:, t]
    return out


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6, sum_over_ranks=None) -> torch.Tensor:
    """(values - mean) / (std + eps) over the masked tokens; with data parallelism `sum_over_ranks` (list of floats ->
    their sums over every rank) makes the mean and std the whole batch's, not each rank's share's."""
    m = mask.bool()
    sel = values[m].double()
    n, s, ss = float(m.sum()), float(sel.sum()), float((sel * sel).sum())
    if sum_over_ranks is not None:
        n, s, ss = sum_over_ranks([n, s, ss])
    if n < 2:
        return values * mask
    mean = s / n
    std = max((ss - n * mean * mean) / (n - 1), 0.0) ** 0.5  # unbiased, as torch.std
    return ((values - mean) / (std + eps)) * mask


def group_normalised_rewards(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - mean of its group) / (std of its group + eps); groups are consecutive rows."""
    g = rewards.view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).flatten()


def compute_feedback(
    rollout: Rollout,
    scores: TeacherScores,
    cfg: FeedbackConfig,
    *,
    rewards: torch.Tensor | None = None,
    reward_weight: float = 1.0,
    opd_weight: float = 1.0,
    group_size: int = 1,
    sum_over_ranks=None,
) -> Feedback:
    # A token enters the loss only if it is a real completion token the teacher scored.
    mask = (rollout.completion_mask * scores.scored_mask).float()
    scored = mask
    # A cross-tokenizer teacher hands over A_t itself (one advantage per aligned chunk of text).
    teacher_adv = (scores.advantages if scores.advantages is not None
                   else scores.token_logprobs - rollout.policy_logprobs)
    if cfg.constant_advantage is not None:  # the teacher-free control: exactly c, not its "scores" minus a logprob
        teacher_adv = torch.full_like(mask, cfg.constant_advantage)
    # where, not a product: a NaN/inf teacher number at a masked-out token must stay out (NaN * 0 = NaN).
    raw = torch.where(mask > 0, teacher_adv, 0.0)
    metrics: dict[str, float] = {}
    loss_weight = torch.ones_like(mask)
    if cfg.constant_advantage is None:  # the teacher-free control's "scores" are not the teacher's
        broken = handle_broken_prefixes(scores, mask, cfg)
        loss_weight = broken.loss_weight
        metrics.update(broken.metrics)
    train_mask = mask * (loss_weight > 0)  # truncated tokens leave every step below, not only the loss
    adv = torch.where(train_mask > 0, raw, 0.0)
    if cfg.clip > 0:
        metrics["feedback/clip_frac"] = _masked_mean(((adv.abs() > cfg.clip).float()), train_mask)
        adv = adv.clamp(-cfg.clip, cfg.clip)
    if cfg.gamma > 0:
        adv = discounted_returns(adv, train_mask, cfg.gamma)
    if cfg.normalize:
        adv = whiten(adv, train_mask, sum_over_ranks=sum_over_ranks)
    if rewards is not None:
        shaped = group_normalised_rewards(rewards.float(), group_size)
        if scores.rewards is not None:
            # Rows a score-only teacher rewarded have no token scores; their whole completion takes the
            # (sparse) sequence-level signal. Both views keep the loss mask consistent with the advantages.
            by_reward = torch.isfinite(scores.rewards)[:, None]
            train_mask = torch.where(by_reward, rollout.completion_mask.float(), train_mask)
            loss_weight = torch.where(by_reward, torch.ones_like(loss_weight), loss_weight)
            metrics["reward/teacher_rows"] = float(by_reward.sum())
        adv = opd_weight * adv + reward_weight * shaped[:, None] * train_mask
        metrics["reward/mean"] = float(rewards.float().mean())
    if bool((scored > 0).any()):  # no scored token (a teacher that answered nothing): no figure, not a made-up 0
        metrics["opd/advantage_mean"] = _masked_mean(raw, scored)
        metrics["opd/advantage_pos_frac"] = _masked_mean((raw > 0).float(), scored)
    return Feedback(advantages=adv.detach(), loss_mask=train_mask * loss_weight, raw_advantages=raw.detach(),
                    rewards=rewards, metrics=metrics)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0
