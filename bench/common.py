"""Shared by the `make bench` suite: the machine's matmul limit, FLOP counts of each stage, peak-memory
reading and one writer for bench/results/<name>.json.

FLOP conventions (the usual dense-transformer estimates, attention's T^2 term left out):
- a forward over N tokens costs 2 x params x N (one multiply-add per weight per token); the LM head is a
  weight like any other, the embedding lookup is not (with tied embeddings it is counted once: as the head);
- a training step (forward + backward) costs 6 x params x N.
"""

from __future__ import annotations

import json
import os
import sys
import statistics
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# BENCH_RESULTS: another folder for this run's result files (e.g. a machine unlike the one whose results are
# kept under bench/results/, so that they sit side by side instead of replacing them).
RESULTS = Path(os.environ["BENCH_RESULTS"]).resolve() if os.environ.get("BENCH_RESULTS") else BENCH / "results"

# Every benchmark runs as `opd` does: with the heap tunables of opd.allocator (the process re-executes itself
# once, before anything is measured; every peer of a benchmark shares the process and so the allocator). Only
# when a bench script is the program: importing these helpers (the tests do) changes nothing.
sys.path.insert(0, str(ROOT / "src"))
from opd.allocator import reexec_with_heap_tunables  # noqa: E402

if sys.argv and Path(sys.argv[0]).resolve().parent == BENCH:
    reexec_with_heap_tunables()


def quick() -> bool:
    """BENCH_QUICK=1: fewer shapes, shorter runs (the same code paths)."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def threads() -> int:
    """Torch threads for the suite: BENCH_THREADS, else every core (the machine's limit is what they can do)."""
    return int(os.environ.get("BENCH_THREADS") or os.cpu_count() or 1)


def forward_flops(params: int, tokens: int) -> float:
    return 2.0 * params * tokens


def train_flops(params: int, tokens: int) -> float:
    return 6.0 * params * tokens


def matmul_flop(n: int, m: int, k: int) -> float:
    """[n, k] @ [k, m]: n*m dot products of length k, one multiply and one add each."""
    return 2.0 * n * m * k


def fraction_of_limit(tokens_per_s: float, flops_per_token: float, limit_flops_per_s: float) -> float:
    return tokens_per_s * flops_per_token / limit_flops_per_s


def measure_matmul_limit(dtype: str, *, size: int = 2048, min_seconds: float = 2.0) -> dict:
    """Best sustained FLOP/s of one square matmul (size x size) in `dtype` with the current torch threads: the
    ceiling every stage is measured against. Best of repeated timed calls after a warm-up, over both CPU kernels
    torch ships: its default (`torch.matmul`: MKL for fp32, oneDNN for bf16) and oneDNN's matmul (which opd.matmul
    uses for fp32 where it is faster: on AMD CPUs MKL runs its AVX2 code, about half of oneDNN's fp32 speed), and
    for bf16 on CPUs with AMX opd's own kernel (csrc/gemm_amx.c: 3.2 TF/s at 512 where torch's ran 1.3, session
    25; a limit below what opd itself reaches would flatter every fraction). `kernel` says which one the figure
    is from; `by_kernel` holds each that runs on this CPU."""
    import torch

    from opd import cpu_kernels, matmul

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dt)
    b = torch.randn(size, size, generator=g).to(dt)
    out = torch.empty(size, size, dtype=dt)
    kernels = {"torch.matmul": lambda: torch.matmul(a, b, out=out)}
    if matmul.onednn_available():
        bt = b.t()  # a @ b = oneDNN linear(a, b.T)
        kernels["oneDNN"] = lambda: matmul._onednn_linear(a, bt)
    if dtype == "bfloat16" and cpu_kernels.gemm_amx():  # opd's own tile-unit kernel (the bf16 teacher's forward)
        packed = cpu_kernels.AmxWeight(b.t().contiguous())
        kernels["opd AMX"] = lambda: cpu_kernels.amx_linear(a, packed)
    by_kernel, calls = {}, 0
    for name, fn in kernels.items():
        try:
            fn()  # warm-up (allocations, kernel selection)
        except RuntimeError:  # oneDNN has no kernel for this dtype on this CPU (bf16 without avx512_bf16 / AMX)
            continue
        best, spent, n = float("inf"), 0.0, 0
        while spent < min_seconds / len(kernels) or n < 3:
            t0 = time.perf_counter()
            fn()
            dt_s = time.perf_counter() - t0
            best, spent, n = min(best, dt_s), spent + dt_s, n + 1
        by_kernel[name], calls = matmul_flop(size, size, size) / best, calls + n
    kernel = max(by_kernel, key=by_kernel.get)
    return {"dtype": dtype, "size": size, "flops_per_s": by_kernel[kernel], "kernel": kernel,
            "by_kernel": by_kernel, "calls": calls}


def host_probe(seconds: float = 1.0) -> float:
    """This host's speed right now, as GFLOP/s of one fixed fp32 product the size of an update's ([416, 576] x
    [576, 1536]), the median of repeated calls over `seconds`. Shared hosts drift by 2x within minutes
    (bench/NOTES.md); taken before and after each side of a comparison it shows whether the two sides ran on the
    same host speed."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(416, 576, generator=g), torch.randn(576, 1536, generator=g)
    torch.mm(a, b)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return round(matmul_flop(416, 1536, 576) / statistics.median(times) / 1e9, 1)


def cpu_steal_jiffies() -> int:
    """Time the hypervisor gave this VM's CPUs to others (/proc/stat "steal", jiffies); 0 where not reported."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        return 0


def reset_peak_rss() -> int:
    """Resets Linux's peak-RSS counter (VmHWM) to the current RSS; returns the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return proc_status_kib("VmRSS")


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_gib() -> float:
    return round(proc_status_kib("VmHWM") / 2**20, 3)


def cpu_model() -> str:
    import platform

    from opd.matmul import _cpuinfo

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> str | None:
    """"family F model M, L2 N KB" from /proc/cpuinfo and sysfs (None where there is no such line)."""
    from opd.matmul import _cpuinfo

    family, model = _cpuinfo("cpu family"), _cpuinfo("model\t")  # (not "model name")
    if family is None or model is None:
        return None
    l2 = Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
    size = l2.read_text().strip() if l2.is_file() else "?"
    return f"family {family} model {model}, L2 {size}"


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    from opd.matmul import cpu_flags as all_flags  # the flags opd's own kernel choices read

    flags = all_flags()
    return [f for f in wanted if f in flags]


BENCH_ENV = ("BENCH_QUICK", "BENCH_THREADS", "BUDGET_S", "VLLM_VENV", "BENCH_RESULTS", "BENCH_COLD")  # settings a re-run needs, kept in "command"


def write_result(name: str, payload: dict, *, headline: list[dict] | None = None) -> Path:
    """bench/results/<name>.json with the figures, the command that made them and the machine facts.
    `headline`: [{"figure": ..., "value": ..., "unit": ...}] rows for the generated table in results/README.md."""
    sys.path.insert(0, str(BENCH))
    from machine import machine_facts

    env = " ".join(f"{k}={os.environ[k]}" for k in BENCH_ENV if os.environ.get(k))
    script = os.path.relpath(sys.argv[0], ROOT) if Path(sys.argv[0]).exists() else sys.argv[0]
    out = {
        "benchmark": name,
        "command": " ".join(([env] if env else []) + ["python", script] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": quick(),
        "machine": machine_facts(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # the allocator setting every row ran under
        **({"headline": headline} if headline else {}),
        **payload,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written {path}")
    return path
