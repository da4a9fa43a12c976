"""The broken-prefix handling study in `opd compare`: from a deliberately weak student (a short warm start,
so many of its samples break), the same on-policy run with each way of handling broken prefixes —
keep / truncate / downweight (feedback.broken_prefix) and the teacher-guided rollouts teacher_mix /
teacher_correct_topk — compared on final accuracy, reverse KL and teacher tokens, keep as the reference.

Every option runs the same steps from the same weak warm start and seeds; teacher tokens include the
teacher's per-token forwards during guided rollouts, so guidance is not free in the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opd.config import load_config
from opd.jobs import RunJob, run_jobs
from opd.monitor import read_metrics

# Each option's overrides on top of the compare config. The guided options keep the default broken_prefix.
OPTIONS: dict[str, list[str]] = {
    "keep": ["feedback.broken_prefix='keep'"],
    "truncate": ["feedback.broken_prefix='truncate'"],
    "downweight": ["feedback.broken_prefix='downweight'"],
    "teacher_mix": ["rollout.teacher_mix=0.25"],
    "teacher_correct_topk": ["rollout.teacher_correct_topk=3"],
}
KEYS = ("eval/accuracy", "eval/reverse_kl", "budget/teacher_tokens")
START_KEYS = ("teacher/broken_frac", "feedback/tokens_dropped", "rollout/teacher_token_frac")


def run_handling_study(config: Path | None, overrides: list[str], run_dir: Path, *, seeds: list[int], steps: int,
                       weak_warm_start_steps: int, jobs: int = 1, log=print) -> dict:
    """Runs every option from one weak warm start; returns {"weak_start": ..., "options": {name: ...}}."""
    run_dir = Path(run_dir)
    weak = run_dir / "weak-start"
    weak_sets = overrides + [f"student.warm_start_steps={weak_warm_start_steps}"]
    run_jobs([RunJob("broken-prefix study: weak start", load_config(config, weak_sets + ["train.max_steps=0"]), weak)],
             1, log)
    start = next(r for r in read_metrics(weak) if "eval/accuracy" in r)
    common = [f"student.model='{weak / 'final'}'", "student.init='pretrained'", "student.warm_start_steps=0",
              f"train.max_steps={steps}", f"eval.every={max(steps // 4, 1)}"]
    run_jobs([RunJob(f"broken-prefix study: {name}, seed {seed}",
                     load_config(config, overrides + common + option + [f"seed={seed}"]), run_dir / name / f"seed-{seed}")
              for name, option in OPTIONS.items() for seed in seeds], jobs, log)
    results: dict[str, dict] = {}
    for name, option in OPTIONS.items():
        finals, curves, first = [], [], []
        for seed in seeds:
            rows = read_metrics(run_dir / name / f"seed-{seed}")
            evals = [r for r in rows if "eval/accuracy" in r]
            finals.append(evals[-1])
            curves.append([{k: r.get(k) for k in ("step", *KEYS)} for r in evals])
            train = [r for r in rows if "teacher/broken_frac" in r or "rollout/teacher_token_frac" in r]
            first.append(train[0] if train else {})
        results[name] = {
            "overrides": option,
            **{k: mean_std([f[k] for f in finals]) for k in KEYS},
            # the weak student's first training step: how broken its own samples were when the option kicked in
            **{f"first_step/{k}": mean_std([f[k] for f in first]) for k in START_KEYS if all(k in f for f in first)},
            "curves": curves,
        }
    keep = results["keep"]["eval/accuracy"]
    for name, res in results.items():
        res["verdict"] = verdict(res["eval/accuracy"], keep) if name != "keep" else "reference"
    return {"seeds": seeds, "steps": steps, "weak_warm_start_steps": weak_warm_start_steps,
            "weak_start": {k: start[k] for k in ("eval/accuracy", "eval/reverse_kl") if k in start},
            "options": results}


def verdict(option: dict, keep: dict) -> str:
    """'helps' / 'hurts' only when the mean difference exceeds the spread of both; otherwise 'no clear effect'."""
    diff = option["mean"] - keep["mean"]
    # 0.02: a floor near one standard error of the difference of two 256-prompt accuracies at ~0.9
    # (sqrt(2 p (1 - p) / 256) = 0.024 at p = 0.92): a verdict at the floor is suggestive, not established
    noise = max(option["std"] + keep["std"], 0.02)
    if diff > noise:
        return "helps"
    if diff < -noise:
        return "hurts"
    return "no clear effect"


def mean_std(xs: list[float]) -> dict:
    """A figure over seeds, as summary.json holds it."""
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs)), "values": [float(x) for x in xs]}


def study_plot(report: Path, study: dict) -> None:
    """Eval accuracy against teacher tokens for each option (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res in study["options"].items():
        runs = res["curves"]
        n = min(len(c) for c in runs)
        xs = np.mean([[r["budget/teacher_tokens"] for r in c[:n]] for c in runs], axis=0)
        for ax, key in zip(axes, ("eval/accuracy", "eval/reverse_kl")):
            ys = np.mean([[r[key] for r in c[:n]] for c in runs], axis=0)
            ax.plot(xs, ys, marker="o", label=name, linestyle="-" if name == "keep" else "--")
    for ax, key in zip(axes, ("eval/accuracy", "eval/reverse_kl")):
        ax.set_xlabel("teacher tokens (scoring + guidance)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(f"broken-prefix handling from a weak student ({study['weak_warm_start_steps']} warm-start steps), "
                 f"mean over seeds {study['seeds']}")
    fig.tight_layout()
    fig.savefig(report / "broken_prefix_study.png", dpi=110)
    plt.close(fig)


def study_lines(study: dict) -> list[str]:
    ws = study["weak_start"]
    lines = [
        "",
        "### Handling broken prefixes, from a weak student",
        "",
        f"The warm start cut to {study['weak_warm_start_steps']} steps gives a weak student (accuracy "
        f"{ws.get('eval/accuracy', float('nan')):.3f}, reverse KL {ws.get('eval/reverse_kl', float('nan')):.3f}); "
        f"each option then trains {study['steps']} on-policy steps from it (seeds {study['seeds']}). "
        "`broken at start`: teacher/broken_frac on the first training step. Teacher tokens include the "
        "teacher's forwards while guiding rollouts. Verdict against keep: a difference counts only when it "
        "exceeds the spread of both (and at least 0.02).",
        "",
        "| option | eval accuracy | eval reverse KL | teacher tokens | broken at start | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in study["options"].items():
        broken = r.get("first_step/teacher/broken_frac")
        broken_cell = f"{broken['mean']:.2f}" if broken else "-"
        lines.append(
            f"| {name} (`{' '.join(r['overrides'])}`) | {fmt_mean_std(r['eval/accuracy'])} | "
            f"{fmt_mean_std(r['eval/reverse_kl'], 4)} | {r['budget/teacher_tokens']['mean']:,.0f} | "
            f"{broken_cell} | {r['verdict']} |"
        )
    unhelpful = [n for n, r in study["options"].items() if r["verdict"] in ("no clear effect", "hurts")]
    if unhelpful:
        lines += ["", "Did not help here (numbers above): " + ", ".join(unhelpful) + "."]
    return lines + ["", "![broken-prefix study](broken_prefix_study.png)"]


def fmt_mean_std(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
