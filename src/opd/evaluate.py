"""Evaluation on held-out prompts: fresh student samples, scored by the teacher and the verifier.

eval/reverse_kl is the per-token Monte-Carlo estimate of KL(pi_theta || pi_T) on the student's
own samples: mean over sampled tokens of log pi_theta(a_t|s_t) - log pi_T(a_t|s_t), both at the
eval temperature. Its expectation is the sequence-level reverse KL divided by the mean length.
"""

from __future__ import annotations

import numpy as np
import torch

from opd.prompts import verify
from opd.rollout import SamplingParams, sample
from opd.types import Prompt


def generate(model, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int, batch_size: int = 64,
             version: int = 0, max_prompt_tokens: int = 256):
    """Sample completions for many prompts in batches, with a generator of its own (training RNG untouched)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return [
        sample(model, tokenizer, prompts[i : i + batch_size], params, policy_version=version, generator=gen,
               max_prompt_tokens=max_prompt_tokens)
        for i in range(0, len(prompts), batch_size)
    ]


def accuracy(rollouts) -> float | None:
    checks = [verify(p, c) for r in rollouts for p, c in zip(r.prompts, r.texts)]
    checks = [c for c in checks if c is not None]
    return float(np.mean(checks)) if checks else None


def evaluate(student, teacher, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int,
             version: int = 0, max_prompt_tokens: int = 256) -> dict[str, float]:
    rollouts = generate(student, tokenizer, prompts, params, seed=seed, batch_size=teacher.batch_size,
                        version=version, max_prompt_tokens=max_prompt_tokens)
    diff, t_lp, lengths = [], [], []
    for r in rollouts:
        s = teacher.score(r)
        m = (r.completion_mask * s.scored_mask).bool()
        diff.append((r.behaviour_logprobs - s.token_logprobs)[m])
        t_lp.append(s.token_logprobs[m])
        lengths.append(r.completion_mask.sum(1).float())
    out = {
        "eval/reverse_kl": float(torch.cat(diff).mean()),
        "eval/teacher_nll": float(-torch.cat(t_lp).mean()),
        "eval/length": float(torch.cat(lengths).mean()),
    }
    acc = accuracy(rollouts)
    if acc is not None:
        out["eval/accuracy"] = acc
    return out
