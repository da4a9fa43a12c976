"""The machine's limit: sustained matmul FLOP/s in float32 and bfloat16 with the suite's torch threads.
Every stage benchmark measures it again in its own run and reports its speed as a fraction of it.

    python bench/matmul_limit.py          # writes bench/results/matmul_limit.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import measure_matmul_limit, quick, threads, write_result  # noqa: E402


def main() -> None:
    import torch

    torch.set_num_threads(threads())
    rows = []
    for dtype in ("float32", "bfloat16"):
        for size in ((1024, 2048) if quick() else (512, 1024, 2048, 4096)):
            row = measure_matmul_limit(dtype, size=size, min_seconds=1.0 if quick() else 2.0)
            print(row)
            rows.append(row)
    best = {d: max(r["flops_per_s"] for r in rows if r["dtype"] == d) for d in ("float32", "bfloat16")}
    kernel = {d: max((r for r in rows if r["dtype"] == d), key=lambda r: r["flops_per_s"])["kernel"] for d in best}
    write_result("matmul_limit", {
        "what": "best sustained FLOP/s of a square matmul (2 n^3 FLOPs) per dtype and size, over torch.matmul, "
                "oneDNN's matmul and, for bfloat16 on CPUs with AMX, opd's own kernel (rows: by_kernel)",
        "limit_flops_per_s": best, "limit_kernel": kernel,
        "rows": rows,
    }, headline=[{"figure": f"matmul limit {d}", "value": round(v / 1e9, 1), "unit": f"GFLOP/s ({kernel[d]})"} for d, v in best.items()])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
