"""A long run of an example config, recorded: runs `opd run CONFIG` in this process, then writes
bench/results/long_run_<config name>.json with the command, the machine, the wall time and the
evaluation curve (eval/reverse_kl, eval/teacher_nll, eval/length by step) and whether reverse KL fell.

    python bench/long_run.py configs/gemma-to-smollm2.toml --out runs/long-gemma [--set KEY=VALUE] [--max-steps N]
        [--minutes M]

--minutes stops the run gracefully (checkpoint, as on SIGTERM) once it has trained that long, so a run can be
sized by time on an unknown machine. An interrupted run continues from its last checkpoint when the same
command is given again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_facts  # noqa: E402


def _stop_after(seconds: float, out: Path) -> None:
    """SIGTERM this process after `seconds` — but not before the training loop has begun (its step-0 checkpoint
    exists): the loop turns SIGTERM into "finish this step, checkpoint, stop", while a SIGTERM during the warm
    start would just kill it."""
    t0 = time.time()
    while time.time() - t0 < seconds or not (out / "checkpoints").is_dir():
        time.sleep(5)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="override a key, as for `opd run`")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None, help="stop gracefully after this many minutes")
    args = parser.parse_args()
    if args.minutes:
        threading.Thread(target=_stop_after, args=(args.minutes * 60, args.out), daemon=True).start()
    sets = args.set + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])

    from opd.config import load_config
    from opd.loop import run
    from opd.monitor import read_metrics

    cfg = load_config(args.config, sets)
    t0 = time.time()
    run(cfg, args.out, resume=(args.out / "checkpoints").is_dir(), log=print)
    evals = [{k: r[k] for k in ("step", "eval/reverse_kl", "eval/teacher_nll", "eval/length", "time/elapsed_s") if k in r}
             for r in read_metrics(args.out) if "eval/reverse_kl" in r]
    first, last = evals[0]["eval/reverse_kl"], evals[-1]["eval/reverse_kl"]
    result = {
        "benchmark": f"long_run_{args.config.stem}",
        "command": " ".join(["python", "bench/long_run.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(),
        "wall_s_this_invocation": round(time.time() - t0, 1),
        "elapsed_s_total": evals[-1].get("time/elapsed_s"),
        "steps_planned": cfg.train.max_steps,
        "steps_done": max(r["step"] for r in read_metrics(args.out)),
        "stopped_after_minutes": args.minutes,
        "eval": evals,
        "reverse_kl_first": first,
        "reverse_kl_last": last,
        "reverse_kl_fell": last < first,
    }
    out = Path(__file__).parent / "results" / f"long_run_{args.config.stem}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
