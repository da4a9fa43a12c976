"""`opd demo`: the built-in default end to end, then a short summary of what distillation did."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.config import load_config
from opd.evaluate import accuracy, generate
from opd.loop import run
from opd.models import load_model, load_tokenizer
from opd.prompts import PromptStream
from opd.rollout import SamplingParams


def teacher_accuracy(cfg, seed: int = 0) -> float | None:
    """The teacher's own accuracy on the held-out prompts, at the eval temperature: the ceiling."""
    tokenizer = load_tokenizer(cfg.teacher.model)
    teacher = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device=cfg.teacher.device)
    prompts = PromptStream(cfg.prompts, cfg.seed).eval_prompts(cfg.eval.size)
    params = SamplingParams(cfg.eval.temperature, 1.0, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    return accuracy(generate(teacher, tokenizer, prompts, params, seed=seed, batch_size=cfg.teacher.batch_size))


def run_demo(run_dir: Path, console: Console | None = None, overrides: list[str] | None = None) -> dict:
    console = console or Console()
    cfg = load_config(None, overrides or [])
    t0 = time.time()
    console.print(f"[bold]opd demo[/bold]: distilling {cfg.teacher.model} into {cfg.student.model} "
                  f"for {cfg.train.max_steps} steps ({cfg.prompts.batch_size} prompts each)")
    result = run(cfg, run_dir, console=console, log=console.print)
    t_acc = teacher_accuracy(cfg)
    before, after = result.first_eval, result.last_eval
    table = Table(title="on-policy distillation, built-in default")
    table.add_column("")
    table.add_column("accuracy", justify="right")
    table.add_column("reverse KL / token", justify="right")
    table.add_row("teacher", f"{t_acc:.3f}", "0")
    table.add_row("student after warm start (step 0)", f"{before['eval/accuracy']:.3f}", f"{before['eval/reverse_kl']:.3f}")
    table.add_row(f"student after OPD (step {result.steps})", f"{after['eval/accuracy']:.3f}", f"{after['eval/reverse_kl']:.3f}")
    console.print(table)
    summary = {
        "teacher_accuracy": t_acc,
        "before": before,
        "after": after,
        "steps": result.steps,
        "seconds": time.time() - t0,
    }
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"took {summary['seconds']:.0f}s. Outputs in {run_dir}/: metrics.jsonl, tensorboard/ "
                  f"(tensorboard --logdir {run_dir}/tensorboard), checkpoints/, final/ (the distilled student), summary.json")
    return summary
