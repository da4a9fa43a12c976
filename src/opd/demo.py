"""`opd demo`: the built-in default end to end — one warm start, then on-policy distillation (the main
job) and the offline baseline on the same budget of teacher completions — and a short table of what each did."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.config import load_config
from opd.evaluate import accuracy, eval_sampling, generate
from opd.models import load_model, load_tokenizer
from opd.monitor import read_metrics
from opd.prompts import prompt_stream
from opd.teacher.cross_tokenizer import render_for_teacher


def teacher_accuracy(cfg, seed: int = 0) -> float | None:
    """The teacher's own accuracy on the held-out prompts, at the eval temperature: the ceiling."""
    tokenizer = load_tokenizer(cfg.teacher.model)
    teacher = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device=cfg.teacher.device)
    # the runs' held-out prompts (chat records in the student's template), each in the teacher's own template
    prompts = [replace(p, text=render_for_teacher(p, tokenizer))
               for p in prompt_stream(cfg, load_tokenizer(cfg.student.model)).eval_prompts(cfg.eval.size)]
    return accuracy(generate(teacher, tokenizer, prompts, eval_sampling(cfg), seed=seed,
                             batch_size=cfg.teacher.batch_size))


DEMO_STEPS = 200  # a small budget: on-policy is near its plateau by then (`opd compare` runs the full default)


def run_demo(run_dir: Path, console: Console | None = None, overrides: list[str] | None = None) -> dict:
    from opd.compare import _percent, run_compare  # compare builds on the demo's teacher_accuracy

    console = console or Console()
    run_dir = Path(run_dir)
    overrides = [f"train.max_steps={DEMO_STEPS}", *(overrides or [])]
    cfg = load_config(None, overrides)
    t0 = time.time()
    console.print(f"[bold]opd demo[/bold]: distilling {cfg.teacher.model} into {cfg.student.model}, "
                  f"{cfg.train.max_steps} steps of {cfg.prompts.batch_size} prompts, on-policy and offline "
                  "on the same budget of teacher completions")
    report = run_compare(None, overrides, run_dir, seeds=[cfg.seed], methods=("onpolicy", "offline"),
                         log=lambda *a: console.print(*a, markup=False, highlight=False, soft_wrap=True))
    runs = {m: read_metrics(run_dir / m / f"seed-{cfg.seed}") for m in ("onpolicy", "offline")}
    evals = {m: [r for r in rows if "eval/accuracy" in r] for m, rows in runs.items()}
    before = evals["onpolicy"][0]
    targets = report["targets"]

    table = Table(title="built-in default: on-policy vs offline distillation")
    for col in ("", "accuracy", "reverse KL / token", "teacher tokens"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("teacher", f"{report['teacher']['eval/accuracy']:.3f}", "0", "")
    table.add_row("student after warm start", f"{before['eval/accuracy']:.3f}", f"{before['eval/reverse_kl']:.3f}",
                  f"{before['budget/teacher_tokens']:,.0f}")
    for m in ("onpolicy", "offline"):
        last = evals[m][-1]
        table.add_row(f"{m} (step {last['step']})", f"{last['eval/accuracy']:.3f}", f"{last['eval/reverse_kl']:.3f}",
                      f"{last['budget/teacher_tokens']:,.0f}")
    console.print(table)
    frac = targets["fraction_of_offline_tokens"]
    console.print("on-policy reached offline's final accuracy with "
                  + (f"{frac:.0%} of offline's teacher tokens" if frac is not None else
                     "— offline did not improve on the warm start" if not targets.get("offline_improved", True)
                     else "— not within this budget")
                  + f"; on-policy / teacher accuracy {_percent(targets['onpolicy_over_teacher_accuracy'], 0)}")
    summary = {
        "teacher_accuracy": report["teacher"]["eval/accuracy"],
        "before": before,
        "after": evals["onpolicy"][-1],
        "offline": evals["offline"][-1],
        "targets": targets,
        "steps": cfg.train.max_steps,
        "seconds": time.time() - t0,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"took {summary['seconds']:.0f}s. Outputs in {run_dir}/: onpolicy/seed-{cfg.seed}/ (the main run: "
                  "metrics.jsonl, tensorboard/, checkpoints/, final/ = the distilled student), offline/, warm-start/, "
                  "report/ (report.md, plots), summary.json", markup=False, highlight=False)
    return summary
