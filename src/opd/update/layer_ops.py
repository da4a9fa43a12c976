"""The update's RMSNorm and SiLU x up in C while it trains through bf16 weights (train.bf16_weights).

In a bf16 forward and backward of HF's Llama on the CPU, each RMSNorm is ~6 elementwise torch ops forward and ~10
backward (casts to fp32 and back, pow, mean, rsqrt, the products and sums of their gradients), and each MLP's
SiLU x up is three ops forward and three backward, every one a pass over [tokens, hidden] at bf16's slow CPU
rate. csrc/layer_ops.c does each step in one pass a row, forward and backward, rounding to bf16 where autograd's ops
round (bench/NOTES.md, session 16). `layer_ops(model)` swaps them into the model's own modules (instance forwards,
restored after) where they apply: Llama RMSNorm and SiLU MLP modules, bf16 CPU tensors, the AVX-512 BF16 build.
Anything else (fp32, autocast's fp32 residual stream, other CPUs) runs the modules' own forward.
"""

from __future__ import annotations

import contextlib

import torch
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
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
