"""`opd compare`: on-policy vs offline distillation vs a teacher-free control, from one warm start,
on budgets matched in teacher completions, over several seeds; writes RUN/report/{summary.json, report.md,
report.html, *.png}.

Matched budgets: on-policy spends batch_size x samples_per_prompt x steps completions of teacher scoring;
offline gets the teacher to write the same number of completions (offline.num_prompts = that) and
trains the same number of steps on them. The control runs the on-policy loop with a constant
negative advantage on every sampled token and never asks the teacher (0 teacher tokens).

Recovery (opd.recovery): each method's final eval row carries eval/recovery_rate (a planted wrong
digit; the student must still reach the verified answer), reported as mean and spread over seeds,
and the final students are also measured by the step that was corrupted (recovery.png).
"""

from __future__ import annotations

import html
import json
import time
import warnings
from pathlib import Path

import numpy as np

from opd.config import Config, ConfigError, load_config, to_toml
from opd.demo import teacher_accuracy
from opd.evaluate import detailed_eval, eval_sampling
from opd.handling_study import fmt_mean_std, mean_std, run_handling_study, study_lines, study_plot
from opd.jobs import RunJob, run_jobs
from opd.models import load_model, load_tokenizer
from opd.monitor import read_metrics
from opd.prompts import prompt_stream
from opd.recovery import planted_error_recovery
from opd.teacher import LocalTeacher

METHODS = ("onpolicy", "offline", "control")
RECOVERY_KEYS = ("eval/recovery_rate", "eval/recovery_clean_accuracy", "eval/recovery_rate_likelihood")


def method_overrides(method: str, cfg: Config, warm: Path, control_advantage: float) -> list[str]:
    common = [f"student.model='{warm}'", "student.init='pretrained'", "student.warm_start_steps=0"]
    if method == "offline":
        # sequence_kd imitates the teacher's text only: storing top-k would cost a second teacher pass.
        topk = ["offline.topk=0"] if cfg.offline.loss == "sequence_kd" else []
        # the completions on-policy has scored by the end: batch_size x samples_per_prompt a step
        rows = cfg.train.max_steps * cfg.prompts.batch_size * cfg.rollout.samples_per_prompt
        return common + [f"offline.num_prompts={rows}"] + topk
    if method == "control":
        # A_t = c exactly: nothing of the base config's feedback shaping applies to a teacher-free constant
        return common + ["objective.name='pg'", f"feedback.constant_advantage={control_advantage}",
                         "feedback.broken_prefix='keep'", "feedback.normalize=false", "feedback.gamma=0.0",
                         "feedback.clip=0.0"]
    # On-policy is evaluated twice as often: the step where it reaches offline's final accuracy is read off it.
    return common + [f"eval.every={max(cfg.eval.every // 2, 1)}"] if cfg.eval.every else common


def _percent(x: float | None, digits: int) -> str:
    """A ratio as a percentage; none (the teacher's accuracy was 0) as a dash."""
    return "—" if x is None else f"{x:.{digits}%}"


def run_compare(config: Path | None, overrides: list[str], run_dir: Path, *, seeds: list[int],
                control_advantage: float = -0.5, methods: tuple[str, ...] = METHODS, study_steps: int = 0,
                study_seeds: list[int] | None = None, weak_warm_start_steps: int = 800, jobs: int = 1,
                log=print) -> dict:
    run_dir = Path(run_dir)
    base = load_config(config, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(base))
    t0 = time.time()
    # One warm start shared by every method and seed.
    warm_run = run_dir / "warm-start"
    run_jobs([RunJob("warm start", load_config(config, overrides + ["train.max_steps=0"]), warm_run)], 1, log)
    warm = warm_run / "final"

    unknown = set(methods) - set(METHODS)
    if unknown or not {"onpolicy", "offline"} <= set(methods):
        raise ConfigError(f"methods must include onpolicy and offline and come from {', '.join(METHODS)}; "
                          f"got {', '.join(methods)}")
    todo = []
    for seed in seeds:
        for method in methods:
            cfg = load_config(config, overrides + method_overrides(method, base, warm, control_advantage) + [f"seed={seed}"])
            todo.append(RunJob(f"{method}, seed {seed}", cfg, run_dir / method / f"seed-{seed}",
                               "offline" if method == "offline" else "onpolicy"))
    reused = sum(j.done for j in todo)
    run_jobs(todo, jobs, log)
    curves: dict[str, list[list[dict]]] = {m: [] for m in methods}
    finals: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            rows = [r for r in read_metrics(run_dir / method / f"seed-{seed}") if "eval/accuracy" in r]
            curves[method].append(rows)
            finals[method].append(rows[-1])

    t_acc = teacher_accuracy(base)
    students = final_students(base, run_dir, seeds, methods)
    errors, recovery = students["errors"], students["recovery"]
    summary = {
        "teacher": {"eval/accuracy": t_acc},
        "seeds": seeds,
        "budget_steps": base.train.max_steps,
        "seconds": time.time() - t0,
        "reused_runs": reused,  # finished runs found on disk: their time is not in `seconds`
    }
    for m in methods:
        summary[m] = {
            **{k: _over_seeds(finals[m], k) for k in ("eval/accuracy", "eval/reverse_kl")},
            "teacher_tokens": mean_std([f["budget/teacher_tokens"] for f in finals[m]]),
            **{k: mean_std([f[k] for f in finals[m]]) for k in RECOVERY_KEYS if all(k in f for f in finals[m])},
        }
    summary["targets"] = _targets(summary, curves, t_acc)
    if recovery:  # the final students on eval.size prompts replace the eval rows' smaller-sample figures
        summary["recovery_prompts"] = recovery["prompts"]
        for m in finals:
            summary[m].update({k: mean_std(v) for k, v in recovery["rates"][m].items()})
    summary["recovery_by_step"] = recovery.get("by_step", {})
    if study_steps:
        summary["broken_prefix_study"] = run_handling_study(
            config, overrides, run_dir / f"broken-prefix-study-w{weak_warm_start_steps}-s{study_steps}",
            seeds=study_seeds or seeds[:1], steps=study_steps,
            weak_warm_start_steps=weak_warm_start_steps, jobs=jobs, log=log)
    summary["seconds"] = time.time() - t0
    report = run_dir / "report"
    report.mkdir(exist_ok=True)
    (report / "summary.json").write_text(json.dumps(summary, indent=1))
    _plots(report, curves, errors, t_acc)
    _recovery_plot(report, summary, summary["recovery_by_step"])
    if "broken_prefix_study" in summary:
        study_plot(report, summary["broken_prefix_study"])
    _write_report(report, summary, errors)
    return summary


def _over_seeds(rows: list[dict], key: str) -> dict | None:
    """mean_std of `key` over the seeds' final eval rows that hold it: an eval where the teacher scored nothing (a
    server down) has no reverse KL. `missing`: how many seeds lacked it; None where every seed did."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    return {**mean_std(values), **({"missing": len(rows) - len(values)} if len(values) < len(rows) else {})}


def _fmt_over_seeds(d: dict | None) -> str:
    if d is None:
        return "n/a"
    return fmt_mean_std(d) + (f" ({d['missing']} seed(s) without it)" if d.get("missing") else "")


def _targets(summary: dict, curves: dict, t_acc: float) -> dict:
    """The issue's two claims, measured: on-policy >= 95% of the teacher's accuracy, and on-policy reaching
    offline's final accuracy with <= 1/4 of offline's teacher tokens.

    "Reaching" is the first eval step from which the seed-mean accuracy stays at or above offline's final mean
    for every later eval: one lucky eval on a still-noisy curve does not count. Step 0 (the shared warm start,
    0 teacher tokens) does not count: if offline ends at or below it, offline never improved on the start and
    there is nothing to reach ("offline_improved": False, the token target not met)."""
    on_final = summary["onpolicy"]["eval/accuracy"]["mean"]
    off_final = summary["offline"]["eval/accuracy"]["mean"]
    off_tokens = summary["offline"]["teacher_tokens"]["mean"]
    steps = sorted({r["step"] for rows in curves["onpolicy"] for r in rows})
    mean_acc = {s: np.mean([r["eval/accuracy"] for rows in curves["onpolicy"] for r in rows if r["step"] == s])
                for s in steps}
    reach = None
    offline_improved = not (steps and steps[0] == 0 and off_final <= mean_acc[0])
    trained = [s for s in steps if s > 0] if offline_improved else []
    for i, s in enumerate(trained):
        if all(mean_acc[later] >= off_final for later in trained[i:]):
            reach = float(np.mean([r["budget/teacher_tokens"] for rows in curves["onpolicy"] for r in rows if r["step"] == s]))
            break
    return {
        "onpolicy_over_teacher_accuracy": on_final / t_acc if t_acc else None,
        "meets_95pct_of_teacher": bool(t_acc and on_final >= 0.95 * t_acc),
        "onpolicy_tokens_to_reach_offline_final": reach,
        "fraction_of_offline_tokens": None if reach is None else reach / off_tokens,
        "meets_quarter_of_offline_tokens": bool(reach is not None and reach <= off_tokens / 4),
        "offline_improved": offline_improved,
    }


def final_students(cfg: Config, run_dir: Path, seeds: list[int], methods) -> dict:
    """The warm start and each method's final students, each loaded once, on held-out prompts:
    - "errors": free-running error per answer segment (mean over seeds), on eval.size prompts;
    - recovery from a planted error on max(eval.size, eval.recovery_size) prompts (more than the eval rows'
      eval.recovery_size: the per-method difference is small and 32 prompts cannot resolve it):
      "recovery" = {"prompts": n, "by_step": {student: {step: rate}}, "rates": {student: {key: [per seed]}}},
      empty when eval.recovery_size = 0 or the task plants no errors."""
    tokenizer = load_tokenizer(cfg.teacher.model)
    teacher = LocalTeacher(load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device=cfg.teacher.device),
                           batch_size=cfg.teacher.batch_size)
    params = eval_sampling(cfg)
    n_recovery = max(cfg.eval.size, cfg.eval.recovery_size) if cfg.eval.recovery_size else 0
    stream = prompt_stream(cfg, load_tokenizer(cfg.student.model))
    eval_prompts, recovery_prompts = stream.eval_prompts(cfg.eval.size), stream.eval_prompts(n_recovery)
    folders = {"warm start": [run_dir / "warm-start" / "final"]}
    folders.update({m: [run_dir / m / f"seed-{s}" / "final" for s in seeds] for m in methods})
    errors: dict[str, list[float]] = {}
    recovery: dict = {"prompts": n_recovery, "by_step": {}, "rates": {}}
    for name, paths in folders.items():
        rates, runs = [], []
        for p in paths:
            student = load_model(str(p), device=cfg.student.device)
            res = detailed_eval(student, teacher, tokenizer, eval_prompts, params, seed=cfg.seed)
            if "error_by_step" in res:
                rates.append(res["error_by_step"]["free_running"])
            if n_recovery:
                runs.append(planted_error_recovery(student, tokenizer, recovery_prompts, params, seed=cfg.seed,
                                                   batch_size=cfg.teacher.batch_size))
        if rates:
            errors[name] = [float(x) for x in np.mean(rates, axis=0)]
        runs = [r for r in runs if r is not None]
        if not runs:
            recovery = {}
            n_recovery = 0
            continue
        steps = sorted({k for r in runs for k in r["recovery_by_step"]})
        recovery["by_step"][name] = {str(k): float(np.mean([r["recovery_by_step"][k] for r in runs
                                                            if k in r["recovery_by_step"]])) for k in steps}
        recovery["rates"][name] = {k: [r[k] for r in runs] for k in RECOVERY_KEYS[:2]}
    return {"errors": errors, "recovery": recovery}


def _plots(report: Path, curves: dict, errors: dict, t_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"onpolicy": "tab:blue", "offline": "tab:orange", "control": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for (row, key), (col, xkey, xlabel) in [((r, k), c) for r, k in enumerate(["eval/accuracy", "eval/reverse_kl"])
                                              for c in [(0, "budget/teacher_tokens", "teacher tokens"),
                                                        (1, "time/elapsed_s", "wall time (s)")]]:
        ax = axes[row][col]
        for m, runs in curves.items():
            steps = sorted({r["step"] for rows in runs for r in rows})
            xs = [np.mean([r.get(xkey, 0.0) or 0.0 for rows in runs for r in rows if r["step"] == s]) for s in steps]
            ys = np.array([[r.get(key, np.nan) for r in rows if r["step"] == s][0] for rows in runs
                           for s in steps]).reshape(len(runs), -1)
            if np.isnan(ys).all():  # no eval of this method holds it
                continue
            with warnings.catch_warnings():  # a step where no seed holds it: a gap in the line, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(ys, 0), np.nanstd(ys, 0)
            ax.plot(xs, mean, marker="o", color=colours[m], label=m)
            ax.fill_between(xs, mean - std, mean + std, color=colours[m], alpha=0.2)
        if key == "eval/accuracy":
            ax.axhline(t_acc, color="black", linestyle="--", label="teacher")
        else:  # the control's KL is orders of magnitude above the distilled students': a log axis shows both
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("on-policy vs offline distillation vs teacher-free control (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(report / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rates in errors.items():
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name, color=colours.get(name, "tab:green"))
    if errors:
        n = len(next(iter(errors.values())))
        ax.set_xticks(range(1, n + 1), [str(i) for i in range(1, n)] + ["answer"])
    ax.set_xlabel("segment of the answer (steps, least significant digit first, then the final answer)")
    ax.set_ylabel("error rate on the student's own prefixes")
    ax.set_title("error by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "error_by_position.png", dpi=110)
    plt.close(fig)


def _recovery_plot(report: Path, summary: dict, by_step: dict) -> None:
    """Recovery rate per method (mean ± std over seeds) next to clean-prefix accuracy, and by corrupted step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in summary and "eval/recovery_rate" in summary[m]]
    if not methods:
        return
    colours = {"onpolicy": "tab:blue", "offline": "tab:orange", "control": "tab:gray", "warm start": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    shown = [k for k in RECOVERY_KEYS if any(k in summary[m] for m in methods)]
    width = 0.8 / len(shown)
    for j, key in enumerate(shown):
        xs = [i + j * width for i, m in enumerate(methods) if key in summary[m]]
        vals = [summary[m][key] for m in methods if key in summary[m]]
        ax.bar(xs, [v["mean"] for v in vals], width, yerr=[v["std"] for v in vals], capsize=3,
               label=key.removeprefix("eval/"))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title("recovery from a planted error (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    for name, rates in by_step.items():
        steps = sorted(rates, key=int)
        ax.plot([int(s) + 1 for s in steps], [rates[s] for s in steps], marker="o", label=name,
                color=colours.get(name, "tab:purple"))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("corrupted step (1 = least significant digit)")
    ax.set_ylabel("recovery rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("recovery by the step that was corrupted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "recovery.png", dpi=110)
    plt.close(fig)


def _write_report(report: Path, summary: dict, errors: dict) -> None:
    t = summary["targets"]
    lines = [
        "# On-policy vs offline distillation",
        "",
        f"Seeds {summary['seeds']}, {summary['budget_steps']} steps per method from one warm start, "
        f"{summary['seconds']:.0f} s in all"
        + (f" ({summary['reused_runs']} finished runs reused from an earlier invocation, their time not included)"
           if summary.get("reused_runs") else "")
        + f". Teacher accuracy: {summary['teacher']['eval/accuracy']:.3f}. Every ± is the population standard "
        "deviation over the seeds (numpy's default, ddof = 0; the sample standard deviation is sqrt(n / (n - 1)) "
        "times larger).",
        "",
        "| method | eval accuracy | eval reverse KL / token | teacher tokens |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        if m not in summary:
            continue
        s = summary[m]
        lines.append(f"| {m} | {_fmt_over_seeds(s['eval/accuracy'])} | {_fmt_over_seeds(s['eval/reverse_kl'])} | "
                     f"{s['teacher_tokens']['mean']:,.0f} |")
    frac = t["fraction_of_offline_tokens"]
    lines += [
        "",
        "## The claims, measured",
        "",
        f"- On-policy reaches {_percent(t['onpolicy_over_teacher_accuracy'], 1)} of the teacher's accuracy "
        f"(target ≥ 95%: {'met' if t['meets_95pct_of_teacher'] else 'not met'}).",
        "- On-policy reaches (and stays at or above) offline's final accuracy with "
        + (f"{frac:.1%} of offline's teacher tokens" if frac is not None else
           "— (offline did not improve on the warm start: nothing to reach)" if not t.get("offline_improved", True)
           else "— (not reached within the budget)")
        + f" (target ≤ 25%: {'met' if t['meets_quarter_of_offline_tokens'] else 'not met'}).",
        "",
        "![curves](curves.png)",
        "",
        "## Error by position",
        "",
        "Error rate of each answer segment on the student's own prefixes (free-running sampling at the eval "
        "temperature), averaged over seeds.",
        "",
        "![error by position](error_by_position.png)",
        "",
        "| student | " + " | ".join(f"seg {i + 1}" for i in range(len(next(iter(errors.values()), [])))) + " |",
        "|---|" + "---|" * len(next(iter(errors.values()), [])),
    ]
    for name, rates in errors.items():
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in rates) + " |")
    lines += _recovery_lines(summary)
    md = "\n".join(lines) + "\n"
    (report / "report.md").write_text(md)
    (report / "report.html").write_text(_markdown_to_html(md))


def _recovery_lines(summary: dict) -> list[str]:
    methods = [m for m in METHODS if m in summary and "eval/recovery_rate" in summary[m]]
    if not methods:
        return []
    lines = [
        "",
        "## Broken prefixes and recovery",
        "",
        "One digit of a written step's result is made wrong in the reference answer, which is cut right after that "
        "step; the student continues. `recovery rate`: the final answer still verifies. `clean-prefix accuracy`: the "
        "same cut with the right digit. `likelihood recovery`: after a forced token the teacher finds unlikely, the "
        "teacher's windowed mean logprob of the continuation returns above the break threshold within the horizon. "
        f"Final students on {summary.get('recovery_prompts', '?')} held-out prompts (likelihood recovery: the last "
        "eval row's), mean ± std over seeds.",
        "",
        "| method | recovery rate | clean-prefix accuracy | likelihood recovery | teacher tokens |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        s = summary[m]
        cells = [fmt_mean_std(s[k]) if k in s else "-" for k in RECOVERY_KEYS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {s['teacher_tokens']['mean']:,.0f} |")
    lines += ["", "![recovery](recovery.png)"]
    if "broken_prefix_study" in summary:
        lines += study_lines(summary["broken_prefix_study"])
    return lines


def _markdown_to_html(md: str) -> str:
    """Just enough Markdown for this report: headings, bullets, tables, images, paragraphs."""
    out = ["<!doctype html><meta charset='utf-8'><title>opd compare</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;padding:4px 8px}"
           "table{border-collapse:collapse}img{max-width:100%}</style>"]
    rows: list[str] = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                rows.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
            continue
        if rows:
            out.append("<table>" + "".join(rows) + "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            out.append(f"<img alt='{html.escape(alt)}' src='{html.escape(src.rstrip(')'))}'>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out) + "\n"
