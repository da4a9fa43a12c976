"""`opd plan`'s predictions beside real runs measured here: calibrate the stage rates on this machine, then
run short real runs of the built-in default at several batch sizes and completion lengths, and record the
predicted and the measured seconds per stage and per step (goal: within 25%).

    flock /work/cpu.lock env OMP_NUM_THREADS=1 python bench/plan.py [--steps 8] [--out runs/bench-plan]

Writes bench/results/plan.json (and the calibration as bench/results/plan_calibration.json). Runs use the
default config with the warm start off (a random-init student: its completions run to max_new_tokens, so
the decode steps are known), a small eval, and no checkpoints; a measured stage time is the median over
steps 2..N of the loop's own time/rollout_s, time/teacher_s, time/update_s and time/step_s.
When the config has `max_policy_lag` (the pipelined loop, issue 6 part 1), a pipelined run at lag 1 is
measured too, against the "generation || training" prediction.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_facts  # noqa: E402

GRID = [(8, 32), (32, 32), (32, 64), (64, 64), (16, 96)]  # (prompts.batch_size, rollout.max_new_tokens)
CALIBRATION_SET = ["student.warm_start_steps=0"]
RUN_SET = ["student.warm_start_steps=0", "eval.size=8", "eval.every=0", "eval.recovery_size=0",
           "train.checkpoint_every=0", "monitor.live='off'", "monitor.tensorboard=false"]
STAGE_KEYS = {"rollout": "time/rollout_s", "teacher": "time/teacher_s", "train": "time/update_s"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-plan"))
    args = parser.parse_args()

    import torch

    from opd.config import Config, load_config
    from opd.loop import run
    from opd.monitor import read_metrics
    from opd.plan import Devices, ModelShape, Rates, calibrate, predict, workload_from_config

    t_start = time.time()
    cfg0 = load_config(None, CALIBRATION_SET)
    cal = calibrate(cfg0, log=print)
    results_dir = Path(__file__).parent / "results"
    (results_dir / "plan_calibration.json").write_text(json.dumps(cal, indent=1))
    rates = Rates.from_json(cal["rates"])
    student = ModelShape.from_spec(cfg0.student.model, cfg0.student.dtype)
    teacher = ModelShape.from_spec(cfg0.teacher.model, cfg0.teacher.dtype)

    pipelined = "max_policy_lag" in Config.model_fields
    modes = [("synchronous", [])] + ([("pipelined", ["max_policy_lag=1"])] if pipelined else [])
    rows = []
    for mode, extra in modes:
        for batch, max_new in GRID:
            sets = RUN_SET + extra + [f"prompts.batch_size={batch}", f"rollout.max_new_tokens={max_new}",
                                      f"train.max_steps={args.steps}"]
            cfg = load_config(None, sets)
            out = args.out / f"{mode}-b{batch}-t{max_new}"
            shutil.rmtree(out, ignore_errors=True)
            run(cfg, out, log=lambda *a, **k: None)
            steps = [r for r in read_metrics(out) if r["step"] >= 2]
            measured = {s: statistics.median(r[k] for r in steps) for s, k in STAGE_KEYS.items()}
            measured["step"] = statistics.median(r["time/step_s"] for r in steps)
            work = workload_from_config(cfg)
            plan = predict(student, teacher, work, rates, Devices(), getattr(cfg, "max_policy_lag", None))
            predicted = {**plan.stages, "step": plan.sync_step_s if mode == "synchronous" else plan.overlap_step_s}
            error = {k: predicted[k] / measured[k] - 1 for k in measured}
            row = {"mode": mode, "batch_size": batch, "max_new_tokens": max_new, "prompt_tokens": work.prompt_tokens,
                   "completion_tokens_mean": statistics.mean(r["rollout/length_mean"] for r in steps),
                   "steps_measured": len(steps), "measured_s": measured, "predicted_s": predicted,
                   "relative_error": error, "bottleneck_predicted": plan.bottleneck,
                   "bottleneck_measured": max(STAGE_KEYS, key=lambda s: measured[s]),
                   "steps_per_s_measured": 1 / measured["step"], "steps_per_s_predicted": 1 / predicted["step"],
                   "pipelined_prediction": {"overlap_step_s": plan.overlap_step_s, "overlap_lag": plan.overlap_lag,
                                            "three_stage_step_s": plan.pipelined_step_s,
                                            "three_stage_lag": plan.pipelined_lag,
                                            "teacher_to_student_ratio": plan.teacher_to_student_ratio}}
            if mode == "pipelined":
                lags = [r.get("freshness/policy_lag", 0.0) for r in steps]
                row["policy_lag_measured_mean"] = statistics.mean(lags)
            rows.append(row)
            print(f"{mode} b{batch} t{max_new}: step measured {measured['step']:.3f}s predicted "
                  f"{predicted['step']:.3f}s ({error['step']:+.0%}); " + ", ".join(
                      f"{s} {measured[s]:.3f}/{predicted[s]:.3f}" for s in STAGE_KEYS))
    worst = max(abs(r["relative_error"]["step"]) for r in rows)
    result = {
        "benchmark": "plan",
        "command": "flock /work/cpu.lock env OMP_NUM_THREADS=1 python bench/plan.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(),
        "torch_threads": torch.get_num_threads(),
        "rates": cal["rates"],
        "calibration_sizes": "opd.plan.CALIBRATION_SIZES (sampler, teacher, update timed directly; not these runs)",
        "runs": rows,
        "pipelined_measured": pipelined,
        "max_abs_step_error": worst,
        "goal": "step time within 25%",
        "goal_met": worst <= 0.25,
        "wall_s": round(time.time() - t_start, 1),
    }
    (results_dir / "plan.json").write_text(json.dumps(result, indent=1))
    print(f"worst step-time error {worst:.1%}; written to {results_dir / 'plan.json'}")


if __name__ == "__main__":
    main()
