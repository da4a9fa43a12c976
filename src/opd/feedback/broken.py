"""Broken prefixes: where the student has walked into a state the teacher no longer understands.

On-policy distillation asks the teacher for a next-token distribution at every prefix the student
writes. Once the student has gone badly wrong, that distribution stops being meaningful (the
teacher never saw such text), and so does A_t. We locate the break per sequence and let the
config decide what the loss does with the tokens after it.

Detection. With w = break_window, the windowed mean at completion position t is the mean teacher
logprob of the (up to) w scored tokens ending at t. A sequence breaks at the first t where it falls
below break_logprob, or - when break_entropy is set - where the teacher's entropy at the state
before a_t rises above break_entropy. The window smooths single unlikely tokens (which sampling
at temperature 1 produces all the time) into "the teacher has stopped liking this text".

Handling (feedback.broken_prefix):
  keep        every token enters the loss (default);
  truncate    tokens more than keep_after_break after the break are dropped from the loss, and from
              everything computed before it (clipping stats, discounted returns, whitening), so no
              token past the cut can reach the loss by any route;
  downweight  each token's loss is weighted by the teacher's confidence at its state, exp(-H_T(s_t))
              (1 for a certain teacher, 1/k for a uniform choice among k tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config import ConfigError
from opd.types import TeacherScores

NO_BREAK = -1


# Logprobs below this count as this in a window's mean: a -inf (or a huge negative) still pulls its own windows far
# below any break threshold, but cannot turn every later window into -inf - (-inf) = NaN or lose it to rounding.
LOGPROB_FLOOR = -1e4


def windowed_mean(values: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T] mean of the last `window` masked (scored) values up to and including position t (fewer at the start of
    a sequence); 0 where there is none. The window counts scored tokens, not positions: holes in the mask (tokens a
    cross-tokenizer teacher left unscored) do not shrink it."""
    m = mask > 0
    v = torch.where(m, values.double().clamp(min=LOGPROB_FLOOR), 0.0)  # NaN/-inf at a masked position stays out
    csum = torch.nn.functional.pad(v.cumsum(1), (1, 0))  # csum[:, k]: sum of the scored values before position k
    ccnt = torch.nn.functional.pad(m.long().cumsum(1), (1, 0))  # ccnt[:, k]: how many were scored before k
    seen = ccnt[:, 1:]  # scored up to and including t
    # The window starts after the (seen - window)-th scored value: the first k where ccnt reaches that count.
    start = torch.searchsorted(ccnt.contiguous(), (seen - window).clamp(min=0).contiguous())
    total = csum[:, 1:] - csum.gather(1, start)
    count = seen.clamp(max=window)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0).to(values.dtype)


def find_breaks(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    window: int,
    threshold: float,
    entropy: torch.Tensor | None = None,
    entropy_threshold: float | None = None,
) -> torch.Tensor:
    """[B] completion position of each sequence's break, NO_BREAK (-1) where it has none."""
    m = mask.bool()
    broken = (windowed_mean(token_logprobs, mask, window) < threshold) & m
    if entropy_threshold is not None:
        if entropy is None:
            raise ConfigError("feedback.break_entropy is set, but this teacher returns no entropy (a server): give it "
                              "teacher.topk > 0 (entropy from the top-k plus a tail bin) or unset break_entropy")
        broken |= (entropy > entropy_threshold) & m
    first = torch.argmax(broken.int(), dim=1)  # the first True (argmax returns the first maximum)
    return torch.where(broken.any(1), first, torch.full_like(first, NO_BREAK))


def teacher_entropy(scores: TeacherScores) -> torch.Tensor | None:
    """[B, T] teacher entropy at each student state: as returned, else from the full distribution, else from
    the top-k (plus one bin for the remaining mass: a lower bound on the true entropy)."""
    if scores.entropy is not None:
        return scores.entropy
    if scores.full_logprobs is not None:
        lp = scores.full_logprobs
        return -(lp.exp() * lp).nan_to_num().sum(-1)
    if scores.topk_logprobs is not None:
        lp = scores.topk_logprobs
        head = -(lp.exp() * lp).nan_to_num().sum(-1)
        tail_p = (1 - lp.exp().sum(-1)).clamp(min=1e-12)
        return head - tail_p * tail_p.log()
    return None


@dataclass
class BrokenPrefixes:
    """What detection found in one batch, and the loss weight of every token under the chosen handling."""

    break_pos: torch.Tensor  # [B] completion position of the break, -1 = none
    loss_weight: torch.Tensor  # [B, T] multiplies the loss mask: 0 = dropped, 1 = kept, in (0, 1) = downweighted
    metrics: dict[str, float]


def handle_broken_prefixes(scores: TeacherScores, mask: torch.Tensor, cfg) -> BrokenPrefixes:
    """Detect breaks in the scored tokens (`mask`) and turn feedback.broken_prefix into per-token loss weights."""
    entropy = teacher_entropy(scores)  # None only for a teacher without entropy, top-k or full distribution
    scored = mask.bool()
    if entropy is not None and bool((entropy.isnan() | ~scored).all(1)[scored.any(1)].any()):
        # a routed teacher without it (whole rows NaN): what needs entropy says so, not reads NaN as no break. A NaN
        # here and there (an overflow) is the non-finite numbers' guard's to skip
        entropy = None
    pos = find_breaks(scores.token_logprobs, mask, window=cfg.break_window, threshold=cfg.break_logprob,
                      entropy=entropy, entropy_threshold=cfg.break_entropy)
    has_tokens = mask.sum(1) > 0
    broken = pos != NO_BREAK
    metrics = {"teacher/broken_frac": float(broken[has_tokens].float().mean()) if has_tokens.any() else 0.0}
    metrics["teacher/broken_rows"] = float(broken.sum())
    if broken.any():
        metrics["teacher/break_pos_mean"] = float(pos[broken].float().mean())
    if entropy is not None and scored.any():
        metrics["teacher/entropy"] = float(entropy[scored].mean())

    weight = torch.ones_like(mask, dtype=torch.float32)
    if cfg.broken_prefix == "truncate":
        # up to the break, and keep_after_break *scored* tokens after it (holes in the mask do not use them up)
        scored = (mask > 0).long().cumsum(1)
        at_break = scored.gather(1, pos.clamp(min=0)[:, None])
        t = torch.arange(mask.shape[1])[None, :]
        kept = (t <= pos[:, None]) | (scored - at_break <= cfg.keep_after_break)
        weight = torch.where(broken[:, None], kept, True).float()
    elif cfg.broken_prefix == "downweight":
        if entropy is None:
            raise ConfigError("feedback.broken_prefix = 'downweight' weights tokens by the teacher's entropy, which this "
                              "teacher does not return (a server): give it teacher.topk > 0 (entropy from the top-k plus "
                              "a tail bin) or use 'keep' / 'truncate'")
        weight = torch.exp(-entropy.float()).clamp(max=1.0)
    dropped = mask.bool() & (weight == 0)
    metrics["feedback/tokens_dropped"] = float(dropped.sum())
    if cfg.broken_prefix == "downweight" and mask.bool().any():
        metrics["feedback/loss_weight_mean"] = float(weight[mask.bool()].mean())
    return BrokenPrefixes(break_pos=pos, loss_weight=weight, metrics=metrics)
