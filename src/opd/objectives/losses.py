"""Stage 5 losses, per token. Each returns a [N] tensor over the batch's completion tokens;
the update averages them (per token or per sequence) and adds the optional KL-to-reference.

- pg:         -min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t), r_t = pi_theta / pi_behaviour.
              At r = 1 its gradient is -A_t grad log pi_theta(a_t): with A_t = log pi_T - log pi_theta
              this is a single-sample estimate of grad KL(pi_theta || pi_T) (the Tinker/TM recipe).
- reverse_kl: sum_v p_theta(v) (log p_theta(v) - log p_T(v)) at each student state.
- gkd:        beta KL(p_T || M) + (1-beta) KL(p_theta || M), M = beta p_T + (1-beta) p_theta;
              beta = 0 is forward KL(p_T || p_theta), beta = 1 reverse KL(p_theta || p_T) (TRL's convention).
- topk_kl:    KL over the teacher's top-k tokens plus one tail bin holding the remaining mass.
- hybrid:     pg with A_t = opd_weight A_t + reward_weight (group-normalised task reward).
"""

from __future__ import annotations

import math

import torch


def pg_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, clip_eps: float):
    """Returns (per-token loss, ratio, clipped mask)."""
    ratio = torch.exp(new_lp - old_lp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).detach()
    return loss, ratio.detach(), was_clipped


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    teacher_logp = teacher_logp.to(student_logp.dtype)
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    teacher_logp = teacher_logp.to(student_logp.dtype)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    teacher_logp = teacher_logp.to(student_logp.dtype)
    mix = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0
    )
    kl_t = (teacher_logp.exp() * (teacher_logp - mix)).sum(-1)
    kl_s = (student_logp.exp() * (student_logp - mix)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _log1mexp(lse: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so an (almost) empty tail stays finite."""
    return torch.log1p(-lse.exp().clamp(max=1 - 1e-6))


def topk_kl(
    student_logp: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, direction: str = "forward"
) -> torch.Tensor:
    """KL over K+1 bins: the teacher's top-k tokens and one tail bin with the rest of the mass. An entry with a
    -inf teacher logprob is empty (TeacherScores.fit_vocab: an id past the student's head): it is no bin."""
    t_k = topk_logp.to(student_logp.dtype)
    empty = torch.isneginf(t_k)
    any_empty = bool(empty.any())
    s_k = student_logp.gather(-1, topk_ids)
    if any_empty:
        s_k = s_k.masked_fill(empty, float("-inf"))
    s = torch.cat([s_k, _log1mexp(torch.logsumexp(s_k, -1))[..., None]], -1)
    t = torch.cat([t_k, _log1mexp(torch.logsumexp(t_k, -1))[..., None]], -1)
    if any_empty:  # finite stand-ins where a bin is empty, and no term: 0 * (-inf) is NaN, also in backward
        keep = torch.cat([~empty, torch.ones_like(empty[..., :1])], -1)
        s, t = torch.where(keep, s, 0.0), torch.where(keep, t, 0.0)
        p = (t if direction == "forward" else s).exp()
        return torch.where(keep, p * ((t - s) if direction == "forward" else (s - t)), 0.0).sum(-1)
    if direction == "forward":
        return (t.exp() * (t - s)).sum(-1)
    return (s.exp() * (s - t)).sum(-1)


def kl_to_reference(new_lp: torch.Tensor, ref_lp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) on sampled tokens: exp(d) - d - 1 with d = ref - new (>= 0)."""
    d = ref_lp - new_lp
    return torch.exp(d) - d - 1
