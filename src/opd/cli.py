"""The `opd` command. Bad input ends with exit code 2 and one message naming the problem (no traceback)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from opd.config import ConfigError, load_config, reference_markdown, to_toml, Config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="opd: on-policy distillation of language models.")
teacher_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The built-in teacher.")
app.add_typer(teacher_app, name="teacher")
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def default_run_dir(prefix: str = "run") -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_config(config: Optional[Path], sets: list[str], max_steps: Optional[int], resume: Optional[Path]) -> Config:
    if config is None and resume is not None and (resume / "config.toml").is_file():
        config = resume / "config.toml"  # a resumed run keeps its own config unless told otherwise
    overrides = list(sets)
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    return load_config(config, overrides)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="TOML config; none = the built-in default."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Shortcut for --set train.max_steps=N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/run-TIMESTAMP)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
):
    """Run on-policy distillation: the student writes, the teacher scores, the student updates."""
    _run(config, set_, max_steps, out, resume, mode="onpolicy")


@app.command()
def offline(
    config: Optional[Path] = typer.Argument(None, help="TOML config; none = the built-in default."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Shortcut for --set train.max_steps=N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/offline-TIMESTAMP)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
):
    """Offline distillation baseline: the teacher writes completions once (stored, reusable), the student imitates."""
    _run(config, set_, max_steps, out, resume, mode="offline")


def _run(config, set_, max_steps, out, resume, mode: str) -> None:
    from opd.loop import RunAborted, run as run_loop

    try:
        if resume is not None and not resume.is_dir():
            raise ConfigError(f"--resume {resume}: no such run folder")
        cfg = resolve_run_config(config, set_, max_steps, resume)
        run_dir = resume or out or default_run_dir("run" if mode == "onpolicy" else "offline")
        result = run_loop(cfg, run_dir, resume=resume is not None, console=console, log=console.print, mode=mode)
    except ConfigError as e:
        fail(str(e))
    except RunAborted as e:
        err_console.print(f"[bold red]stopped:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    if result.interrupted:
        raise typer.Exit(130)
    _summary(result)


def _summary(result) -> None:
    f, l = result.first_eval, result.last_eval
    for key in ("eval/accuracy", "eval/reverse_kl"):
        if key in f and key in l:
            console.print(f"{key}: {f[key]:.3f} (step 0) -> {l[key]:.3f} (step {result.steps})")
    console.print(f"outputs in {result.run_dir}: metrics.jsonl, tensorboard/, checkpoints/, final/")


@app.command()
def demo(out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/demo-TIMESTAMP).")):
    """The built-in default end to end: a small char-level teacher distilled into a smaller student."""
    from opd.demo import run_demo

    try:
        run_demo(out or default_run_dir("demo"), console=console)
    except ConfigError as e:
        fail(str(e))


@app.command("config")
def config_cmd(
    config: Optional[Path] = typer.Argument(None, help="A TOML config to validate and show resolved."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    reference: bool = typer.Option(False, "--reference", help="Print the config reference (Markdown)."),
):
    """Print the resolved config as TOML (the default when none is given), or the reference."""
    if reference:
        sys.stdout.write(reference_markdown())
        return
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        fail(str(e))
    sys.stdout.write(to_toml(cfg))


@teacher_app.command("train")
def teacher_train(
    out: Path = typer.Option(Path("src/opd/assets/arith-teacher"), "--out", help="Output model folder."),
    steps: int = typer.Option(1500, "--steps", min=1, help="Training steps (batch 64)."),
    seed: int = typer.Option(1234, "--seed"),
    task: str = typer.Option("arith", "--task", help="Built-in task to train on."),
):
    """Train the built-in teacher from scratch on a built-in task and save it (save_pretrained)."""
    from opd.prompts.tasks import TASKS
    from opd.teacher.builtin import train_builtin_teacher

    if task not in TASKS:
        fail(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    result = train_builtin_teacher(out, task=task, steps=steps, seed=seed, log=console.print)
    console.print(f"saved to {out} (accuracy {result['accuracy']:.3f})")


if __name__ == "__main__":
    app()
