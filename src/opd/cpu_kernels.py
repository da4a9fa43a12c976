"""opd's own CPU kernel for the decode step's int8 products, where torch's is slow.

torch's weight-only int8 kernel (`torch._weight_int8pack_mm`) takes bf16 activations and, on CPUs without
AVX-512, runs at ~50 GFLOP/s on 2 cores: a decode step of the half-depth SmolLM2 student at batch 4 spent 12.6 of
its ~20 ms there (bench/NOTES.md, session 10). `csrc/int8_gemv.c` is a plain loop that widens each int8 weight
to fp32 in registers and uses it for up to four activation rows, exact fp32 (the activations are not rounded),
in two builds of the same source: AVX2 + FMA (2-2.3x torch's kernel at 1-16 rows on an AVX2 EPYC) and AVX-512F
with software prefetch of the weights streaming in (1.6x torch's kernel at 4 rows on a Xeon with AMX, where
torch's ran no faster than the AVX2 loop: bench/NOTES.md, session 11).

`csrc/decode_step.c` builds on it: a whole int8 decode step of a Llama model (norms, RoPE, cache write,
attention, MLP, LM head) in one call, for opd.rollout.fast_llama (`decode_step`).

It is compiled on first use with the machine's C compiler (`cc`, ~1 s) into `~/.cache/opd/kernels/`
(`$OPD_KERNEL_CACHE` to move it), keyed on the source and flags, and loaded with ctypes (which releases the GIL).
OpenMP comes from the libgomp torch has already loaded, so the kernel shares torch's thread pool. Where there is
no x86 CPU with AVX2 + FMA, no compiler, or the build fails its check, `int8_gemv_available()` is False and opd
uses torch's kernel.

A third build, for CPUs with AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4), rounds each activation row
to int16 with its own scale (at most 1/65534 of the row's largest value off, ~100x finer than bf16) and takes
integer dot products: where a core has one 512-bit FMA unit the fp32 loop is bound by its arithmetic at 4 rows
(bench/NOTES.md, session 13).

Beside it, smaller C files need only AVX2 + FMA (`_plain_library`) and each has torch's ops as its fallback:
`adamw.c` (opd.update.bf16's optimizer step), `vocab_terms.c` (the update's and the teacher's full-vocabulary
terms), `layer_ops.c` (a no-grad layer's RMSNorm, RoPE and SiLU x up, bf16 with an AVX-512 BF16 build too, and
fp32) and `sample.c` (the draw of each token); bench/NOTES.md, sessions 14-15. `attention.c` (causal attention
for the teacher's scoring forward: fp32 with AVX-512F, session 15; bf16 on the AMX tile unit, session 19) needs
AVX-512F. `gemm_amx.c` (session 25) runs a frozen bf16 model's products on the AMX tile unit with their
elementwise steps in the epilogue (RoPE, SiLU x up, the residual add) and its LM head straight into the teacher's
token terms (AmxWeight, amx_linear, amx_head_terms).

OPD_INT8_KERNEL = auto (the default: the VNNI build where the CPU has it, else the AVX-512 one where it has
AVX-512F, else the AVX2 one) | avx512 (exact fp32 products) | avx2 | torch (torch's kernel, bf16 activations).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from opd import matmul

FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def kernel_cache() -> Path:
    return Path(os.environ.get("OPD_KERNEL_CACHE") or Path.home() / ".cache" / "opd" / "kernels").expanduser()


def build(source: Path, cache: Path) -> Path:
    """Compile `source` into `cache` (once per source, the C files and headers beside it that it may include, and
    flags); a concurrent build by another process is safe: each writes a temporary file and renames it into place."""
    sources = [source] + sorted(p for p in [*source.parent.glob("*.c"), *source.parent.glob("*.h")] if p != source)
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_out = Path(tmp) / out.name
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(tmp_out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)
    return out


CHOICES = ("auto", "avx512", "avx2", "torch")
ARGTYPES = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int]


def _choice() -> str:
    return matmul.env_choice("OPD_INT8_KERNEL", CHOICES)


@dataclass(frozen=True)
class _Kernel:
    fn: ctypes._CFuncPtr  # the build's entry point
    variant: str  # "vnni" | "avx512" | "avx2"
    lib: ctypes.CDLL  # also holds the whole decode step (decode_step below)


@functools.cache
def _library() -> _Kernel | None:
    """The kernel this process runs (None: torch's), decided once: OPD_INT8_KERNEL, the CPU's flags, the build."""
    choice = _choice()
    if choice == "torch" or not {"avx2", "fma"} <= matmul.cpu_flags():
        return None
    try:
        with resources.as_file(resources.files("opd") / "csrc") as csrc:  # decode_step.c includes int8_gemv.c
            lib = ctypes.CDLL(str(build(Path(csrc) / "decode_step.c", kernel_cache())))
    except (OSError, RuntimeError):
        return None  # no compiler, a failed build, an unwritable cache: torch's kernel it is
    for fn in (lib.opd_int8_gemv, lib.opd_int8_gemv_avx512, lib.opd_int8_gemv_vnni, lib.opd_int8_gemv_vnni_loop,
               lib.opd_int8_gemv_amx):
        fn.restype, fn.argtypes = None, ARGTYPES
    lib.opd_amx_request.restype, lib.opd_amx_request.argtypes = ctypes.c_int, []
    lib.opd_quantize_int8.restype = None
    lib.opd_quantize_int8.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int]
    lib.opd_quantize_set_wide.restype, lib.opd_quantize_set_wide.argtypes = None, [ctypes.c_int]
    lib.opd_decode_step.restype, lib.opd_decode_step.argtypes = None, [ctypes.POINTER(DecodeStep)]
    lib.opd_decode_scratch_floats.restype, lib.opd_decode_scratch_floats.argtypes = ctypes.c_int64, [ctypes.c_int64] * 7
    lib.opd_amx_set_min_rows.restype, lib.opd_amx_set_min_rows.argtypes = None, [ctypes.c_int]
    lib.opd_amx_get_min_rows.restype, lib.opd_amx_get_min_rows.argtypes = ctypes.c_int, []
    flags = matmul.cpu_flags()
    if AMX_FLAGS <= flags and lib.opd_amx_request():  # the VNNI build may then run products on the tile unit
        lib.opd_amx_set_min_rows(_amx_min_rows(lib))
    lib.opd_decode_set_wide.restype, lib.opd_decode_set_wide.argtypes = None, [ctypes.c_int]
    if choice == "auto" and VNNI_FLAGS <= flags and _passes_check(lib.opd_int8_gemv_vnni, "vnni"):
        kernel = _Kernel(lib.opd_int8_gemv_vnni, "vnni", lib)
    elif choice in ("auto", "avx512") and "avx512f" in flags and _passes_check(lib.opd_int8_gemv_avx512):
        kernel = _Kernel(lib.opd_int8_gemv_avx512, "avx512", lib)
    elif _passes_check(lib.opd_int8_gemv):
        kernel = _Kernel(lib.opd_int8_gemv, "avx2", lib)
    else:
        return None
    lib.opd_decode_set_wide(int(kernel.variant != "avx2"))  # the decode step's own loops: as wide as the products
    return kernel


AMX_MAX_TIMED_ROWS = 8  # from 8 rows the tile unit won on every host measured (sessions 13, 17)


def _amx_min_rows(lib: ctypes.CDLL) -> int:
    """From how many activation rows the VNNI build's products run on the tile unit: OPD_AMX_MIN_ROWS, else timed
    here. Which loop is faster at 2-7 rows depends on the host (session 13: the tile loop lost at 1-4 rows; session
    17, the same machine in another phase: it won from 2-3), so both run over ~14 MB of int8 weights in a decode
    step's shapes, a few passes each, interleaved (~30 ms, once a process), and the tile unit takes every row count
    from the smallest where it won at that count and all larger ones."""
    setting = os.environ.get("OPD_AMX_MIN_ROWS", "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"OPD_AMX_MIN_ROWS={setting!r}: expected a whole number of rows, at least 1 (products "
                             "of that many activation rows or more run on the AMX tile unit); unset it to time the choice")
        return int(setting)
    g = torch.Generator().manual_seed(0)
    N, K, layers = 3072, 576, 8  # eight gate/up products of the SmolLM2 student: L3-sized, as in a decode step
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).repeat(layers, 1, 1)
    scale = torch.rand(N, generator=g)
    threads = torch.get_num_threads()

    def seconds(fn, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        for w in q:
            fn(x.data_ptr(), x.shape[0], w.data_ptr(), scale.data_ptr(), y.data_ptr(), N, K, threads)
        return time.perf_counter() - start

    tile_wins = []
    for rows in range(1, AMX_MAX_TIMED_ROWS):
        x, y = torch.randn(rows, K, generator=g), torch.empty(rows, N)
        seconds(lib.opd_int8_gemv_amx, x, y), seconds(lib.opd_int8_gemv_vnni_loop, x, y)  # warm
        tile = sorted(seconds(lib.opd_int8_gemv_amx, x, y) for _ in range(3))[1]
        vector = sorted(seconds(lib.opd_int8_gemv_vnni_loop, x, y) for _ in range(3))[1]
        tile_wins.append(tile < vector)
    rows = AMX_MAX_TIMED_ROWS
    while rows > 1 and tile_wins[rows - 2]:
        rows -= 1
    return rows


def amx_min_rows() -> int | None:
    """From how many rows this process's int8 products run on the tile unit (None: they never do)."""
    kernel = _library()
    if kernel is None or kernel.variant != "vnni":
        return None
    rows = kernel.lib.opd_amx_get_min_rows()  # -1: the process has no tile unit
    return None if rows < 0 else rows


def variant() -> str | None:
    """Which build of opd's kernel int8_gemv runs here: "vnni", "avx512", "avx2", or None (torch's kernel)."""
    kernel = _library()
    return None if kernel is None else kernel.variant


VNNI_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
AMX_FLAGS = VNNI_FLAGS | {"amx_tile", "amx_int8"}
AMX_BF16_FLAGS = frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"})


def rounding_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, build: str | None) -> torch.Tensor:
    """How far `build`'s x @ (q * scale).T may be from the exact product, element by element, beyond fp32 rounding:
    zero for the fp32 builds; for the VNNI build each activation is off by at most half a rounding step of its row
    (max |x| / 32767 / 2 as int16; max |x| / (127 * 254) / 2 as the tile unit's two int8 terms, the larger),
    times the sum of |q * scale| of the output channel."""
    if build != "vnni":
        return torch.zeros(x.shape[0], q.shape[0])
    half_step = x.abs().amax(1, keepdim=True).double() / (127 * 254) / 2
    return half_step * (q.double().abs().sum(1) * scale.double().abs())[None, :]


def _passes_check(fn, build: str = "avx2") -> bool:
    """One small product against torch before the kernel is trusted (odd sizes: the tail paths run too)."""
    g = torch.Generator().manual_seed(0)
    for B, N, K in ((5, 67, 37), (9, 48, 128)):  # the second one: the tile unit's shapes, at 8+ rows
        x, q = torch.randn(B, K, generator=g), torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        scale = torch.rand(N, generator=g)
        y = torch.empty(B, N)
        fn(x.data_ptr(), B, q.data_ptr(), scale.data_ptr(), y.data_ptr(), N, K, 1)
        want = (x.double() @ q.double().T) * scale.double()
        if not ((y.double() - want).abs() <= rounding_bound(x, q, scale, build) + 1e-4 * (1 + want.abs())).all():
            return False
    return True


def int8_gemv_available() -> bool:
    return _library() is not None


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, K] fp32 @ (q [N, K] int8 * scale [N] fp32)[:, None].T -> [B, N] fp32, on the CPU."""
    kernel = _library()
    if kernel is None:
        raise RuntimeError("opd's int8 kernel is not available here (see opd.cpu_kernels.int8_gemv_available)")
    if x.dtype != torch.float32 or q.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(f"int8_gemv takes fp32 x, int8 q and fp32 scale, not {x.dtype}, {q.dtype}, {scale.dtype}")
    (B, K), (N, Kq) = x.shape, q.shape
    if K != Kq or scale.shape != (N,) or x.device.type != "cpu":
        raise ValueError(f"int8_gemv: x {tuple(x.shape)} on {x.device}, q {tuple(q.shape)}, scale {tuple(scale.shape)}")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    y = torch.empty(B, N)
    kernel.fn(x.data_ptr(), B, q.data_ptr(), scale.data_ptr(), y.data_ptr(), N, K, torch.get_num_threads())
    return y


def quantize_int8_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """q, scale = the int8 rows of w [N, K] (fp32 or bf16, contiguous, CPU) and their fp32 scales, in one C pass
    with the bits of opd.llama.quantize_int8's torch ops (csrc/int8_gemv.c). False (nothing written) where the
    kernel or the inputs do not fit: the caller runs the torch ops then."""
    kernel = _library()
    if (kernel is None or w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous()
            or w.dtype not in (torch.float32, torch.bfloat16) or q.dtype != torch.int8 or not q.is_contiguous()
            or q.shape != w.shape or scale.dtype != torch.float32 or scale.shape != (w.shape[0],) or not scale.is_contiguous()):
        return False
    kernel.lib.opd_quantize_int8(w.data_ptr(), int(w.dtype == torch.bfloat16), q.data_ptr(), scale.data_ptr(),
                                 w.shape[0], w.shape[1], torch.get_num_threads())
    return True


def quantize_int8_wide(on: bool) -> None:
    """Run the requantisation's AVX-512 loop (on; the default where the CPU has AVX-512BW and VL) or its AVX2 one
    (the tests compare both)."""
    kernel = _library()
    if kernel is not None:
        if on and not {"avx512bw", "avx512vl"} <= matmul.cpu_flags():
            raise RuntimeError("quantize_int8_wide(True): this CPU has no AVX-512BW / VL")
        kernel.lib.opd_quantize_set_wide(int(on))


# ------------------------------------------------------------------------------------- the whole decode step
_P = ctypes.c_void_p


class DecodeStep(ctypes.Structure):
    """The arguments of csrc/decode_step.c's opd_decode_step (the same fields in the same order as its struct)."""

    _fields_ = [(name, ctypes.c_int64) for name in
                ("batch", "hidden", "heads", "kv_heads", "head_dim", "inter", "layers", "vocab")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        *[(name, _P) for name in ("qkv_q", "qkv_s", "o_q", "o_s", "gu_q", "gu_s", "down_q", "down_s", "in_norm",
                                  "post_norm", "final_norm", "head_q", "head_s", "embed")],
        ("embed_bf16", ctypes.c_int64), ("cache", _P), ("cache_batch", ctypes.c_int64), ("max_len", ctypes.c_int64),
        ("cos", _P), ("sin", _P), ("tokens", _P), ("positions", _P), ("pos_stride", ctypes.c_int64), ("mask", _P),
        ("mask_stride", ctypes.c_int64), ("start", ctypes.c_int64), ("scratch", _P), ("logits", _P),
        ("threads", ctypes.c_int64), ("gemv", _P)]


def decode_scratch_floats(batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int,
                          max_len: int) -> int:
    return _library().lib.opd_decode_scratch_floats(batch, hidden, heads, kv_heads, head_dim, inter, max_len)


def decode_step(args: DecodeStep) -> None:
    """One decode step of every layer (csrc/decode_step.c), wherever int8_gemv_available() (its products are that
    kernel's, in the build this process runs, on torch's threads); `args` holds raw pointers: the caller keeps the
    tensors alive."""
    kernel = _library()
    args.gemv, args.threads = ctypes.cast(kernel.fn, ctypes.c_void_p).value, torch.get_num_threads()
    kernel.lib.opd_decode_step(ctypes.byref(args))


# ------------------------------------------------------------------------------------- the AVX2 + FMA C files
def _plain_library(source: str) -> ctypes.CDLL | None:
    """One of the csrc files that need only AVX2 + FMA, built and loaded; None where it cannot be (not x86 with
    AVX2, no compiler, a failed build): its callers run torch's ops then."""
    if not {"avx2", "fma"} <= matmul.cpu_flags():
        return None
    try:
        with resources.as_file(resources.files("opd") / "csrc") as csrc:
            return ctypes.CDLL(str(build(Path(csrc) / source, kernel_cache())))
    except (OSError, RuntimeError):
        return None


# ------------------------------------------------------------------------------------- the optimizer step
@functools.cache
def _optimizer_library() -> ctypes.CDLL | None:
    """csrc/adamw.c, for opd.update.bf16 (torch's ops where it is None)."""
    lib = _plain_library("adamw.c")
    if lib is None:
        return None
    lib.opd_adamw_step.restype = None
    lib.opd_adamw_step.argtypes = [_P, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int64, *[ctypes.c_float] * 8, ctypes.c_int]
    lib.opd_adamw_step_int8.restype = None
    lib.opd_adamw_step_int8.argtypes = [_P, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P,
                                        *[ctypes.c_float] * 8, ctypes.c_int]
    lib.opd_sum_squares_many.restype = ctypes.c_double
    lib.opd_sum_squares_many.argtypes = [_P, _P, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    return lib


def adamw_available() -> bool:
    return _optimizer_library() is not None


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               copy: torch.Tensor | None, *, grad_mul: float, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: float, int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One AdamW step of fp32 `param` (and its fp32 moments) from a bf16 or fp32 `grad` times `grad_mul`, writing
    bf16 `copy` (or nothing where None) in the same pass (csrc/adamw.c). Every tensor contiguous, on the CPU, of
    param's shape. The bias corrections are computed in double, as torch's fused AdamW does. With `int8` = (q, scale)
    ([rows, K] int8 and [rows] fp32, contiguous) for a 2-D param, the pass also writes the copy's int8 rows and scales:
    the bits of quantize_int8_into(copy, q, scale)."""
    lib = _optimizer_library()
    if lib is None:
        raise RuntimeError("opd's AdamW kernel is not available here (see opd.cpu_kernels.adamw_available)")
    tensors = [param, grad, exp_avg, exp_avg_sq] + ([] if copy is None else [copy])
    if any(t.device.type != "cpu" or not t.is_contiguous() or t.shape != param.shape for t in tensors):
        raise ValueError("adamw_step: every tensor contiguous, on the CPU, of the parameter's shape")
    if param.dtype != torch.float32 or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32 \
            or grad.dtype not in (torch.float32, torch.bfloat16) or (copy is not None and copy.dtype != torch.bfloat16):
        raise TypeError(f"adamw_step: fp32 param and moments, bf16/fp32 grad, bf16 copy; got {[t.dtype for t in tensors]}")
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    if int8 is not None:
        q, scale = int8
        if (copy is None or param.dim() != 2 or q.dtype != torch.int8 or q.shape != param.shape or not q.is_contiguous()
                or scale.dtype != torch.float32 or scale.shape != param.shape[:1] or not scale.is_contiguous()):
            raise ValueError("adamw_step(int8=(q, scale)): a bf16 copy, a 2-D param, int8 q of its shape and fp32 "
                             "scales [rows], contiguous")
        lib.opd_adamw_step_int8(param.data_ptr(), grad.data_ptr(), int(grad.dtype == torch.bfloat16), exp_avg.data_ptr(),
                                exp_avg_sq.data_ptr(), copy.data_ptr(), param.shape[0], param.shape[1], q.data_ptr(),
                                scale.data_ptr(), grad_mul, lr, beta1, beta2, eps, weight_decay, lr / bc1, bc2_sqrt,
                                torch.get_num_threads())
        return
    lib.opd_adamw_step(param.data_ptr(), grad.data_ptr(), int(grad.dtype == torch.bfloat16), exp_avg.data_ptr(),
                       exp_avg_sq.data_ptr(), None if copy is None else copy.data_ptr(), param.numel(), grad_mul, lr,
                       beta1, beta2, eps, weight_decay, lr / bc1, bc2_sqrt, torch.get_num_threads())


def sum_squares_all(tensors: list[torch.Tensor]) -> float:
    """sum(t ** 2) over all of `tensors`: the contiguous bf16 and fp32 CPU ones in one C pass per dtype (one thread
    team for all of them, not one per tensor; csrc/adamw.c), any others by torch's ops (an fp64 sum) one by one."""
    lib = _optimizer_library()
    dtypes = (torch.bfloat16, torch.float32) if lib is not None else ()
    total = 0.0
    for dtype in dtypes:
        group = [t for t in tensors if t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() and t.numel()]
        if not group:
            continue
        ptrs = torch.tensor([t.data_ptr() for t in group], dtype=torch.int64)
        sizes = torch.tensor([t.numel() for t in group], dtype=torch.int64)
        got = lib.opd_sum_squares_many(ptrs.data_ptr(), sizes.data_ptr(), len(group), int(dtype == torch.bfloat16),
                                       torch.get_num_threads())
        if got < 0:
            raise MemoryError("opd_sum_squares_many: no memory for its list of chunks")
        total += got
    rest = [t for t in tensors if not (t.dtype in dtypes and t.device.type == "cpu" and t.is_contiguous())]
    return total + sum(float(t.float().square().sum(dtype=torch.float64)) for t in rest)


# ------------------------------------------------------------------------------------- the update's vocabulary terms
@functools.cache
def _vocab_library() -> ctypes.CDLL | None:
    """csrc/vocab_terms.c, for opd.objectives.fused (its torch ops where this is None)."""
    lib = _plain_library("vocab_terms.c")
    if lib is None:
        return None
    lib.opd_vocab_terms_forward.restype = None
    lib.opd_vocab_terms_forward.argtypes = [_P, ctypes.c_int, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                            _P, _P, _P, _P, _P, ctypes.c_int]
    lib.opd_vocab_terms_backward.restype = None
    lib.opd_vocab_terms_backward.argtypes = [_P, ctypes.c_int, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                             _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.opd_log_softmax_rows.restype = None
    lib.opd_log_softmax_rows.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                         _P, _P, _P, _P, _P, ctypes.c_int]
    lib.opd_vocab_terms_set_wide.restype, lib.opd_vocab_terms_set_wide.argtypes = None, [ctypes.c_int]
    lib.opd_vocab_terms_wide.restype, lib.opd_vocab_terms_wide.argtypes = ctypes.c_int, []
    lib.opd_vocab_terms_set_wide(int("avx512f" in matmul.cpu_flags()))  # the exp-bound loops 16 lanes wide
    return lib


def vocab_terms_wide(on: bool | None = None) -> bool:
    """Whether csrc/vocab_terms.c runs its AVX-512F loops (the default where the CPU has AVX-512F); `on` switches
    them (the tests run both). False where the library is not built."""
    lib = _vocab_library()
    if lib is None:
        return False
    if on is not None:
        if on and "avx512f" not in matmul.cpu_flags():
            raise RuntimeError("vocab_terms_wide(True): this CPU has no AVX-512F")
        lib.opd_vocab_terms_set_wide(int(on))
    return bool(lib.opd_vocab_terms_wide())


def _rows_fit(rows: torch.Tensor | None, n: int, limit: int) -> bool:
    """Row indices the C code may follow: none, or contiguous int64 [n] on the CPU, each in [0, limit)."""
    if rows is None:
        return True
    return (rows.device.type == "cpu" and rows.dtype == torch.int64 and rows.is_contiguous() and rows.shape == (n,)
            and (n == 0 or (int(rows.min()) >= 0 and int(rows.max()) < limit)))


def vocab_terms_fit(logits: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                    teacher_rows: torch.Tensor | None = None) -> bool:
    """Whether csrc/vocab_terms.c takes these: built here, CPU, contiguous [n, V] bf16 / fp32 logits, fp32 teacher
    log-probs of the same shape (or none), int64 targets [n] within the vocabulary. With `teacher_rows` [n], row r's
    teacher log-probs are teacher[teacher_rows[r]] of any contiguous [R, V] block instead."""
    if _vocab_library() is None:
        return False
    n = logits.shape[0] if logits.dim() == 2 else -1
    ok = (logits.device.type == "cpu" and logits.dim() == 2 and logits.is_contiguous()
          and logits.dtype in (torch.float32, torch.bfloat16) and targets.dtype == torch.int64
          and targets.is_contiguous() and targets.shape == (n,))
    if ok and teacher is not None:
        ok = teacher.dtype == torch.float32 and teacher.device.type == "cpu" and teacher.is_contiguous()
        if teacher_rows is None:
            ok = ok and teacher.shape == logits.shape
        else:
            ok = ok and teacher.dim() == 2 and teacher.shape[1] == logits.shape[1] and _rows_fit(teacher_rows, n, teacher.shape[0])
    return ok and (targets.numel() == 0 or (int(targets.min()) >= 0 and int(targets.max()) < logits.shape[1]))


def _scratch(V: int) -> torch.Tensor:
    return torch.empty(2 * V * max(1, torch.get_num_threads()))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def vocab_terms_forward(logits: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, temperature: float,
                        teacher_rows: torch.Tensor | None = None):
    """(token logprob, entropy, KL, log-sum-exp) [n] each of log_softmax(logits / T) (see csrc/vocab_terms.c);
    the caller has checked vocab_terms_fit."""
    n, V = logits.shape
    tok, ent, kl, lse = (torch.empty(n) for _ in range(4))
    scratch = _scratch(V)  # held here: a temporary's memory would be freed before the call
    _vocab_library().opd_vocab_terms_forward(
        logits.data_ptr(), int(logits.dtype == torch.bfloat16), _ptr(teacher), _ptr(teacher_rows),
        targets.data_ptr(), n, V, 1.0 / temperature, tok.data_ptr(), ent.data_ptr(), kl.data_ptr(), lse.data_ptr(),
        scratch.data_ptr(), torch.get_num_threads())
    return tok, ent, kl, lse


def vocab_terms_backward(logits: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor, temperature: float,
                         lse: torch.Tensor, kl: torch.Tensor, g_tok: torch.Tensor, g_kl: torch.Tensor | None,
                         teacher_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of the logits (in their dtype) given the forward's lse and kl and the outputs' gradients."""
    n, V = logits.shape
    grad = torch.empty_like(logits)
    g_tok = g_tok.float().contiguous()
    g_kl = None if g_kl is None else g_kl.float().contiguous()
    scratch = _scratch(V)
    _vocab_library().opd_vocab_terms_backward(
        logits.data_ptr(), int(logits.dtype == torch.bfloat16), _ptr(teacher), _ptr(teacher_rows),
        targets.data_ptr(), n, V, 1.0 / temperature, lse.data_ptr(), kl.data_ptr(), g_tok.data_ptr(),
        _ptr(g_kl), grad.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return grad


def log_softmax_rows(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     out: torch.Tensor | None = None, out_rows: torch.Tensor | None = None):
    """(token logprob [n], entropy [n], log-probs [n, V] fp32) of log_softmax(logits / T), one C pass a row (the
    teacher's full distribution); None where vocab_terms_fit says no. With `out` (contiguous fp32 [R, V]) and
    `out_rows` [n], row r's log-probs go to out[out_rows[r]] and `out` comes back in the third place."""
    if out is None:
        out_rows = None
    if not vocab_terms_fit(logits, out, targets, out_rows):  # `out` takes the same checks as a teacher block
        return None
    n, V = logits.shape
    if out is None:
        out = torch.empty(n, V)
    tok, ent = torch.empty(n), torch.empty(n)
    scratch = torch.empty(V * max(1, torch.get_num_threads()))
    _vocab_library().opd_log_softmax_rows(logits.data_ptr(), int(logits.dtype == torch.bfloat16), targets.data_ptr(),
                                          n, V, 1.0 / temperature, out.data_ptr(), _ptr(out_rows), tok.data_ptr(),
                                          ent.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return tok, ent, out


# ------------------------------------------------------------------------------------- a no-grad layer's elementwise steps
BF16_FLAGS = frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16"})


@dataclass(frozen=True)
class _LayerOps:
    rms_norm: ctypes._CFuncPtr
    rope: ctypes._CFuncPtr
    silu_mul: ctypes._CFuncPtr | None  # None: torch's op (the AVX2 build has none: it ran slower than torch's)
    variant: str  # "avx512_bf16" | "avx2"
    # bf16 training steps (AVX-512 BF16 build only; None: autograd's torch ops)
    silu_mul_pair: ctypes._CFuncPtr | None
    silu_mul_backward: ctypes._CFuncPtr | None
    rms_norm_backward: ctypes._CFuncPtr | None
    causal_softmax: ctypes._CFuncPtr | None
    causal_softmax_backward: ctypes._CFuncPtr | None
    add_rms_norm: ctypes._CFuncPtr | None  # no-grad, AVX-512 BF16 build only (None: an add, then rms_norm)
    # the fp32 steps (one AVX2 build everywhere: memory-bound)
    rms_norm_f32: ctypes._CFuncPtr
    rope_f32: ctypes._CFuncPtr
    silu_mul_f32: ctypes._CFuncPtr


def _layer_ops(lib: ctypes.CDLL, variant: str) -> _LayerOps:
    wide = variant == "avx512_bf16"
    suffix = "_avx512" if wide else ""
    i64 = ctypes.c_int64
    args = {"rms_norm": [_P, _P, _P, i64, i64, ctypes.c_float, ctypes.c_int],
            "rope": [_P, i64, i64, i64, i64, _P, _P, _P, ctypes.c_int], "silu_mul": [_P, _P, i64, i64, ctypes.c_int],
            "silu_mul_pair": [_P, _P, _P, i64, i64, ctypes.c_int],
            "silu_mul_backward": [_P, _P, _P, _P, _P, i64, i64, ctypes.c_int],
            "rms_norm_backward": [_P, _P, _P, _P, _P, i64, i64, ctypes.c_float, ctypes.c_int],
            "causal_softmax": [_P, _P, i64, i64, i64, ctypes.c_float, ctypes.c_int],
            "causal_softmax_backward": [_P, _P, _P, i64, i64, i64, ctypes.c_float, ctypes.c_int],
            "add_rms_norm": [_P, _P, _P, _P, i64, i64, ctypes.c_float, ctypes.c_int]}

    def fn(name: str, symbol: str) -> ctypes._CFuncPtr:
        f = getattr(lib, symbol)
        f.restype, f.argtypes = None, args[name]
        return f

    return _LayerOps(fn("rms_norm", f"opd_rms_norm_bf16{suffix}"), fn("rope", f"opd_rope_bf16{suffix}"),
                     fn("silu_mul", "opd_silu_mul_bf16_avx512") if wide else None, variant,
                     *(fn(name, f"opd_{name}_bf16_avx512") if wide else None
                       for name in ("silu_mul_pair", "silu_mul_backward", "rms_norm_backward", "causal_softmax",
                                    "causal_softmax_backward", "add_rms_norm")),
                     *(fn(name, f"opd_{name}_f32") for name in ("rms_norm", "rope", "silu_mul")))


@functools.cache
def _layer_library() -> _LayerOps | None:
    """csrc/layer_ops.c, for opd.llama's no-grad forwards (torch's ops where this is None): its bf16 steps in the
    AVX-512 BF16 build where the CPU has that (hardware bf16 rounding), else the AVX2 one; its fp32 steps."""
    lib = _plain_library("layer_ops.c")
    if lib is None:
        return None
    return _layer_ops(lib, "avx512_bf16" if BF16_FLAGS <= matmul.cpu_flags() else "avx2")


def _layer_cpu(*tensors: torch.Tensor) -> bool:
    """Whether csrc/layer_ops.c takes these: contiguous CPU tensors all bf16 or all fp32, no grad, the library built."""
    return (tensors[0].dtype in (torch.bfloat16, torch.float32)
            and all(t.dtype == tensors[0].dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and not torch.is_grad_enabled() and _layer_library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """opd.llama.rms_norm of a contiguous bf16 or fp32 CPU tensor without grad in one C pass; None where it does
    not apply."""
    if not _layer_cpu(x, weight) or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        return None
    y = torch.empty_like(x)
    n = weight.shape[0]
    ops = _layer_library()
    fn = ops.rms_norm if x.dtype == torch.bfloat16 else ops.rms_norm_f32
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps, torch.get_num_threads())
    return y


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x += delta in place (rounded to bf16), then rms_norm(x) as rms_norm does, in one C pass (contiguous bf16
    tensors of one shape, no grad, the AVX-512 BF16 build); None (x untouched) where it does not apply."""
    if (not _layer_cpu(x, delta, weight) or x.dtype != torch.bfloat16 or x.shape != delta.shape or weight.dim() != 1
            or x.shape[-1] != weight.shape[0] or _layer_library().add_rms_norm is None):
        return None
    y = torch.empty_like(x)
    n = weight.shape[0]
    _layer_library().add_rms_norm(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n,
                                  eps, torch.get_num_threads())
    return y


def rope_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> bool:
    """RoPE in place on the first `heads` heads of x [B, T, all heads, D] (contiguous bf16 or fp32), row (b, t) at
    positions[b, t] of the [positions, D] tables of x's dtype; False (nothing done) where it does not apply."""
    if (not _layer_cpu(x, cos, sin) or x.dim() != 4 or positions.dtype != torch.int64 or not positions.is_contiguous()
            or positions.shape != x.shape[:2] or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != x.shape[3]
            or x.shape[3] % 2 or not 0 <= heads <= x.shape[2]):
        return False
    if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < cos.shape[0]):
        return False
    B, T, all_heads, D = x.shape
    ops = _layer_library()
    fn = ops.rope if x.dtype == torch.bfloat16 else ops.rope_f32
    fn(x.data_ptr(), B * T, all_heads * D, heads, D, cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
       torch.get_num_threads())
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up of gate_up [..., 2 * inter] (gate first; contiguous bf16 or fp32, no grad) in one C pass;
    None where it does not apply."""
    if not _layer_cpu(gate_up) or gate_up.shape[-1] % 2:
        return None
    ops = _layer_library()
    fn = ops.silu_mul if gate_up.dtype == torch.bfloat16 else ops.silu_mul_f32
    if fn is None:
        return None
    inter = gate_up.shape[-1] // 2
    y = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
    fn(gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * inter), inter, torch.get_num_threads())
    return y


# ------------------------------------------------------------------------------------- bf16 training steps
def bf16_training_ops() -> bool:
    """Whether csrc/layer_ops.c's bf16 training steps (forward and backward of RMSNorm and SiLU x up) run here: the
    AVX-512 BF16 build (opd.update.layer_ops uses autograd's torch ops elsewhere)."""
    ops = _layer_library()
    return ops is not None and ops.rms_norm_backward is not None


def bf16_cpu(*tensors: torch.Tensor) -> bool:
    """Whether these are all contiguous bf16 CPU tensors (what the bf16 training steps take)."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def silu_mul_pair(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(F.silu(gate)) * up) of two contiguous bf16 CPU tensors of one shape (bf16_training_ops())."""
    assert bf16_training_ops() and bf16_cpu(gate, up) and gate.shape == up.shape
    y = torch.empty_like(gate)
    n = gate.shape[-1]
    _layer_library().silu_mul_pair(gate.data_ptr(), up.data_ptr(), y.data_ptr(), gate.numel() // max(1, n), n,
                                   torch.get_num_threads())
    return y


def silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of silu_mul_pair given its output's gradient dy (all contiguous bf16 of one shape)."""
    assert bf16_training_ops() and bf16_cpu(gate, up, dy) and gate.shape == up.shape == dy.shape
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.shape[-1]
    _layer_library().silu_mul_backward(gate.data_ptr(), up.data_ptr(), dy.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                       gate.numel() // max(1, n), n, torch.get_num_threads())
    return dg, du


def causal_softmax(scores: torch.Tensor, q_len: int, scale: float = 1.0) -> torch.Tensor:
    """bf16(softmax(scale x row)) of each row of scores [..., rows, Lk] (contiguous bf16) over its keys 0 ..
    (row % q_len) + Lk - q_len, zeros after: the causal attention's probabilities (csrc/layer_ops.c;
    bf16_training_ops only)."""
    assert bf16_training_ops() and bf16_cpu(scores) and scores.shape[-2] % q_len == 0 and q_len <= scores.shape[-1]
    probs = torch.empty_like(scores)
    Lk = scores.shape[-1]
    _layer_library().causal_softmax(scores.data_ptr(), probs.data_ptr(), scores.numel() // Lk, q_len, Lk, scale,
                                    torch.get_num_threads())
    return probs


def causal_softmax_backward(probs: torch.Tensor, dprobs: torch.Tensor, q_len: int, scale: float = 1.0) -> torch.Tensor:
    """The gradient of causal_softmax's scores from its probabilities and theirs (contiguous bf16, one shape)."""
    assert bf16_training_ops() and bf16_cpu(probs, dprobs) and probs.shape == dprobs.shape
    dscores = torch.empty_like(probs)
    Lk = probs.shape[-1]
    _layer_library().causal_softmax_backward(probs.data_ptr(), dprobs.data_ptr(), dscores.data_ptr(), probs.numel() // Lk,
                                             q_len, Lk, scale, torch.get_num_threads())
    return dscores


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, d weight) of y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) given dy (contiguous bf16; weight [n])."""
    assert bf16_training_ops() and bf16_cpu(x, weight, dy) and x.shape == dy.shape and weight.shape == (x.shape[-1],)
    n, threads = weight.shape[0], torch.get_num_threads()
    dx = torch.empty_like(x)
    parts = torch.zeros(max(1, threads), n)  # a part no thread ran for (fewer threads than asked) adds nothing
    _layer_library().rms_norm_backward(x.data_ptr(), weight.data_ptr(), dy.data_ptr(), dx.data_ptr(), parts.data_ptr(),
                                       x.numel() // n, n, eps, threads)
    return dx, parts.sum(0).to(torch.bfloat16)


# ------------------------------------------------------------------------------------- causal attention
@functools.cache
def _attention_library() -> ctypes.CDLL | None:
    """csrc/attention.c (AVX-512F), for opd.llama.causal_hidden in fp32, and in bf16 where attention_amx() (torch's
    SDPA where this is None)."""
    lib = _plain_library("attention.c") if "avx512f" in matmul.cpu_flags() else None
    if lib is None:
        return None
    lib.opd_causal_attention_f32.restype = None
    lib.opd_causal_attention_f32.argtypes = [_P, _P, _P, *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int]
    lib.opd_causal_attention_bf16_amx.restype = ctypes.c_int
    lib.opd_causal_attention_bf16_amx.argtypes = [_P, _P, _P, *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int]
    lib.opd_attention_bf16_scratch_bytes.restype = ctypes.c_int64
    lib.opd_attention_bf16_scratch_bytes.argtypes = [ctypes.c_int64]
    lib.opd_attention_amx_request.restype, lib.opd_attention_amx_request.argtypes = ctypes.c_int, []
    return lib


@functools.cache
def attention_amx() -> bool:
    """Whether bf16 causal_attention runs on the AMX tile unit here: the CPU has it and Linux hands this process its
    state."""
    lib = _attention_library()
    return lib is not None and AMX_BF16_FLAGS <= matmul.cpu_flags() and bool(lib.opd_attention_amx_request())


ATTENTION_HEAD_DIM = 64  # the one head size csrc/attention.c is written for (SmolLM2, Llama 3.2 1B)


def causal_attention(qkv: torch.Tensor, heads: int, kv_heads: int, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(Q K^T * scale, causal) V of qkv [B, L, heads + 2 kv_heads, D] (queries, keys, values; contiguous, no
    grad, rows from position 0) as [B, L, heads, D] in one C pass: fp32 with AVX-512F, bf16 on the AMX tile unit
    (causal_attention_bf16); None where it does not apply. `out`: a contiguous [B, L, heads, D] tensor of qkv's
    dtype to write into instead of a new one."""
    lib = _attention_library()
    if (lib is None or qkv.dtype not in (torch.float32, torch.bfloat16) or qkv.device.type != "cpu"
            or not qkv.is_contiguous() or qkv.dim() != 4 or qkv.shape[3] != ATTENTION_HEAD_DIM or torch.is_grad_enabled()
            or kv_heads < 1 or heads % kv_heads or qkv.shape[2] != heads + 2 * kv_heads or qkv.shape[1] == 0):
        return None
    if qkv.dtype == torch.bfloat16:
        # (its softmax takes each row's max of the unscaled scores: a positive scale, as every head size gives)
        return causal_attention_bf16(qkv, heads, kv_heads, scale, out) if attention_amx() and scale > 0 else None
    B, L, _, D = qkv.shape
    out = torch.empty(B, L, heads, D) if out is None else _checked_out(out, (B, L, heads, D), qkv.dtype)
    keys_t = torch.empty(B * kv_heads * D * ((L + 15) // 16 * 16))  # K^T, packed once for every query head
    lib.opd_causal_attention_f32(qkv.data_ptr(), out.data_ptr(), keys_t.data_ptr(), B, L, heads, kv_heads, scale,
                                 torch.get_num_threads())
    return out


def causal_attention_bf16(qkv: torch.Tensor, heads: int, kv_heads: int, scale: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """causal_attention of bf16 rows on the AMX tile unit (csrc/attention.c): fp32 scores and softmax, unnormalised
    bf16 probabilities and the output divided by their sum, as torch's flash kernel rounds them; the caller has
    checked causal_attention's conditions."""
    lib = _attention_library()
    B, L, _, D = qkv.shape
    threads = torch.get_num_threads()
    out = torch.empty(B, L, heads, D, dtype=torch.bfloat16) if out is None else _checked_out(out, (B, L, heads, D))
    scratch = torch.empty(threads * lib.opd_attention_bf16_scratch_bytes(L), dtype=torch.uint8)
    done = lib.opd_causal_attention_bf16_amx(qkv.data_ptr(), out.data_ptr(), scratch.data_ptr(), B, L, heads,
                                             kv_heads, scale, threads)
    assert done, "the AMX tile state was granted at load"
    return out


# ------------------------------------------------------------------------------------- bf16 products on AMX
@functools.cache
def _gemm_library() -> ctypes.CDLL | None:
    """csrc/gemm_amx.c: a frozen bf16 model's products, and its LM head with the teacher's token terms, on the AMX
    tile unit, built with attention.c as csrc/forward_amx.c (its decoder layers in one call); None where the CPU
    lacks it, Linux refuses this process the tile state, OPD_AMX_GEMM=off, or the build fails (oneDNN's products and
    opd.objectives.fused then)."""
    setting = matmul.env_choice("OPD_AMX_GEMM", ("auto", "off"))
    lib = _plain_library("forward_amx.c") if setting == "auto" and AMX_BF16_FLAGS <= matmul.cpu_flags() else None
    if lib is None:
        return None
    lib.opd_gemm_amx_request.restype, lib.opd_gemm_amx_request.argtypes = ctypes.c_int, []
    lib.opd_attention_amx_request.restype, lib.opd_attention_amx_request.argtypes = ctypes.c_int, []
    lib.opd_attention_bf16_scratch_bytes.restype = ctypes.c_int64
    lib.opd_attention_bf16_scratch_bytes.argtypes = [ctypes.c_int64]
    lib.opd_amx_layers_bf16.restype = ctypes.c_int
    lib.opd_amx_layers_bf16.argtypes = [_P, *[ctypes.c_int64] * 6, _P, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_float,
                                        _P, _P, _P, _P, ctypes.c_int64, ctypes.c_int]
    lib.opd_amx_linear_bf16.restype = ctypes.c_int
    lib.opd_amx_linear_bf16.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_int64, _P, ctypes.c_int64,
                                        ctypes.c_int, _P, ctypes.c_int64, _P, ctypes.c_int64, ctypes.c_int64,
                                        _P, _P, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.opd_amx_mlp_bf16.restype = ctypes.c_int
    lib.opd_amx_mlp_bf16.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, _P, _P, ctypes.c_int64, _P, _P, _P, _P,
                                     ctypes.c_float, ctypes.c_int64, ctypes.c_int]
    lib.opd_row_inv_rms_bf16.restype = None
    lib.opd_row_inv_rms_bf16.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, _P,
                                         ctypes.c_int]
    lib.opd_amx_head_terms_bf16.restype = ctypes.c_int
    lib.opd_amx_head_terms_bf16.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, _P, ctypes.c_int64, _P, ctypes.c_float,
                                            _P, _P, _P, ctypes.c_int]
    lib.opd_amx_head_scratch_bytes.restype, lib.opd_amx_head_scratch_bytes.argtypes = ctypes.c_int64, [ctypes.c_int64]
    return lib if lib.opd_gemm_amx_request() and lib.opd_attention_amx_request() else None


def gemm_amx() -> bool:
    """Whether frozen bf16 weights run their products on opd's AMX kernel here (AmxWeight)."""
    return _gemm_library() is not None


class AmxWeight:
    """A bf16 weight [out, in] of a model that no longer changes (a teacher, a reference model), packed once in the
    tile unit's layout for csrc/gemm_amx.c: 16-output column tiles, each [in / 32][16 pairs of k][16 outputs x 2],
    taken by the kernel two at a time. Two layouts put the tiles an epilogue needs side by side:
    - `silu_mul`: a fused gate/up weight [2 x intermediate, in], its tiles interleaved gate, up, gate, ...: the
      product returns silu(gate) x up [..., intermediate], the MLP's next input, in the same pass;
    - `rope_heads` (of `head_dim` outputs each, a multiple of 32): a fused QKV weight whose first rope_heads heads
      (queries and keys) pair dims d .. d + 15 with d + head_dim / 2 ..: the product rotates them (amx_linear's
      `rope`); the value heads' tiles stay in order."""

    def __init__(self, w: torch.Tensor, *, silu_mul: bool = False, rope_heads: int = 0, head_dim: int = 0):
        n, k = w.shape
        tiles = torch.arange(n // 16)
        if silu_mul:
            tiles = tiles.view(2, -1).t().reshape(-1)
        elif rope_heads:
            per_head, half = head_dim // 16, head_dim // 32
            rotated = [h * per_head + j + side * half for h in range(rope_heads) for j in range(half) for side in (0, 1)]
            tiles = torch.tensor(rotated + list(range(rope_heads * per_head, n // 16)))
        w = w.detach().reshape(n // 16, 16, k)[tiles]
        self.tensor = w.reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()
        self.tile_cols = (tiles * 16).to(torch.int32)  # where each packed tile's outputs go
        self.shape, self.silu_mul, self.rope_heads, self.head_dim = (n, k), silu_mul, rope_heads, head_dim

    @staticmethod
    def fits(w: torch.Tensor) -> bool:
        """`w` is a 2-d bf16 CPU weight of whole tiles (outputs a multiple of 32, inputs of 32) and the kernel runs here."""
        return (w.dim() == 2 and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.shape[0] % 32 == 0
                and w.shape[1] % 32 == 0 and gemm_amx())


def _whole_tiles(x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] contiguous, with zero rows added up to a multiple of 16 (the kernel's row tiles)."""
    x2 = x2.contiguous()
    if x2.shape[0] % 16:
        x2 = torch.cat([x2, x2.new_zeros(16 - x2.shape[0] % 16, x2.shape[1])])
    return x2


# SiLU x up outputs of at least this many bytes a thread are written with streaming stores (no read of each line
# before its write; the lines go to memory, not into the caches): an output larger than the L2 (2 MB a core on
# every Xeon with AMX) leaves it anyway, and a smaller one is as fast or faster in the caches. The teacher's 8 x 256
# forward 10 ms faster a call, 16 x 256 60 ms; 4 x 256 (1.5 MB a thread) 5 ms slower (bench/NOTES.md, session 26).
# Into a caller's `out` (a buffer reused call after call: its lines are in L3, and the product after reads them from
# there instead of from memory) only from twice that: at 8 x 256 (3 MB a thread) ordinary stores into it took the
# forward 287 -> 274 ms (the down product 58 -> 51), at 8 x 512 (6 MB) 5 ms longer than streaming (session 28). The
# teacher's forward now keeps SiLU x up in L2 instead (amx_mlp, session 29).
AMX_STREAM_BYTES = 2 << 20


def amx_rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE's cos / sin [L, head_dim] bf16 as csrc/gemm_amx.c's epilogue takes them: [L, 2 head_dim], each position's
    pairs (cos d, -sin d) for d < head_dim / 2, then (sin d', cos d') for d' = d + head_dim / 2: each rotated value is
    one bf16 dot product of a pair (q d, q d') with a pair of the table. Make it once a forward (amx_linear's `rope`)."""
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == sin.shape and cos.shape[1] % 2 == 0
    half = cos.shape[1] // 2
    lo = torch.stack([cos[:, :half], -sin[:, :half]], -1).flatten(1)
    hi = torch.stack([sin[:, half:], cos[:, half:]], -1).flatten(1)
    return torch.cat([lo, hi], 1).contiguous()


def row_inv_rms(x: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """1 / sqrt(mean(row^2) + eps) [rows] fp32 of bf16 rows x [..., n]: RMSNorm's scale, for amx_linear's `row_scale`
    (the norm folded into the next product's weight)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x.dtype == torch.bfloat16 and x2.stride(-1) == 1
    out = torch.empty(x2.shape[0]) if out is None else _checked_out(out, (x2.shape[0],), torch.float32)
    _gemm_library().opd_row_inv_rms_bf16(x2.data_ptr(), x2.shape[0], n, x2.stride(0), float(eps), out.data_ptr(),
                                         torch.get_num_threads())
    return out


def amx_linear(x: torch.Tensor, w: AmxWeight, rope: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
               add_to: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
               scale_out: tuple[torch.Tensor, float] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T of bf16 rows x [..., in] (no grad); silu(gate) x up of it for a `silu_mul` weight; for a `rope_heads`
    weight with `rope` = (cos, sin) [L, head_dim] bf16 or amx_rope_table of them, its query and key heads rotated at
    positions row % L (rows of whole sequences from position 0, as opd.llama.causal_hidden runs them).
    `row_scale` (fp32 [rows]): each row of the product times it before anything else (the RMSNorm of x folded into
    W: rms_norm(x, g) @ W^T = row_scale * (x @ (W diag(g))^T), row_scale = row_inv_rms(x)).
    With `add_to` (bf16 [..., out], contiguous; rows a multiple of 16): the product is added to it in place (add_to +=
    bf16(x @ W^T)) and add_to is returned; with `scale_out` = (fp32 [rows] tensor, eps) row_inv_rms of add_to after
    the add is written there on the way (the next product's row_scale).
    `out`: a contiguous bf16 tensor [rows rounded up to 16, width] the result is written into instead of a new one,
    returned as a view of it: a buffer the caller reuses call after call, whose lines the caches still hold (SiLU x
    up is streamed into it only from twice AMX_STREAM_BYTES)."""
    n, k = w.shape
    assert x.dtype == torch.bfloat16 and x.shape[-1] == k and not (torch.is_grad_enabled() and x.requires_grad)
    lead, m = x.shape[:-1], x.numel() // k
    x2 = _whole_tiles(x.reshape(m, k))
    width = n // 2 if w.silu_mul else n
    fresh = out is None  # SiLU x up into a new tensor: streamed from AMX_STREAM_BYTES
    scales_out, eps = (None, 0.0) if scale_out is None else scale_out
    if add_to is not None:
        assert (add_to.dtype == torch.bfloat16 and add_to.is_contiguous() and add_to.numel() == m * n
                and x2.shape[0] == m and not w.silu_mul and not w.rope_heads)
        assert out is None and row_scale is None, "with add_to, the output is add_to, its rows unscaled"
        if scales_out is not None:
            _checked_out(scales_out, (m,), torch.float32)
        out = add_to
    else:
        assert scales_out is None, "scale_out: with add_to only"
        out = torch.empty(x2.shape[0], width, dtype=torch.bfloat16) if out is None else _checked_out(out, (x2.shape[0], width))
    if row_scale is not None:
        assert row_scale.dtype == torch.float32 and row_scale.is_contiguous() and row_scale.shape[0] >= m, (
            f"row_scale: contiguous fp32 [{m}] (a scale a row), not {row_scale.dtype} {tuple(row_scale.shape)}")
        if row_scale.shape[0] < x2.shape[0]:  # the padding rows' products are 0 whatever their scale
            row_scale = torch.cat([row_scale, row_scale.new_ones(x2.shape[0] - row_scale.shape[0])])
    rope_args = (0, None, 1)  # pairs rotated, table, table length
    if rope is not None and w.rope_heads:
        table = amx_rope_table(*rope) if isinstance(rope, tuple) else rope
        assert table.dtype == torch.bfloat16 and table.is_contiguous() and table.shape[1] == 2 * w.head_dim, (
            f"rope: (cos, sin) [L, {w.head_dim}] or amx_rope_table of them [L, {2 * w.head_dim}]")
        rope_args = (w.rope_heads * w.head_dim // 32, table.data_ptr(), table.shape[0])
    mode = 2 if add_to is not None else int(w.silu_mul)  # gemm_amx.c: ADD_BF16, SILU_MUL or OUT_BF16
    threads = torch.get_num_threads()
    stream_from = AMX_STREAM_BYTES * (1 if fresh else 2) * threads
    stream = int(w.silu_mul and out.numel() * 2 >= stream_from)  # (the kernel streams SiLU x up only)
    done = _gemm_library().opd_amx_linear_bf16(
        x2.data_ptr(), x2.shape[0], k, w.tensor.data_ptr(), n, out.data_ptr(), width, mode, w.tile_cols.data_ptr(),
        *rope_args, w.head_dim or 1, None if row_scale is None else row_scale.data_ptr(),
        None if scales_out is None else scales_out.data_ptr(), float(eps), stream, threads)
    assert done, "the tile state was granted at load, and AmxWeight.fits checked the shapes"
    if add_to is not None:
        return add_to
    return (out if out.shape[0] == m else out[:m]).view(*lead, width)


# Rows of the MLP a thread takes through both of its products at a time (amx_mlp): SiLU x up of 512 rows (1.5 MB at
# SmolLM2's 1,536) stays in a core's L2 (2 MB on every Xeon with AMX) between them; the gate/up product's chunks of
# rows are that size anyway (bench/NOTES.md, session 29)
AMX_MLP_ROWS = 512


def amx_mlp(x: torch.Tensor, gate_up: AmxWeight, down: AmxWeight, row_scale: torch.Tensor,
            scale_out: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x += silu(g) u @ down^T in place, (g, u) = row_scale * (x @ gate_up^T), for the residual stream x [rows, hidden]
    bf16 (contiguous, rows a multiple of 16), a `silu_mul` gate/up weight with the RMSNorm's weight folded in and
    row_scale = row_inv_rms(x); with `scale_out` = (fp32 [rows], eps) row_inv_rms of x after the add is written there.
    One pass of chunks of rows through both products, SiLU x up in a buffer a thread that stays in its L2."""
    m, hidden = x.shape
    inter = gate_up.shape[0] // 2
    assert x.dtype == torch.bfloat16 and x.is_contiguous() and m % 16 == 0, "x: contiguous bf16, rows a multiple of 16"
    assert gate_up.silu_mul and gate_up.shape[1] == hidden and down.shape == (hidden, inter) and not down.silu_mul
    _checked_out(row_scale, (m,), torch.float32)
    scales_out, eps = (None, 0.0) if scale_out is None else (_checked_out(scale_out[0], (m,), torch.float32), scale_out[1])
    done = _gemm_library().opd_amx_mlp_bf16(
        x.data_ptr(), m, hidden, gate_up.tensor.data_ptr(), gate_up.tile_cols.data_ptr(), inter, down.tensor.data_ptr(),
        down.tile_cols.data_ptr(), row_scale.data_ptr(), None if scales_out is None else scales_out.data_ptr(),
        float(eps), AMX_MLP_ROWS, torch.get_num_threads())
    assert done, "the tile state was granted at load, and AmxWeight.fits checked the shapes"
    return x


class _PackedRef(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("cols", ctypes.c_void_p)]


class _AmxLayer(ctypes.Structure):  # csrc/forward_amx.c's AmxLayer
    _fields_ = [("qkv", _PackedRef), ("o", _PackedRef), ("gate_up", _PackedRef), ("down", _PackedRef)]


def amx_layers(x: torch.Tensor, batch: int, layers: list, heads: int, kv_heads: int, rope: torch.Tensor,
               eps: float, scale: torch.Tensor, qkv: torch.Tensor, att: torch.Tensor) -> bool:
    """The decoder layers of a frozen bf16 Llama (opd.llama.frozen_layer_weights' AMX weights: QKV with RoPE's
    layout and the input norm folded in, gate/up with silu_mul and the post-attention norm folded in) over the
    residual stream x [batch x L, hidden] bf16 in place, in one call: each thread takes its share of the sequences
    through every layer (csrc/forward_amx.c). False (nothing done) where that does not apply: the batch not a
    multiple of the threads, a thread's rows not whole tiles, heads other than attention.c's 64.
    Buffers: scale [rows] fp32 (x's 1 / rms as the layers go), qkv [rows, (heads + 2 kv_heads) 64], att [rows,
    heads 64]; rope: amx_rope_table [L, 128]."""
    lib, threads = _gemm_library(), torch.get_num_threads()
    rows, hidden = x.shape
    first = layers[0] if layers else None
    if (first is None or rows % batch or first.qkv.head_dim != ATTENTION_HEAD_DIM or not first.qkv.rope_heads
            or batch % threads or torch.is_grad_enabled()):
        return False
    L = rows // batch
    assert x.dtype == torch.bfloat16 and x.is_contiguous() and rope.shape == (L, 2 * ATTENTION_HEAD_DIM)
    _checked_out(scale, (rows,), torch.float32)
    _checked_out(qkv, (rows, first.qkv.shape[0]))
    _checked_out(att, (rows, heads * ATTENTION_HEAD_DIM))
    table = (_AmxLayer * len(layers))(*[
        _AmxLayer(*[_PackedRef(w.tensor.data_ptr(), w.tile_cols.data_ptr()) for w in (lw.qkv, lw.o, lw.gate_up, lw.down)])
        for lw in layers])
    scratch = torch.empty(threads * lib.opd_attention_bf16_scratch_bytes(L), dtype=torch.uint8)
    return bool(lib.opd_amx_layers_bf16(
        x.data_ptr(), batch, L, hidden, heads, kv_heads, first.gate_up.shape[0] // 2, ctypes.addressof(table),
        len(layers), first.qkv.rope_heads, rope.data_ptr(), float(eps), scale.data_ptr(), qkv.data_ptr(), att.data_ptr(),
        scratch.data_ptr(), AMX_MLP_ROWS, threads))


def _checked_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A caller's output buffer, checked against what the kernel writes (its shape, dtype, contiguous)."""
    assert out.dtype == dtype and out.is_contiguous() and tuple(out.shape) == tuple(shape), (
        f"out: a contiguous {'bf16' if dtype == torch.bfloat16 else dtype} tensor of shape {tuple(shape)}, "
        f"not {out.dtype} {tuple(out.shape)}")
    return out


def amx_head_terms(hidden: torch.Tensor, head: AmxWeight, targets: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each target, entropy) [n] fp32 of log_softmax(hidden @ head^T / T) for bf16 rows hidden [n, in],
    without the [n, vocabulary] logits: each row's log-sum-exp and entropy sums are kept as the head's products come
    (logits rounded to bf16 first, as the bf16 forward's are)."""
    n, k = hidden.shape
    if n and not 0 <= int(targets.min()) <= int(targets.max()) < head.shape[0]:  # as gather would refuse them
        raise IndexError(f"target ids outside the LM head's {head.shape[0]} outputs")
    h = _whole_tiles(hidden)
    tg = targets.to(torch.int64).contiguous()
    if h.shape[0] != n:
        tg = torch.cat([tg, tg.new_zeros(h.shape[0] - n)])
    lib, threads = _gemm_library(), torch.get_num_threads()
    logprob, entropy = torch.empty(h.shape[0]), torch.empty(h.shape[0])
    scratch = torch.empty(threads * lib.opd_amx_head_scratch_bytes(k), dtype=torch.uint8)
    done = lib.opd_amx_head_terms_bf16(h.data_ptr(), h.shape[0], k, head.tensor.data_ptr(), head.shape[0],
                                       tg.data_ptr(), 1.0 / temperature, logprob.data_ptr(), entropy.data_ptr(),
                                       scratch.data_ptr(), threads)
    assert done, "the tile state was granted at load, and AmxWeight.fits checked the shapes"
    return logprob[:n], entropy[:n]


# ------------------------------------------------------------------------------------- drawing a token a row
@functools.cache
def _sample_library() -> ctypes.CDLL | None:
    """csrc/sample.c, for opd.rollout.sampler (torch's ops where this is None)."""
    lib = _plain_library("sample.c")
    if lib is None:
        return None
    lib.opd_sample_rows.restype = None
    lib.opd_sample_rows.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, _P, _P, _P, _P, ctypes.c_int]
    return lib


def sample_rows(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token [B] int64, its log-prob [B] fp32) drawn from softmax(logits / T) of CPU logits [B, V] (fp32 or bf16)
    by inverse CDF at the uniforms u [B] in (0, 1] (float64), in one C pass a row; None where it does not apply."""
    lib = _sample_library()
    if (lib is None or logits.device.type != "cpu" or logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16)
            or u.shape != (logits.shape[0],) or u.dtype != torch.float64):
        return None
    B, V = logits.shape
    z, u = logits.float().contiguous(), u.contiguous()
    tok, tok_logp = torch.empty(B, dtype=torch.int64), torch.empty(B)
    threads = max(1, min(torch.get_num_threads(), B))
    scratch = torch.empty(threads * (V * 4 + ((V + 63) // 64 + 1) * 8), dtype=torch.uint8)
    lib.opd_sample_rows(z.data_ptr(), B, V, 1.0 / temperature, u.data_ptr(), tok.data_ptr(), tok_logp.data_ptr(),
                        scratch.data_ptr(), threads)
    return tok, tok_logp
