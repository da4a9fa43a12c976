"""Where a step of opd's loop spends its time: a few steps of `opd.loop.run` on the SmolLM2 half-depth config
(no warm start, batch 4, 64 new tokens, reverse_kl) under torch.profiler; prints the top operators and the
stage split, and writes bench/results/profile_loop.json.

    python bench/profile_loop.py [--steps 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, threads, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from opd.config import load_config  # noqa: E402
from opd.loop import run  # noqa: E402
from stages import CONFIG, bench_overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(threads())
    cfg = load_config(CONFIG, bench_overrides(args.batch, args.steps) + args.set)
    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU]) as prof:
        run(cfg, Path(tmp), log=lambda *a, **k: None)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(table)
    steps = [r for r in rows if r["step"] >= 1]
    split = {k: round(sum(r[f"time/{k}_s"] for r in steps), 2) for k in ("rollout", "teacher", "update", "step")}
    print("stage seconds over", len(steps), "steps:", split, "tokens:", sum(r["rollout/tokens"] for r in steps))
    ops = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]]
    write_result("profile_loop", {"what": "torch.profiler over opd.loop.run (step 0 evaluation included)",
                                  "overrides": args.set, "stage_seconds": split, "top_ops": ops})


if __name__ == "__main__":
    main()
