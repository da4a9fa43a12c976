"""Per-token log-probabilities of completions in one forward pass per sequence, shared by the
teacher (stage 3) and the student update (stage 5).

The log-softmax over the vocabulary runs in chunks of positions, and only over real completion
tokens (padding and prompt positions are dropped before the LM head), so batch x length x vocab
fp32 logits never exist at once: a 262k vocabulary fits. With autograd on, each chunk is
recomputed in the backward pass (activation checkpointing) instead of keeping its logits.

Temperature convention: every logprob here is log softmax(logits / temperature), the same
distribution the sampler draws from (before top-p), so behaviour, student and teacher logprobs
compare like with like.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Concatenate left-padded prompts and right-padded completions; positions skip the padding."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Final hidden states at the positions that predict each real completion token: [N, H]."""
    input_ids, attention_mask, position_ids = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    dev = next(model.parameters()).device
    out = model.base_model(
        input_ids=input_ids.to(dev),
        attention_mask=attention_mask.to(dev),
        position_ids=position_ids.to(dev),
        use_cache=False,
    )
    hidden = out.last_hidden_state
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    # The state before completion token t is position P - 1 + t (the prompt ends at P - 1).
    hidden = hidden[:, P - 1 : P - 1 + T]
    return hidden[completion_mask.to(dev).bool()]


def lm_logits(model, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """LM head in fp32, with the model's final-logit soft-capping if it has one (Gemma)."""
    head = model.get_output_embeddings()
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits / temperature


# Largest fp32 [positions, vocab] block one chunk may create: fn typically makes a few of them (log-softmax,
# its exp, a product), so at a 262k vocabulary this keeps scoring within a few hundred MiB of the weights.
MAX_CHUNK_LOGITS_BYTES = 128 * 2**20


def positions_per_chunk(model, chunk_size: int) -> int:
    """chunk_size, lowered so one chunk's fp32 logits stay under MAX_CHUNK_LOGITS_BYTES."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, min(chunk_size, MAX_CHUNK_LOGITS_BYTES // (4 * vocab)))


def per_position(
    model,
    hidden: torch.Tensor,
    fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]],
    temperature: float,
    chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """Apply fn(log_softmax(logits[chunk]), chunk_slice) -> per-position tensors, chunk by chunk.

    fn sees one chunk's full-vocabulary log-probs [n, V] and returns tensors of shape [n];
    results are concatenated over chunks. With grad enabled each chunk is checkpointed.
    """
    outs: list[tuple[torch.Tensor, ...]] = []
    n = hidden.shape[0]
    chunk_size = positions_per_chunk(model, chunk_size)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))

        def chunk_fn(h: torch.Tensor, sl: slice = sl) -> tuple[torch.Tensor, ...]:
            return fn(F.log_softmax(lm_logits(model, h, temperature), dim=-1), sl)

        h = hidden[sl]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(chunk_fn, h, use_reentrant=False))
        else:
            outs.append(chunk_fn(h))
    if not outs:
        return tuple()
    return tuple(torch.cat(parts) for parts in zip(*outs))


def sampled_logprobs(model, rollout, temperature: float, chunk_size: int = 1024) -> torch.Tensor:
    """log p(a_t | s, a_<t) of each real completion token of `rollout` under `model`: [N], in one forward."""
    mask = rollout.completion_mask.bool()
    targets = rollout.completion_ids[mask].to(next(model.parameters()).device)
    hidden = completion_hidden(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                               rollout.completion_mask)
    (lp,) = per_position(model, hidden, lambda logp, sl: (logp.gather(1, targets[sl, None]).squeeze(1),),
                         temperature, chunk_size)
    return lp


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def scatter_tokens(values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Inverse of `tensor[mask]`: put per-token values [N, ...] back into [B, T, ...]."""
    out = torch.full((*mask.shape, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[mask.to(values.device).bool()] = values
    return out
