"""Teacher-guided rollouts: the teacher takes part in choosing the student's tokens.

A weak student walks into prefixes the teacher cannot give useful feedback on. Two ways to keep it
near text the teacher understands, both recording the exact probability q(a_t) with which each token
was actually drawn as its behaviour logprob, so the importance ratio pi_theta / q stays exact:

- mixture (MiniLLM's teacher-mixed sampling): a_t ~ q = p * pi_T + (1 - p) * pi_theta.
  Drawn once from q (opd's one `draw`), so p = 0 gives exactly the plain student draw.
- top-k correction (speculative-KD style): the student proposes x ~ pi_theta; if x is outside the
  teacher's top-k K it is replaced by y ~ pi_T restricted to K (renormalised), so every token of
  the rollout is one of the teacher's top-k. The token's distribution is then
  q(v) = pi_theta(v) + (1 - pi_theta(K)) * pi_T(v) / pi_T(K) for v in K, 0 outside; q >= pi_theta
  on its support, so pi_theta / q <= 1. (A replacement from the teacher's full distribution could
  land outside K again, where q is tiny and pi_theta / q explodes.)

Each token also gets a teacher share: 1 for a replaced token (0 for a kept one); under the mixture,
the probability that it came from the teacher's component, p * pi_T(a) / q(a) (the draw itself
does not say). Its mean is rollout/teacher_token_frac.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config import ConfigError


@dataclass
class TeacherGuide:
    model: torch.nn.Module  # the teacher, stepped alongside the student with its own KV cache
    mix: float = 0.0  # p of the mixture p * pi_T + (1 - p) * pi_theta
    topk: int = 0  # > 0: top-k correction instead of the mixture


@dataclass
class GuidedChoice:
    tokens: torch.Tensor  # [B]
    behaviour_logprobs: torch.Tensor  # [B] log q(a_t), the distribution actually drawn from
    student_logprobs: torch.Tensor  # [B] log pi_theta(a_t)
    teacher_share: torch.Tensor  # [B] in [0, 1]


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (unnormalised) probabilities [B, V], by inverse CDF: one uniform per row, searched
    in the float64 running sum (so a token of mass 1e-12 keeps its chance, and one of mass 0 is never drawn).
    torch.multinomial draws an exponential for every vocabulary entry instead: ~3 ms a step at a 49k vocabulary
    on 2 CPU cores, 15-20% of a small-batch decode step. Every sampler of the rollout draws through this."""
    return inverse_cdf(probs, uniforms(probs.shape[0], generator, probs.device))


def uniforms(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """n float64 uniforms in (0, 1]: what draw spends of the generator for n rows."""
    return 1.0 - torch.rand((n,), generator=generator, dtype=torch.float64, device=device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token of each row whose running sum of (unnormalised) probability reaches u [B] of the total."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _pick(logp: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    return logp.gather(1, tok[:, None]).squeeze(1)


def mixture_choice(student_logp: torch.Tensor, teacher_logp: torch.Tensor, p: float,
                   generator: torch.Generator | None) -> GuidedChoice:
    """a_t ~ p * pi_T + (1 - p) * pi_theta, given both distributions' logprobs [B, V]."""
    parts = [student_logp + torch.log1p(torch.tensor(-p)) if p < 1 else torch.full_like(student_logp, float("-inf"))]
    parts.append(teacher_logp + torch.log(torch.tensor(p)) if p > 0 else torch.full_like(teacher_logp, float("-inf")))
    mix = torch.logsumexp(torch.stack(parts), dim=0)  # p = 0: exactly student_logp (log(e^x + 0) = x)
    tok = draw(mix.exp(), generator)
    behaviour = _pick(mix, tok)
    share = torch.exp(_pick(parts[1], tok) - behaviour)
    return GuidedChoice(tok, behaviour, _pick(student_logp, tok), share.nan_to_num(0.0))


def topk_correction_choice(student_logp: torch.Tensor, teacher_logp: torch.Tensor, k: int,
                           generator: torch.Generator | None) -> GuidedChoice:
    """The student proposes; a proposal outside the teacher's top-k is replaced by a sample from the teacher's top-k."""
    in_topk = torch.zeros_like(student_logp, dtype=torch.bool)
    in_topk.scatter_(1, teacher_logp.topk(min(k, teacher_logp.shape[1]), dim=1).indices, True)
    teacher_topk = torch.softmax(teacher_logp.masked_fill(~in_topk, float("-inf")), dim=1)  # pi_T(. | K)
    proposal = draw(student_logp.exp(), generator)
    teacher_draw = draw(teacher_topk, generator)
    replace = ~in_topk.gather(1, proposal[:, None]).squeeze(1)
    tok = torch.where(replace, teacher_draw, proposal)
    # q(v) = pi_theta(v) [v in K] + (1 - pi_theta(K)) pi_T(v | K): both routes to v, summed.
    p_student = student_logp.exp()
    mass_out = (p_student * ~in_topk).sum(1).clamp(min=0.0)
    q = p_student * in_topk + mass_out[:, None] * teacher_topk
    return GuidedChoice(tok, _pick(q, tok).log(), _pick(student_logp, tok), replace.float())


def choose(guide: TeacherGuide, student_logp: torch.Tensor, teacher_logp: torch.Tensor,
           generator: torch.Generator | None) -> GuidedChoice:
    if guide.topk > 0:
        return topk_correction_choice(student_logp, teacher_logp, guide.topk, generator)
    return mixture_choice(student_logp, teacher_logp, guide.mix, generator)


def make_guide(mix: float, topk: int, teacher_model, student_tokenizer, teacher_spec: str) -> TeacherGuide | None:
    """The guide for rollout.teacher_mix / teacher_correct_topk, or None when both are off. The teacher is stepped
    token by token over the student's own ids, so it must run here and share the student's vocabulary."""
    from opd.models import load_tokenizer

    if mix == 0 and topk == 0:
        return None
    if teacher_model is None:
        raise ConfigError("teacher-guided rollouts (rollout.teacher_mix / teacher_correct_topk) step the teacher's "
                          "weights alongside the student, and this teacher is a server: unset teacher.url, or turn "
                          "guidance off")
    if student_tokenizer.get_vocab() != load_tokenizer(teacher_spec).get_vocab():
        raise ConfigError("teacher-guided rollouts (rollout.teacher_mix / teacher_correct_topk) mix the teacher's and "
                          "the student's next-token distributions, so they need one shared tokenizer; this teacher's "
                          "differs: turn guidance off, or use a teacher from the student's model family")
    return TeacherGuide(teacher_model, mix=mix, topk=topk)


def align_vocab(teacher_logits: torch.Tensor, width: int) -> torch.Tensor:
    """Same tokenizer, but LM heads may be padded to different widths (e.g. within a model family):
    ids past the tokenizer are never real tokens. A narrower teacher gets -inf there; a wider one
    drops its extra ids (and is renormalised over the student's)."""
    extra = width - teacher_logits.shape[-1]
    if extra > 0:
        return torch.nn.functional.pad(teacher_logits, (0, extra), value=float("-inf"))
    return teacher_logits[..., :width]
