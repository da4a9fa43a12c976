"""Per-token log-probabilities of completions in one forward pass per sequence, shared by the
teacher (stage 3) and the student update (stage 5).

The log-softmax over the vocabulary runs in chunks of positions, and only over real completion
tokens (padding and prompt positions are dropped before the LM head), so batch x length x vocab
fp32 logits never exist at once: a 262k vocabulary fits. With autograd on, each chunk is
recomputed in the backward pass (activation checkpointing) instead of keeping its logits, unless
all of them are small (CHECKPOINT_ABOVE_BYTES).

Temperature convention: every logprob here is log softmax(logits / temperature), the same
distribution the sampler draws from (before top-p), so behaviour, student and teacher logprobs
compare like with like.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd import llama, matmul


def sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Concatenate left-padded prompts and right-padded completions; positions skip the padding."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, fast: bool = True) -> torch.Tensor:
    """Final hidden states at the positions that predict each real completion token: [N, H], in the order of
    completion_ids[completion_mask.bool()].

    Rows as the sampler writes them (prompt padded on the left, completion on the right) are left-aligned first
    (see `left_aligned`), so the forward needs no attention mask: causal attention is exact and the padding
    costs nothing but its own positions. Without grad and with `fast`, a Llama model runs opd's own forward
    (opd.llama.causal_hidden: fused weights, no HF overhead); otherwise the HF model. Other layouts (a mask with
    holes) go through HF with the full attention mask."""
    dev = next(model.parameters()).device
    packed = left_aligned(prompt_ids, prompt_mask, completion_ids, completion_mask,
                          matmul.position_multiple(next(model.parameters())),
                          getattr(model.config, "max_position_embeddings", None))
    if packed is not None:
        ids, rows, at = (t.to(dev) for t in packed)
        if fast and not torch.is_grad_enabled() and llama.unsupported_reason(model) is None:
            return llama.final_norm(model, llama.causal_hidden(model, ids)[rows, at])
        with matmul.onednn_fp32(model):
            return model.base_model(input_ids=ids, use_cache=False).last_hidden_state[rows, at]
    input_ids, attention_mask, position_ids = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    with matmul.onednn_fp32(model):
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


def left_aligned(prompt_ids, prompt_mask, completion_ids, completion_mask, multiple: int = 1,
                 most: int | None = None):
    """Each row's real tokens moved to the start of the row: (ids [B, L], rows [N], at [N]) where
    ids[rows[i], at[i]] is the state that predicts the i-th real completion token; None unless every prompt is
    padded on the left only (and not empty) and every completion on the right only. L is the longest row's length
    rounded up to a multiple of `multiple` (matmul.position_multiple: some products run faster at such lengths)
    where that stays within `most` positions (the model's limit).

    With every row starting at position 0, position ids are 0, 1, 2, ... (what cumsum of the mask gives for the
    real tokens) and the padding sits after each row's last real token, where no real token attends to it."""
    if not (bool((prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all()) and bool((completion_mask[:, 1:] <= completion_mask[:, :-1]).all())):
        return None
    prompt_len, completion_len = prompt_mask.sum(1), completion_mask.sum(1)
    if bool((prompt_len == 0).any()):
        return None
    B, P = prompt_ids.shape
    longest = int((prompt_len + completion_len).max())
    L = -(-longest // multiple) * multiple
    if most is not None and L > most:
        L = longest
    # In cat(prompt, completion) row b's real tokens are one contiguous run starting at column P - prompt_len[b].
    whole = torch.cat([prompt_ids, completion_ids, torch.zeros((B, L), dtype=prompt_ids.dtype)], dim=1)
    ids = whole.gather(1, (P - prompt_len)[:, None] + torch.arange(L))
    rows, t = completion_mask.bool().nonzero(as_tuple=True)
    return ids, rows, prompt_len[rows] - 1 + t


def lm_logits(model, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """LM head in fp32, with the model's final-logit soft-capping if it has one (Gemma)."""
    head = model.get_output_embeddings()
    # A plain linear head through opd.matmul (oneDNN for fp32 on CPUs where it is faster); wrapped heads as they are.
    logits = (matmul.linear(hidden, head.weight, head.bias) if type(head) is torch.nn.Linear else head(hidden)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits if temperature == 1.0 else logits / temperature  # a division by 1 is a pass over [n, V] for nothing


# Below this many bytes of fp32 logits over all chunks, the chunks keep their activations for the backward pass
# instead of recomputing the LM head and the log-softmax there (at batch 4 x 64 tokens and a 49k vocabulary,
# 50 MB of logits: recomputing costs a tenth of the update; keeping them ~5x that in saved tensors).
CHECKPOINT_ABOVE_BYTES = 64 * 2**20

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
    *,
    raw_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Apply fn(log_softmax(logits[chunk]), chunk_slice) -> per-position tensors, chunk by chunk.

    fn sees one chunk's full-vocabulary log-probs [n, V] (with `raw_logits`, the plain LM head's logits in their
    own dtype instead, for fn to normalise itself: opd.objectives.fused) and returns tensors of shape [n];
    results are concatenated over chunks. With grad enabled each chunk is checkpointed (unless all chunks' logits
    together stay under CHECKPOINT_ABOVE_BYTES).
    """
    outs: list[tuple[torch.Tensor, ...]] = []
    n = hidden.shape[0]
    chunk_size = positions_per_chunk(model, chunk_size)
    recompute = n * model.get_output_embeddings().weight.shape[0] * 4 > CHECKPOINT_ABOVE_BYTES
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))

        def chunk_fn(h: torch.Tensor, sl: slice = sl) -> tuple[torch.Tensor, ...]:
            if raw_logits:
                head = model.get_output_embeddings()
                return fn(matmul.linear(h, head.weight, head.bias), sl)
            return fn(F.log_softmax(lm_logits(model, h, temperature), dim=-1), sl)

        h = hidden[sl]
        if recompute and torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(chunk_fn, h, use_reentrant=False))
        else:
            outs.append(chunk_fn(h))
    if not outs:
        return tuple()
    if len(outs) == 1:  # torch.cat of one tensor is still a copy (of a [n, V] block when fn returns log-probs)
        return outs[0]
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
    """Inverse of `tensor[mask]`: put per-token values [N, ...] back into [B, T, ...]. Where every position is a
    token this is `values` itself, reshaped (no fill and no copy of a [B, T, V] block)."""
    if values.shape[0] == mask.numel() and bool(mask.all()):
        return values.reshape(*mask.shape, *values.shape[1:])
    out = torch.full((*mask.shape, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[mask.to(values.device).bool()] = values
    return out
