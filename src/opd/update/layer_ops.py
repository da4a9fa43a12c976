"""The update's RMSNorm, SiLU x up and RoPE in C while it trains through bf16 weights (train.bf16_weights).

In a bf16 forward and backward of HF's Llama on the CPU, each RMSNorm is ~6 elementwise torch ops forward and ~10
backward (casts to fp32 and back, pow, mean, rsqrt, the products and sums of their gradients), and each MLP's
SiLU x up is three ops forward and three backward, every one a pass over [tokens, hidden] at bf16's slow CPU
rate. csrc/layer_ops.c does each step in one pass a row, forward and backward, rounding to bf16 where autograd's ops
round (bench/NOTES.md, session 16). HF's RoPE (apply_rotary_pos_emb) is ~10 torch ops forward and ~12 backward on
the query and key heads of each layer (~12 ms an update of the half-depth SmolLM2 student at 4 x 112, session 18);
here it is one C pass each way (RopeBF16). `layer_ops(model)` swaps them into the model's own modules (instance
forwards, restored after; RoPE as modeling_llama's function for the duration) where they apply: Llama RMSNorm and
SiLU MLP modules, bf16 CPU tensors, the AVX-512 BF16 build. Anything else (fp32, autocast's fp32 residual stream,
other CPUs) runs the modules' own forward.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from opd import cpu_kernels


class RMSNormBF16(torch.autograd.Function):
    """LlamaRMSNorm on bf16: y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), the backward recomputing the row's
    scale from x (saved: x and w only)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return cpu_kernels.rms_norm(x, weight, eps)  # no grad inside forward: the C pass

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = cpu_kernels.rms_norm_backward(x, weight, dy.contiguous(), ctx.eps)
        return dx, dw if ctx.needs_input_grad[1] else None, None  # a frozen norm (LoRA) gets none


class SiluMulBF16(torch.autograd.Function):
    """bf16(bf16(F.silu(gate)) * up) (saved: gate and up, where autograd keeps the SiLU's output too)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return cpu_kernels.silu_mul_pair(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return cpu_kernels.silu_mul_backward(gate, up, dy.contiguous())


class RopeBF16(torch.autograd.Function):
    """apply_rotary_pos_emb of bf16 q [B, H, L, D] and k [B, KV, L, D] with cos, sin [B or 1, L, D] (each product and the
    sum rounded to bf16, as HF's ops round). The backward rotates the gradients back: R(theta)^T = R(-theta) for
    Llama's tables, whose two halves hold the same angles (cat(freqs, freqs)); the rounding of its products and sum
    differs from autograd's order of the same terms by a bf16 step at most."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        (C, L, D), B = cos.shape, q.shape[0]  # C: B, or 1 where every sequence has the same positions
        tables = cos.reshape(C * L, D).contiguous(), sin.reshape(C * L, D).contiguous()
        rows = torch.arange(C * L).view(C, L).expand(B, L).contiguous()  # row (b, l): position l of sequence b
        ctx.save_for_backward(*tables, rows)
        # contiguous [B, heads, L, D], as HF's ops return them (the attention's reshapes are then views)
        return tuple(_rotated(x, tables, rows).transpose(1, 2).contiguous() for x in (q, k))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, rows = ctx.saved_tensors
        back = (cos, -sin)
        # [B, L, heads, D] buffers seen as [B, heads, L, D]: the projections' layout, so the views back to
        # [B, L, heads x D] on the way to their products need no copy
        return _rotated(dq, back, rows).transpose(1, 2), _rotated(dk, back, rows).transpose(1, 2), None, None


class CausalSoftmaxBF16(torch.autograd.Function):
    """The causal attention's bf16 probabilities from unscaled bf16 scores [B, KV, group x L, L] (a group's query
    heads stacked as rows, as update.step.grouped_eager_attention lays them out) and the attention's scale: HF
    eager's scaling of the queries, mask add, fp32 softmax and cast to bf16, and their backward, one C pass each way
    (saved: the bf16 probabilities only)."""

    @staticmethod
    def forward(ctx, scores, q_len: int, scale: float):
        probs = cpu_kernels.causal_softmax(scores, q_len, scale)
        ctx.save_for_backward(probs)
        ctx.q_len, ctx.scale = q_len, scale
        return probs

    @staticmethod
    def backward(ctx, dprobs):
        (probs,) = ctx.saved_tensors
        return cpu_kernels.causal_softmax_backward(probs, dprobs.contiguous(), ctx.q_len, ctx.scale), None, None


def _rotated(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, D] rotated by the tables' angles at `rows`, as a [B, L, heads, D] tensor (the C pass's layout)."""
    buf = x.transpose(1, 2).contiguous()
    if not cpu_kernels.rope_(buf, buf.shape[2], *tables, rows):
        raise RuntimeError("RopeBF16: the C pass declined its inputs")  # rope_applies rules this out
    return buf


def rope_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (cpu_kernels.bf16_cpu(cos, sin) and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (q, k))
            and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and q.shape[0] == k.shape[0] and cos.shape[0] in (1, q.shape[0]) and q.shape[2] == k.shape[2] == cos.shape[1]
            and q.shape[3] == k.shape[3] == cos.shape[2] and cos.shape[2] % 2 == 0)


_hf_apply_rotary_pos_emb = modeling_llama.apply_rotary_pos_emb


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    if unsqueeze_dim == 1 and rope_applies(q, k, cos, sin):
        return RopeBF16.apply(q, k, cos, sin)
    return _hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


def _norm_forward(norm: LlamaRMSNorm):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.bf16_cpu(x, norm.weight) and x.shape[-1] == norm.weight.shape[0]:
            return RMSNormBF16.apply(x, norm.weight, norm.variance_epsilon)
        return LlamaRMSNorm.forward(norm, x)
    return forward


def _mlp_forward(mlp: LlamaMLP):
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if cpu_kernels.bf16_cpu(gate, up) and gate.shape == up.shape:
            return mlp.down_proj(SiluMulBF16.apply(gate, up))
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return forward


def _plain_mlp(mlp) -> bool:
    """HF's LlamaMLP as it is built: plain Linear products and SiLU (not LoRA-wrapped, not another activation)."""
    return (type(mlp) is LlamaMLP and getattr(mlp.config, "hidden_act", None) in ("silu", "swish")
            and all(type(getattr(mlp, name)) is torch.nn.Linear for name in ("gate_proj", "up_proj", "down_proj")))


@contextlib.contextmanager
def layer_ops(model):
    """The C steps in the model's Llama RMSNorm and MLP modules for the duration; yields how many modules took them
    (0 where the build or the model does not apply)."""
    swapped = []
    if cpu_kernels.bf16_training_ops():
        for module in model.modules():
            if type(module) is LlamaRMSNorm:
                module.forward = _norm_forward(module)  # an instance attribute: found before the class's forward
                swapped.append(module)
            elif _plain_mlp(module):
                module.forward = _mlp_forward(module)
                swapped.append(module)
    rope = bool(swapped) and modeling_llama.apply_rotary_pos_emb is _hf_apply_rotary_pos_emb
    if rope:  # a module-level function of modeling_llama, which LlamaAttention.forward looks up on each call
        modeling_llama.apply_rotary_pos_emb = apply_rotary_pos_emb
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
        if rope:
            modeling_llama.apply_rotary_pos_emb = _hf_apply_rotary_pos_emb
