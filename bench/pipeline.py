"""Synchronous vs pipelined loops on the built-in default config: steps/s and the policy lag each one trains at.

Each variant is one `opd run` of the default config (built-in arithmetic teacher and student) in this process,
with a short warm start and no intermediate evaluation; steps/s is measured over the training steps after
the first (time/elapsed_s of the metrics rows, so warm start and the step-0 evaluation are not counted).
The policy-lag histogram counts trained tokens by how many policy versions old their sampler was.

    flock /work/cpu.lock python bench/pipeline.py [--steps 30] [--lags 0,1,2] [--ray] [--set KEY=VALUE]

writes bench/results/pipeline.json: {"runs": [{"name", "engine", "max_policy_lag", "steps_per_s", ...}, ...]}
(one entry per variant; other tools add their own keys to an entry, e.g. a cost model's prediction).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_facts  # noqa: E402

BASE = ["student.warm_start_steps=50", "student.warm_start_samples=256", "eval.every=0", "eval.size=16", "eval.recovery_size=0",
        "monitor.live='off'", "monitor.tensorboard=false", "train.checkpoint_every=0"]


def measure(name: str, sets: list[str], workdir: Path) -> dict:
    from opd.config import load_config
    from opd.loop import run
    from opd.monitor import read_metrics

    cfg = load_config(None, sets)
    out = workdir / name
    t0 = time.time()
    run(cfg, out, log=lambda *a, **k: None)
    wall = time.time() - t0
    rows = [r for r in read_metrics(out) if r["step"] > 0]
    span = rows[-1]["time/elapsed_s"] - rows[0]["time/elapsed_s"]
    hist = Counter()
    for r in rows:  # updates_per_batch = 1: one lag per batch
        hist[int(r["freshness/policy_lag_max"])] += int(r["rollout/tokens"])

    def mean(key: str) -> float:
        return round(statistics.fmean(r[key] for r in rows[1:]), 4)

    return {
        "name": name,
        "engine": cfg.engine,
        "max_policy_lag": cfg.max_policy_lag,
        "steps": len(rows),
        "steps_per_s": round((len(rows) - 1) / span, 3),
        "wall_s": round(wall, 1),
        "step_s_mean": mean("time/step_s"),
        "wait_s_mean": mean("time/wait_s"),
        "rollout_s_mean": mean("time/rollout_s"),
        "teacher_s_mean": mean("time/teacher_s"),
        "update_s_mean": mean("time/update_s"),
        "policy_lag_mean": round(statistics.fmean(r["freshness/policy_lag"] for r in rows), 3),
        "policy_lag_tokens": {str(k): hist[k] for k in sorted(hist)},
        "final_eval_reverse_kl": read_metrics(out)[-1].get("eval/reverse_kl"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lags", default="0,1,2", help="max_policy_lag values to run on the local engine")
    parser.add_argument("--ray", action="store_true", help="also run engine = 'ray' (lag 0 and the largest lag)")
    parser.add_argument("--set", action="append", default=[], help="override a key, as for `opd run`")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline.json")
    args = parser.parse_args()
    sets = BASE + [f"train.max_steps={args.steps}"] + args.set
    lags = [int(x) for x in args.lags.split(",")]
    variants = [(f"local-lag{lag}", [f"max_policy_lag={lag}"]) for lag in lags]
    if args.ray:
        variants += [(f"ray-lag{lag}", ["engine='ray'", f"max_policy_lag={lag}"]) for lag in (0, max(lags))]

    runs = []
    with tempfile.TemporaryDirectory(prefix="opd-bench-pipeline-") as tmp:
        for name, extra in variants:
            runs.append(measure(name, sets + extra, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    sync = next((r for r in runs if r["name"] == "local-lag0"), None)
    if sync:
        for r in runs:
            r["speedup_vs_sync"] = round(r["steps_per_s"] / sync["steps_per_s"], 3)
    result = {
        "benchmark": "pipeline",
        "command": " ".join(["python", "bench/pipeline.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(),
        "config": "built-in default with " + " ".join(sets),
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
