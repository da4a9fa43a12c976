"""The update's full-vocabulary terms in one pass per block of rows: the sampled token's logprob, the entropy and
the reverse KL(student || teacher), straight from the LM head's logits.

Written as log_softmax, then a gather, an entropy and a KL, each is its own pass over [positions, vocab] tensors
in the forward and again in the backward (~15 passes over 50 MB at batch 4 x 64 tokens and a 49k vocabulary),
and autograd keeps the fp32 log-probs and their exponentials for the backward pass. Here a block of a few rows
is upcast, normalised and reduced while it sits in cache; the backward pass recomputes it from the saved logits
(kept in their own dtype, bf16 under autocast) and writes the gradient of the logits in one go. On x86 CPUs with
AVX2 the same formulas run row by row in C (csrc/vocab_terms.c, opd.cpu_kernels): one read of a row from memory,
the rest in L2, instead of ~10 elementwise passes per block at torch's rate (bench/NOTES.md, session 14):

    d tok / dz = onehot(target) - p        d KL / dz = p * (log p - log t - KL)        (each / T)

The entropy carries no gradient (opd reports it; no objective trains on it). bench/NOTES.md (session 11) has the
measurement; tests/objectives/test_fused.py compares values and gradients with the unfused ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd import cpu_kernels
from opd.logprobs import entropy_of

# Rows per block: 8 x 49k fp32 is 1.5 MB, in a core's L2 with the block's temporaries on recent x86 CPUs.
BLOCK_ROWS = 8


class TokenTerms(torch.autograd.Function):
    """(logits [n, V], teacher log-probs [n, V] or None, targets [n], T, teacher_rows) -> (token logprob, entropy,
    KL) [n] each, all at temperature T (log softmax(logits / T)); KL is zeros without a teacher. With teacher_rows
    [n] (int64), row r's teacher log-probs are teacher[teacher_rows[r]] of a larger [R, V] block: the scores' own
    [batch x length, V] tensor, read in place instead of gathered into a copy."""

    @staticmethod
    def forward(ctx, logits, teacher, targets, temperature: float, teacher_rows=None):
        ctx.native = cpu_kernels.vocab_terms_fit(logits, teacher, targets, teacher_rows)
        if ctx.native:  # csrc/vocab_terms.c: one read of each row, the rest in L2
            tok, ent, kl, lse = cpu_kernels.vocab_terms_forward(logits, teacher, targets, temperature, teacher_rows)
        else:
            tok, ent, kl, lse = _blockwise_forward(logits, teacher, targets, temperature, teacher_rows)
        ctx.save_for_backward(logits, teacher, targets, lse, kl, teacher_rows)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return tok, ent, kl

    @staticmethod
    def backward(ctx, g_tok, g_ent, g_kl):
        logits, teacher, targets, lse, kl, teacher_rows = ctx.saved_tensors
        T = ctx.temperature  # g_tok and g_kl arrive as zeros where unused (autograd materialises them)
        if ctx.native:
            return cpu_kernels.vocab_terms_backward(logits, teacher, targets, T, lse, kl, g_tok,
                                                    None if teacher is None else g_kl, teacher_rows), None, None, None, None
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], BLOCK_ROWS):
            rows = slice(s, s + BLOCK_ROWS)
            logp = _scaled(logits[rows], T).sub_(lse[rows, None])
            p = logp.exp()
            if teacher is None:  # no KL term: -g_tok * p
                g = p.mul_(g_tok[rows, None].neg())
            else:  # g_kl * p * (log p - log t - KL) - g_tok * p, in place on logp's buffer
                t = _teacher_block(teacher, teacher_rows, rows)
                g = logp.sub_(t).sub_(kl[rows, None]).mul_(g_kl[rows, None]).sub_(g_tok[rows, None]).mul_(p)
            g.scatter_add_(1, targets[rows, None], g_tok[rows, None])  # + g_tok at the target
            grad[rows] = g / T if T != 1.0 else g
        return grad, None, None, None, None


def _teacher_block(teacher: torch.Tensor, teacher_rows: torch.Tensor | None, rows: slice) -> torch.Tensor:
    return teacher[rows] if teacher_rows is None else teacher[teacher_rows[rows]]


def _blockwise_forward(logits, teacher, targets, temperature: float, teacher_rows=None):
    """TokenTerms' forward in torch's ops, BLOCK_ROWS rows at a time: (tok, ent, kl, lse) [n] each."""
    n = logits.shape[0]
    tok, ent, kl, lse = (torch.empty(n, device=logits.device) for _ in range(4))
    for s in range(0, n, BLOCK_ROWS):
        rows = slice(s, s + BLOCK_ROWS)
        logp = _scaled(logits[rows], temperature)
        lse[rows] = torch.logsumexp(logp, -1)
        logp.sub_(lse[rows, None])
        p = logp.exp()
        tok[rows] = logp.gather(1, targets[rows, None]).squeeze(1)
        ent[rows] = -(p * logp).sum(-1)
        kl[rows] = 0.0 if teacher is None else (p * (logp - _teacher_block(teacher, teacher_rows, rows))).sum(-1)
    return tok, ent, kl, lse


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """An fp32 copy of a block of logits at temperature T (a copy: callers work in place on it)."""
    z = logits.to(torch.float32, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def supports(model) -> bool:
    """The fused terms need the plain LM head's logits (no wrapper, no final-logit soft-capping)."""
    return type(model.get_output_embeddings()) is torch.nn.Linear and not getattr(model.config, "final_logit_softcapping", None)


def token_terms(logits: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, temperature: float,
                teacher_rows: torch.Tensor | None = None):
    return TokenTerms.apply(logits, teacher, targets, temperature, teacher_rows)


def log_softmax_terms(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                      out: torch.Tensor | None = None, out_rows: torch.Tensor | None = None):
    """(token logprob, entropy, log-probs [n, V] fp32) of log_softmax(logits / T) without grad: the teacher's side
    where it gives its full distribution. One C pass a row where opd.cpu_kernels has it, else the torch ops.
    With `out` [R, V] and `out_rows` [n]: row r's log-probs are written to out[out_rows[r]] (the scores' own
    [batch x length, V] block, no copy scattered into it afterwards) and the third result is `out`."""
    if (res := cpu_kernels.log_softmax_rows(logits, targets, temperature, out, out_rows)) is not None:
        return res
    z = logits.float()
    logp = F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
    tok, ent = logp.gather(1, targets[:, None]).squeeze(1), entropy_of(logp)
    if out is None:
        return tok, ent, logp
    out[out_rows if out_rows is not None else slice(0, logp.shape[0])] = logp
    return tok, ent, out
