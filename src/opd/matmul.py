"""float32 matmuls through oneDNN where torch's default BLAS is slower.

torch's CPU build sends float32 matmuls to MKL, which on AMD CPUs runs its AVX2 code path: on a 2-core AMD EPYC
with AVX-512 that is 170-200 GFLOP/s, while oneDNN (which torch also ships, and uses for bf16) runs the same
fp32 products at 350-450 (bench/results/matmul_limit.json, `kernel` rows). Same IEEE fp32 arithmetic in another
summation order: results differ from MKL's by ~1e-6 relative, as two BLAS libraries do.

- `linear(x, w, bias)`: F.linear, through oneDNN for fp32 CPU tensors that autograd is not tracking (opd's own
  forwards: teacher scoring, reference and evaluation scoring, decoding).
- `onednn_fp32()`: a context in which aten.mm / aten.addmm of fp32 CPU tensors go to oneDNN, in the forward and
  the backward pass (a Hugging Face model's training step). Thread-local, like every torch dispatch mode.

Which kernel: OPD_FP32_MATMUL = auto (the default: oneDNN on AMD CPUs, where MKL runs its AVX2 code, torch's
default elsewhere) | onednn | blas. `auto` decides by the CPU, not by timing one product: two processes of one run
(a teacher server and the trainer, a run and its resume) must pick the same kernel, and on a noisy 2-core machine
a timing near the threshold picked differently from process to process. Measured on AMD EPYCs here: Zen 5 with
AVX-512, oneDNN 2.0-2.3x MKL at every shape; Zen 2/3 with AVX2 only, oneDNN 1.4-1.9x at decode shapes (4 rows) but
MKL 1.1-1.5x on products of hundreds of rows, so there `auto` reroutes only products of fewer than FEW_ROWS rows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CHOICES = ("auto", "onednn", "blas")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `keys`; None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor() -> str:
    """The CPU's vendor id ("AuthenticAMD", "GenuineIntel", ...), "" where there is none."""
    return _cpuinfo("vendor_id") or ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features"); empty where there are none."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def cpu_lacks_bf16() -> bool:
    """True on an x86 CPU with neither avx512_bf16 nor amx_bf16: bf16 matmuls there have no hardware path (oneDNN
    has no bf16 kernel at all on AVX2-only CPUs) and run many times slower than fp32 (bench/NOTES.md, session 8:
    an update step of the half-depth SmolLM2 student 1.9 s in fp32, ~40 s under bf16 autocast). False where the
    CPU has them, or is not x86 (not known)."""
    flags = cpu_flags()
    return "avx2" in flags and not flags & {"avx512_bf16", "amx_bf16"}


# Sequence lengths of bf16 forwards and backwards on CPUs with AMX go up to a multiple of this (logprobs.left_aligned).
# oneDNN's AMX bf16 products run at about half speed at some row counts and full speed at their neighbours, with no
# simple rule: with 2 threads on a Xeon (session 17) the [M, 1536] x [1536, 576] product ran 1.0-1.2 TF/s at
# M = 420, 452-456, 484-504, 516-528 and 2.3-2.7 at M = 400-416, 448, 460-480, 512, while multiples of 64 up to 512
# were all fast but for 256 and 320. Four rows of 105 positions padded to 112: the teacher's forward 97 -> 82-85 ms
# with 7% more positions, the update 0.34 -> 0.31 s; 8 x 105 and 16 x 105 padded were faster too.
AMX_BF16_POSITIONS = 16


def position_multiple(param: torch.Tensor) -> int:
    """What a forward's sequence length is padded up to for `param`'s model (1: not padded); see AMX_BF16_POSITIONS."""
    if param.device.type == "cpu" and param.dtype == torch.bfloat16 and "amx_bf16" in cpu_flags():
        return AMX_BF16_POSITIONS
    return 1


class PackedWeight:
    """A bf16 weight [out, in] in oneDNN's blocked layout for its AMX products (torch.ops.mkldnn._reorder_linear_weight),
    made once for a weight that no longer changes; `linear` takes it in place of the weight. Where the weight has
    more outputs than inputs (a fused QKV or gate/up weight) this skips the reorder oneDNN otherwise makes on every
    call: [448, 576] x [576, 960] and x [576, 3072] 2.2-2.4 -> 2.7-2.9 TF/s with 2 threads on a Xeon with AMX, the same
    bits; the [576, 576] and [1536, 576] products ran slower packed (1.4-1.6), so they are not (session 18)."""

    def __init__(self, w: torch.Tensor, rows: int):
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)  # rows: the products' expected count
        self.shape = w.shape


def packs(w: torch.Tensor) -> bool:
    """PackedWeight applies to `w`: a bf16 CPU weight with more outputs than inputs, on a CPU with AMX, where torch
    has oneDNN's packing ops."""
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[0] > w.shape[1]
            and "amx_bf16" in cpu_flags() and onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _onednn_runs_fp32() -> bool:
    try:  # a oneDNN build without a kernel for this CPU raises at primitive creation
        x = torch.ones(4, 8)
        return bool(torch.allclose(_onednn_linear(x, torch.ones(3, 8)), torch.full((4, 3), 8.0)))
    except RuntimeError:
        return False


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The setting of environment variable `name` (a kernel choice, OPD_*), lowercased; the first of `choices`
    where it is unset or empty; a ValueError naming the choices where it is none of them."""
    choice = (os.environ.get(name) or choices[0]).strip().lower()
    if choice not in choices:
        raise ValueError(f"{name}={choice!r}: expected one of {', '.join(choices)}")
    return choice


def _fp32_choice() -> str:
    return env_choice("OPD_FP32_MATMUL", CHOICES)  # checked at first use, whatever the product's size


@functools.cache
def fp32_kernel() -> str:
    """"onednn" or "blas": what float32 matmuls on the CPU use in this process (OPD_FP32_MATMUL, see above)."""
    choice = _fp32_choice()
    if choice == "blas" or not onednn_available():
        return "blas"
    if choice == "onednn":
        return "onednn"
    return "onednn" if cpu_vendor() == "AuthenticAMD" and _onednn_runs_fp32() else "blas"


# oneDNN's gain is in the kernel and its cost is per call (~40 µs against MKL's ~15 for a tiny product), and the
# dispatch mode costs a Python call on every op: products whose inner or output dimension is below this stay with
# BLAS, and a model with no weight this large never enters the mode (the built-in 64-wide models warm-started
# 1.5x slower through it; measured: [1664, 64] x [64, 256] 490 µs BLAS, 600 oneDNN; [4, 576] x [576, 1536] 312, 284).
MIN_DIM = 256


# On AMD CPUs without AVX-512 (Zen 2/3) MKL's AVX2 code and oneDNN's are the same width, and MKL's is the faster
# on products of many rows (session 8, AVX2 EPYC: BLAS 1.1-1.5x on the backward's products at 416-1024 rows,
# 1.0-1.3x forward) while oneDNN still wins at decode shapes (1.4-1.9x at 4 rows): there `auto` sends only
# products of fewer rows than this to oneDNN. With AVX-512 (Zen 4/5) oneDNN is 2x at every shape: no limit.
FEW_ROWS = 256


@functools.cache
def onednn_rows_below() -> int | None:
    """oneDNN takes fp32 products of fewer rows than this (None: of any number of rows); see FEW_ROWS."""
    return FEW_ROWS if _fp32_choice() == "auto" and "avx512f" not in cpu_flags() else None


def _large(inner: int, out: int, rows: int) -> bool:
    limit = onednn_rows_below()
    return inner >= MIN_DIM and out >= MIN_DIM and (limit is None or rows < limit)


def _rerouted(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and fp32_kernel() == "onednn"


def linear(x: torch.Tensor, w: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias); through oneDNN for fp32 CPU tensors outside autograd (see the module docstring), and
    for a PackedWeight."""
    if isinstance(w, PackedWeight):
        return _onednn_linear(x, w.tensor, bias)
    tracked = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))
    if (not tracked and x.dim() >= 2 and x.numel() > 0 and w.dim() == 2
            and _large(w.shape[1], w.shape[0], x.numel() // x.shape[-1]) and _rerouted(x, w)):
        return _onednn_linear(x, w, bias)
    return F.linear(x, w, bias)


class _OneDnnFp32(TorchDispatchMode):
    """aten.mm(a, b) = a @ b is oneDNN's linear(a, b.T); aten.addmm(bias, a, b) the same with the bias added.
    Below autograd, so the backward pass's products (grad @ W, grad.T @ x) come through here too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.mm.default and not kwargs:
            a, b = args
            if a.numel() and b.numel() and _large(a.shape[1], b.shape[1], a.shape[0]) and _rerouted(a, b):
                return _onednn_linear(a, b.t())
        elif func is aten.addmm.default:
            bias, a, b = args[:3]
            plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and len(args) == 3
            if (plain and bias.dim() == 1 and bias.shape[0] == b.shape[1] and a.numel() and b.numel()
                    and _large(a.shape[1], b.shape[1], a.shape[0]) and _rerouted(bias, a, b)):
                return _onednn_linear(a, b.t(), bias)
        return func(*args, **kwargs)


_ACTIVE = threading.local()


@contextlib.contextmanager
def onednn_fp32(model=None, *, active: bool = True):
    """Route fp32 CPU matmuls (forward and backward) to oneDNN inside the block when that is the faster kernel
    (and, given a model, when its parameters are fp32 on the CPU: otherwise nothing would be rerouted and every op
    would still pay the mode's few µs; nor when it has no weight of MIN_DIM x MIN_DIM). Re-entrant: an inner block
    inside an active one adds nothing."""
    if model is not None:
        p = next(model.parameters())
        # under autocast the products arrive in bf16 (autocast runs before the mode): nothing to reroute
        active = active and p.dtype == torch.float32 and p.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        active = active and any(w.dim() == 2 and min(w.shape) >= MIN_DIM for w in model.parameters())
    if not active or getattr(_ACTIVE, "on", False) or fp32_kernel() != "onednn":
        yield
        return
    _ACTIVE.on = True
    try:
        with _OneDnnFp32():
            yield
    finally:
        _ACTIVE.on = False
