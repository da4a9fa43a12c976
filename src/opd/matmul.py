"""float32 matmuls through oneDNN where torch's default BLAS is slower.

torch's CPU build sends float32 matmuls to MKL, which on AMD CPUs runs its AVX2 code path: on a 2-core AMD EPYC
with AVX-512 that is 170-200 GFLOP/s, while oneDNN (which torch also ships, and uses for bf16) runs the same
fp32 products at 350-450 (bench/results/matmul_limit.json, `kernel` rows). Same IEEE fp32 arithmetic in another
summation order: results differ from MKL's by ~1e-6 relative, as two BLAS libraries do.

- `linear(x, w, bias)`: F.linear, through oneDNN for fp32 CPU tensors that autograd is not tracking (opd's own
  forwards: teacher scoring, reference and evaluation scoring, decoding).
- `onednn_fp32()`: a context in which aten.mm / aten.addmm of fp32 CPU tensors go to oneDNN, in the forward and
  the backward pass (a Hugging Face model's training step). Thread-local, like every torch dispatch mode.

Which kernel: OPD_FP32_MATMUL = auto (the default: the faster of the two on a model-sized product, measured once
per process, ~10 ms) | onednn | blas.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CHOICES = ("auto", "onednn", "blas")
# oneDNN is taken only when clearly faster: on CPUs where MKL runs its best code the two are close, and the
# default path is the one everybody else's numbers come from.
MIN_SPEEDUP = 1.15


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def fp32_kernel() -> str:
    """"onednn" or "blas": what float32 matmuls on the CPU use in this process (OPD_FP32_MATMUL, see above)."""
    choice = os.environ.get("OPD_FP32_MATMUL", "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"OPD_FP32_MATMUL={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "blas" or not onednn_available():
        return "blas"
    if choice == "onednn":
        return "onednn"
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 576, generator=g), torch.randn(1536, 576, generator=g)  # a small model's MLP
    blas = _best_seconds(lambda: F.linear(x, w))
    onednn = _best_seconds(lambda: _onednn_linear(x, w))
    return "onednn" if blas > MIN_SPEEDUP * onednn else "blas"


def _rerouted(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and fp32_kernel() == "onednn"


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias); through oneDNN for fp32 CPU tensors outside autograd (see the module docstring)."""
    tracked = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))
    if not tracked and x.dim() >= 2 and x.numel() > 0 and w.dim() == 2 and _rerouted(x, w):
        return _onednn_linear(x, w, bias)
    return F.linear(x, w, bias)


class _OneDnnFp32(TorchDispatchMode):
    """aten.mm(a, b) = a @ b is oneDNN's linear(a, b.T); aten.addmm(bias, a, b) the same with the bias added.
    Below autograd, so the backward pass's products (grad @ W, grad.T @ x) come through here too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.mm.default and not kwargs:
            a, b = args
            if a.numel() and b.numel() and _rerouted(a, b):
                return _onednn_linear(a, b.t())
        elif func is aten.addmm.default:
            bias, a, b = args[:3]
            plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and len(args) == 3
            if plain and bias.dim() == 1 and bias.shape[0] == b.shape[1] and a.numel() and b.numel() and _rerouted(bias, a, b):
                return _onednn_linear(a, b.t(), bias)
        return func(*args, **kwargs)


_ACTIVE = threading.local()


@contextlib.contextmanager
def onednn_fp32(model=None, *, active: bool = True):
    """Route fp32 CPU matmuls (forward and backward) to oneDNN inside the block when that is the faster kernel
    (and, given a model, when its parameters are fp32 on the CPU: otherwise nothing would be rerouted and every op
    would still pay the mode's few µs). Re-entrant: an inner block inside an active one adds nothing."""
    if model is not None:
        p = next(model.parameters())
        # under autocast the products arrive in bf16 (autocast runs before the mode): nothing to reroute
        active = active and p.dtype == torch.float32 and p.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    if not active or getattr(_ACTIVE, "on", False) or fp32_kernel() != "onednn":
        yield
        return
    _ACTIVE.on = True
    try:
        with _OneDnnFp32():
            yield
    finally:
        _ACTIVE.on = False
