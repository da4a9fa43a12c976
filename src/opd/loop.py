"""The on-policy distillation loop, top to bottom:

    prompts  ->  student rollout  ->  teacher scores the student's prefixes  ->  token feedback  ->  update

`run()` builds the parts from a Config, warm-starts the student (a short supervised phase on
teacher completions), then loops. Each step writes one metrics row; evaluation, checkpoints and
the live display hang off the loop without changing it. The first three stages make a batch; with
max_policy_lag > 0 a producer makes batches ahead of the trainer, with engine = "ray" Ray actors do
(opd.engine), and under torchrun each process trains on its share of the batch.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shutil
import signal
import threading
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from opd import matmul
from opd.checkpoint import (checkpoint_step, latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint,
                            set_aside_after, verify_checkpoint)
from opd.config import Config, ConfigError, ObjectiveConfig, to_toml
from opd.engine import LocalRollout, ScoredBatch, make_batches
from opd.engine.distributed import DataParallel, run_counters as sum_run_counters
from opd.evaluate import eval_sampling, eval_seed, evaluate, generate
from opd.faults import RunAborted, crash_point
from opd.offline.data import OfflineData, generate_offline_data
from opd.feedback import compute_feedback
from opd.lora import adapter_state, has_lora, load_adapter_state, merged_copy, save_plain
from opd.models import count_params, load_model, load_student, load_tokenizer, resolve_device
from opd.monitor import MetricsLog, RunDisplay, assess, health_metrics, read_metrics
from opd.prompts import PromptStream, prompt_stream, verify
from opd.recovery import RecoverySettings
from opd.rollout import SamplingParams, int8_decode_unsupported, make_guide, sampling_copy_for
from opd.rollout.backend import make_server_backend
from opd.teacher import LocalTeacher
from opd.teacher.build import build_teachers, check_tokenizers
from opd.teacher.cross_tokenizer import CrossTokenizerTeacher, same_vocabulary
from opd.types import Rollout, TeacherScores
from opd.update import make_optimizer, make_scheduler, supervised_train, update_student, use_config_hyperparameters
from opd.update.bf16 import Bf16Weights


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    first_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    interrupted: bool = False


class _StopFlag:
    """SIGINT/SIGTERM, once armed: the warm start, the offline generation or the training step under way finishes,
    what resumes is written, then the run stops. Unarmed (building the parts, loading a checkpoint: nothing to lose)
    a signal does what it did before the flag was installed (KeyboardInterrupt, termination)."""

    def __init__(self):
        self.raised = False
        self.armed = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.armed:
            self.raised = True
            return
        old = self._old[signum]
        if callable(old):
            old(signum, frame)
        else:  # SIG_DFL or SIG_IGN: let the process's own disposition act, then listen again
            signal.signal(signum, old)
            signal.raise_signal(signum)
            signal.signal(signum, self._handle)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


FULL_DISTRIBUTION = ("reverse_kl", "gkd", "topk_kl")
MAX_FULL_LOGPROBS_BYTES = 4 * 2**30  # the teacher's [B, T, V] fp32 distributions for reverse_kl / gkd


def make_teacher(cfg: Config, teacher_model, student_tok, teacher_tok, mode: str):
    """LocalTeacher when both share a vocabulary; else the cross-tokenizer teacher (after checking that the
    config of a training run, mode "onpolicy" or "offline", fits it; mode "eval" only scores)."""
    teacher = LocalTeacher(teacher_model, batch_size=cfg.teacher.batch_size, chunk_size=cfg.teacher.chunk_size,
                           topk=cfg.teacher.topk, fast=cfg.teacher.forward == "auto")
    if same_vocabulary(student_tok, teacher_tok):
        if mode == "onpolicy":
            check_full_distribution_memory(cfg, len(student_tok))
        return teacher
    if mode != "eval":
        check_cross_tokenizer_config(cfg, mode)
    return CrossTokenizerTeacher(teacher, student_tok, teacher_tok, max_prompt_tokens=2 * cfg.prompts.max_prompt_tokens)


def check_cross_tokenizer_config(cfg: Config, mode: str) -> None:
    what = f"student ({cfg.student.model}) and teacher ({cfg.teacher.model}) use different tokenizers, so"
    if mode == "offline":
        raise ConfigError(f"{what} the offline baseline (which trains on the teacher's tokens) needs one shared tokenizer")
    if cfg.objective.name in FULL_DISTRIBUTION:
        raise ConfigError(f"{what} the teacher's distribution cannot be compared token by token (objective.name = "
                          f"'{cfg.objective.name}'); cross-tokenizer distillation needs objective.name = 'pg'")
    if cfg.student.warm_start_steps > 0:
        raise ConfigError(f"{what} the teacher's completions cannot be imitated token by token; "
                          "set student.warm_start_steps = 0 (start from a pretrained student)")


def resume_command(mode: str, run_dir: Path) -> str:
    return f"{'opd run' if mode == 'onpolicy' else 'opd offline'} --resume {run_dir}"


def check_resumable(state: dict, cfg: Config, mode: str, run_dir: Path, *, lora: bool) -> None:
    """A checkpoint continues only the kind of run that wrote it: same loop (on-policy or offline), LoRA or not."""
    wrote = state.get("mode", mode)  # checkpoints from before the mode was saved: not checked
    if wrote != mode:
        raise ConfigError(f"{run_dir} is an {wrote.replace('onpolicy', 'on-policy')} run: continue it with "
                          f"`{resume_command(wrote, run_dir)}`")
    if lora != ("adapter" in state):
        raise ConfigError(f"{run_dir} was trained {'with' if 'adapter' in state else 'without'} LoRA adapters and the "
                          f"config says student.lora_rank = {cfg.student.lora_rank}: a resume cannot add or remove "
                          "them; resume with the run's own setting, or start a new run from its final/ model")


def check_full_distribution_memory(cfg: Config, vocab_size: int) -> None:
    if cfg.objective.name not in ("reverse_kl", "gkd"):
        return
    rows = cfg.prompts.batch_size * cfg.rollout.samples_per_prompt
    need = rows * cfg.rollout.max_new_tokens * vocab_size * 4
    if need > MAX_FULL_LOGPROBS_BYTES:
        raise ConfigError(
            f"objective.name = '{cfg.objective.name}' keeps the teacher's full distribution for every token: "
            f"{rows} x {cfg.rollout.max_new_tokens} tokens x {vocab_size} vocabulary x 4 bytes = {need / 2**30:.1f} GiB. "
            "Use objective.name = 'pg' or 'topk_kl' (with teacher.topk), or lower prompts.batch_size / rollout.max_new_tokens"
        )


def bf16_on_a_cpu_without_it(cfg: Config) -> list[str]:
    """The settings that put bf16 matmuls on a CPU without bf16 instructions (opd.matmul.cpu_lacks_bf16)."""
    if not matmul.cpu_lacks_bf16():
        return []
    on_cpu = lambda device: resolve_device(device).type == "cpu"  # noqa: E731
    found = []
    if on_cpu(cfg.student.device):
        if cfg.student.dtype == "bfloat16":
            found.append("student.dtype = 'bfloat16'")
        if cfg.train.autocast == "bfloat16":
            found.append("train.autocast = 'bfloat16'")
        if cfg.train.bf16_weights:
            found.append("train.bf16_weights = true")
        # rollout.dtype = "int8" has no bf16 matmuls here: the fp32 student prefills itself (sampling_copy_for)
        if cfg.rollout.dtype == "bfloat16" and cfg.rollout.backend == "local":
            found.append("rollout.dtype = 'bfloat16'")
    if not cfg.teacher.remote and cfg.teacher.dtype == "bfloat16" and on_cpu(cfg.teacher.device):
        found.append("teacher.dtype = 'bfloat16'")
    return found


def check_engine(cfg: Config, mode: str, dp: DataParallel | None) -> None:
    if cfg.engine == "ray" and dp is not None:
        raise ConfigError("engine = 'ray' with several torchrun processes is not supported: use engine = 'local' "
                          "under torchrun, or one trainer process with engine = 'ray'")
    if dp is not None:
        if mode == "offline":
            raise ConfigError("opd offline runs in one process: start it without torchrun")
        rows = cfg.prompts.batch_size * cfg.rollout.samples_per_prompt
        if rows % dp.world:
            raise ConfigError(f"data-parallel training over {dp.world} processes needs a batch (prompts.batch_size x "
                              f"rollout.samples_per_prompt = {rows}) that splits evenly over them")
        if cfg.objective.name == "hybrid" and (rows // dp.world) % cfg.rollout.samples_per_prompt:
            raise ConfigError("objective.name = 'hybrid' normalises rewards within a group: each rank's share must "
                              "hold whole groups (prompts.batch_size divisible by the number of processes)")


def weights_of(model) -> dict[str, torch.Tensor]:
    """A snapshot of the student's weights (what a rollout worker loads), detached from training."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _NoMetrics:
    """Ranks other than 0 write no metrics (rank 0's rows describe its share; the update is global)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def run(cfg: Config, run_dir: Path, *, resume: bool = False, console=None, log=print, mode: str = "onpolicy") -> RunResult:
    """mode "onpolicy": the student writes, the teacher scores. mode "offline": the teacher writes once
    (stored under offline.data), the student imitates; everything else is shared."""
    # One handler from start to end, armed once there is work to keep: a Ctrl-C between two phases (the warm start
    # done, the loop not yet begun: Ray actors starting, the first evaluation) stops at the loop's first step too
    with _StopFlag() as stop:
        return _run(cfg, Path(run_dir), resume, console, log, mode, stop)


def _run(cfg: Config, run_dir: Path, resume: bool, console, log, mode: str, stop: _StopFlag) -> RunResult:
    # Data-parallel training under torchrun: every rank trains on its share; rank 0 writes files and evaluates.
    dp = DataParallel.from_env(resolve_device(cfg.student.device))
    main = dp is None or dp.is_main
    if not main:  # rank 0 says it (every rank would print the same lines)
        log = lambda *a, **k: None  # noqa: E731
    check_engine(cfg, mode, dp)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; give the run a folder (--out)")
    if not resume and (list_checkpoints(run_dir) or (run_dir / "final").is_dir()):  # all ranks: none hangs
        # a second run here would prune the first one's checkpoints by step number and a later resume would mix them
        raise ConfigError(f"{run_dir} already holds a run (checkpoints/ or final/): continue it with --resume {run_dir}, "
                          "or give the new run another folder (--out)")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resume writes its config once its checkpoint has loaded: a failed one leaves the old
            (run_dir / "config.toml").write_text(to_toml(cfg))
    seed_everything(cfg.seed)

    # ---- build the parts
    tokenizer = load_tokenizer(cfg.student.model)
    check_tokenizers(cfg, tokenizer)  # servers and [teachers.NAME] share the student's vocabulary
    student = load_student(cfg.student, cfg.seed)
    if cfg.teacher.remote and mode == "offline":
        raise ConfigError("opd offline writes teacher completions with a local teacher: unset teacher.url")
    # A teacher server (teacher.url) has no weights here: it scores, and writes the warm-start data.
    teacher_model = None if cfg.teacher.remote else load_model(cfg.teacher.model, dtype=cfg.teacher.dtype,
                                                                device=cfg.teacher.device)
    # The local [teacher] may use another tokenizer: then it scores through the cross-tokenizer alignment.
    local_teacher = None if teacher_model is None else make_teacher(cfg, teacher_model, tokenizer,
                                                                   load_tokenizer(cfg.teacher.model), mode)
    stream = prompt_stream(cfg, tokenizer)
    teacher = build_teachers(cfg, [s.name for s in stream.sources], default_model=teacher_model,
                             default_teacher=local_teacher, log=log)
    prompt_counts = {f"prompts/{k}": v for k, v in stream.load_counts().items()}
    if any(prompt_counts.values()):
        log("prompts: " + ", ".join(f"{k[8:]} {v}" for k, v in prompt_counts.items() if v))
    eval_prompts = stream.eval_prompts(cfg.eval.size)
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens, cfg.rollout.stop,
                            cfg.rollout.decoder, int8=cfg.rollout.dtype == "int8")
    teacher_params = dataclasses.replace(params, int8=False)  # rollout.dtype is the student's; the teacher writes as is
    eval_params = eval_sampling(cfg)
    device = resolve_device(cfg.student.device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + (0 if dp is None else 7919 * dp.rank))
    total_updates = cfg.train.max_steps * cfg.train.updates_per_batch
    n_student = count_params(student)
    n_teacher = count_params(teacher_model) if teacher_model is not None else 0  # a server's size is unknown here
    needs_full = cfg.objective.name in ("reverse_kl", "gkd")
    # teacher-guided rollouts: the teacher helps choose the student's tokens (None when off)
    guide = make_guide(cfg.rollout.teacher_mix, cfg.rollout.teacher_correct_topk, teacher_model, tokenizer,
                       cfg.teacher.model)
    if slow := bf16_on_a_cpu_without_it(cfg):
        log(f"warning: {', '.join(slow)} on a CPU without bf16 instructions (no avx512_bf16 / amx_bf16): bf16 "
            "matmuls have no fast kernel here and run many times slower than float32 (an update step ~20x); "
            "set them to 'float32' / 'none' on this machine")
    # rollout.dtype = "bfloat16": a low-precision copy of the student samples (None: the student itself); "int8":
    # decode steps read int8 weights (params.int8), prefilled by a bf16 copy or, on CPUs without bf16, the student
    sampling_copy = sampling_copy_for(student, cfg.rollout.dtype)
    sampler = student if sampling_copy is None else sampling_copy.model
    if cfg.rollout.dtype == "int8" and (reason := int8_decode_unsupported(sampler, cfg.rollout.decoder)):
        plain = str(next(sampler.parameters()).dtype).removeprefix("torch.")
        log(f"warning: rollout.dtype = 'int8' falls back to {plain} decoding: {reason}")
    # train.bf16_weights: the update trains through a bf16 copy (fp32 master weights in the student and its
    # optimizer); the rollout's own bf16 copy where it samples in this process with the trainer's weights
    bf16 = None
    if cfg.train.bf16_weights:
        in_step = cfg.engine != "ray" and cfg.rollout.backend == "local" and cfg.max_policy_lag // cfg.train.updates_per_batch == 0
        bf16 = Bf16Weights(student, sampling_copy if in_step else None)
        optimizer = bf16.optimizer(lr=cfg.train.lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = make_optimizer(student, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, total_updates)
    ref_model = None

    def eval_row(step: int, version: int) -> dict:
        with teacher_lock:
            return evaluate(student, teacher, tokenizer, eval_prompts, eval_params, seed=eval_seed(cfg.seed, step),
                            version=version, max_prompt_tokens=cfg.prompts.max_prompt_tokens,
                            recovery=RecoverySettings.from_config(cfg), teacher_model=teacher_model)

    t_start = time.time()  # wall time includes the warm start and offline data generation (what a user waits for)
    ckpt = latest_checkpoint(run_dir, warn=log) if resume else None
    if resume and ckpt is None:
        log(f"no intact checkpoint in {run_dir}; starting from the beginning")
    if resume and main:
        for moved in set_aside_after(run_dir, None if ckpt is None else checkpoint_step(ckpt)):
            log(f"set aside {moved} (damaged): this run writes its step number again")
    first_eval: dict = {}
    stop.armed = True  # from here a Ctrl-C waits for the next point where the work done so far is kept

    def stopping() -> bool:  # every data-parallel rank stops at the same step, or their collectives part ways
        return stop.raised if dp is None else not dp.all_true(not stop.raised)

    if ckpt is not None:
        # ---- resume: weights, optimizer, scheduler, RNG, prompt position, counters
        state = load_trainer_state(ckpt)
        check_resumable(state, cfg, mode, run_dir, lora=has_lora(student))
        if has_lora(student):  # the checkpoint's weights are merged; the adapters themselves are in its state
            load_adapter_state(student, state["adapter"])
        else:
            student.load_state_dict(load_model(str(ckpt), dtype=cfg.student.dtype, device=cfg.student.device).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if changed := use_config_hyperparameters(optimizer, scheduler, cfg.train):
            log(f"resume: {'; '.join(changed)} (from the config)")
        start, version, budget, first_eval = state["step"], state["version"], state["budget"], state["first_eval"]
        rng, pending = state["rng"], state.get("pending", [])  # pending: batches a pipelined run had made ahead
        ranks = state.get("ranks")  # a data-parallel run's per-rank sampler, RNG and batches made ahead
        remade = []
        if dp is not None and ranks is not None and len(ranks) == dp.world:
            rng, pending = ranks[dp.rank], ranks[dp.rank]["pending"]
        elif dp is not None or ranks is not None:
            # Another number of processes: a saved sampler state or batch made ahead belongs to another split (with
            # rank 0's sampler every rank drew the same completions). Each rank seeds its sampler from the step and
            # its rank, and the batches made ahead are made again (their prompts drawn again, not skipped).
            remade = [made.step for made in (pending or (ranks[0]["pending"] if ranks else []))]
            rank = 0 if dp is None else dp.rank
            rng, pending = {**rng, "sampler": None}, []
            gen.manual_seed(int(np.random.default_rng([cfg.seed, start, rank, 0x5EED]).integers(2**62)))
        if rng["sampler"] is not None:  # None: the run sampled on Ray workers, seeded per step (or seeded just above)
            gen.set_state(rng["sampler"])
        torch.set_rng_state(rng["torch"])
        stream.load_state_dict(state["prompts"])
        if remade:
            stream.rewind(remade)
            log(f"resumed on {1 if dp is None else dp.world} process(es), not the checkpoint's "
                f"{1 if ranks is None else len(ranks)}: the {len(remade)} batch(es) made ahead are made again")
        if start > cfg.train.max_steps:
            raise ConfigError(f"{run_dir} is at step {start} already, past train.max_steps = {cfg.train.max_steps}: "
                              "give a larger --max-steps to continue it")
        skips = state["skips"]
        counters_before = state.get("counters", {})
        t_start -= state.get("elapsed_s", 0.0)
        if cfg.objective.kl_ref_coef > 0 and mode == "onpolicy":
            # the reference is the student after its warm start: in reference/ where the run began with the penalty,
            # else checkpoint 0's weights while that checkpoint is kept (a resume that adds the penalty)
            ref_dir = run_dir / "reference"
            if not ref_dir.is_dir():
                ref_dir = run_dir / "checkpoints" / "step-0"
                if not ref_dir.is_dir() or verify_checkpoint(ref_dir):
                    raise ConfigError(
                        f"objective.kl_ref_coef = {cfg.objective.kl_ref_coef}, but {run_dir} began without the penalty "
                        "and its reference (the student after the warm start, checkpoint 0) is no longer kept: resume "
                        "with objective.kl_ref_coef = 0, or start a new run with the penalty")
                log("objective.kl_ref_coef: the reference is checkpoint 0's student (the run began without the penalty)")
            ref_model = load_model(str(ref_dir), dtype=cfg.student.dtype, device=cfg.student.device)
            if main and ref_dir.name != "reference":
                save_plain(ref_model, run_dir / "reference")
        log(f"resumed from {ckpt} (step {start})")
    else:
        start, version, pending, remade = 0, 0, [], []
        counters_before = {}
        budget = {"teacher_tokens": 0, "student_tokens": 0, "flops": 0.0}
        skips = {"total": 0, "consecutive": 0}
        if cfg.student.warm_start_steps > 0:
            # Ctrl-C / SIGTERM: the warm start stops at its next step, and the run with it
            finished = warm_start(cfg, student, teacher_model or teacher.teachers["default"], tokenizer, stream,
                                  teacher_params, budget, log, should_stop=stopping)
            if not finished:  # a finished one is kept: the loop writes checkpoint 0 before it stops
                log(f"interrupted during the warm start, before the first checkpoint: `{resume_command(mode, run_dir)}` "
                    "starts the run again")
                return RunResult(run_dir=run_dir, steps=0, interrupted=True)
    if resume and main:  # the parts are built and the checkpoint has loaded: the config is one that runs
        (run_dir / "config.toml").write_text(to_toml(cfg))
    objective = cfg.objective
    offline_data = None
    if mode == "offline":
        # Ctrl-C / SIGTERM: generation stops after its current batch (what is stored stays)
        offline_data, objective = prepare_offline(cfg, run_dir, teacher_model, tokenizer, stream, teacher_params, log,
                                                  should_stop=stopping)
        if offline_data is None:
            log(f"interrupted during the offline data generation: `{resume_command(mode, run_dir)}` continues it")
            return RunResult(run_dir=run_dir, steps=0, interrupted=True)
        needs_full = False
        if ckpt is None:  # the stored data is what the teacher spent, whether made now or earlier
            budget["teacher_tokens"] += offline_data.num_tokens
            # its forward over every token it wrote, and a second (scoring) pass for the stored top-k
            budget["flops"] += 2 * n_teacher * offline_data.num_tokens * (2 if cfg.offline.topk else 1)
    # A per-token estimate of KL(pi_theta || pi_T) needs draws that cover the student's own choices: teacher_mix < 1
    # does (q >= (1 - mix) pi_theta); teacher_correct_topk and teacher_mix = 1 never draw the student's tokens that
    # the teacher ranks low, the ones that make the KL large (it read 2.5 or -4.6 where the exact value was 9.8)
    kl_estimable = cfg.rollout.teacher_correct_topk == 0 and cfg.rollout.teacher_mix < 1
    # teacher-written text is no broken student prefix: the offline baseline imitates all of it
    feedback_cfg = cfg.feedback if offline_data is None else \
        cfg.feedback.model_copy(update={"broken_prefix": "keep", "break_entropy": None})
    if ckpt is None and objective.kl_ref_coef > 0:
        ref_model = copy.deepcopy(merged_copy(student)).eval().requires_grad_(False)
        if main:  # every rank keeps its copy; one writes it
            save_plain(ref_model, run_dir / "reference")
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    if dp is not None:  # every rank starts from rank 0's weights
        dp.broadcast_params(student)

    # ---- steps 1-3 (prompts, rollout, teacher scores) make one batch. With max_policy_lag > 0 a producer makes
    #      them ahead of the trainer (opd.engine.pipeline); with engine = "ray" the rollouts and scores come from
    #      Ray actors (opd.engine.ray). Either way every rollout row carries the version of the weights that sampled it.
    teacher_lock = threading.Lock()  # a producer thread may score while the trainer evaluates
    ahead = 0 if offline_data is not None else cfg.max_policy_lag // cfg.train.updates_per_batch
    workers = None
    if cfg.engine == "ray" and offline_data is None:
        from opd.engine.ray_workers import RayWorkers  # Ray is an optional extra

        # [teacher] scores in Ray actors; a teacher server or named [teachers.NAME] are scored from here, through
        # the same clients as the local engine (a server batches and scales on its own)
        local_scoring = not (cfg.teacher.remote or cfg.teachers)
        workers = RayWorkers(cfg, version=version, weights=weights_of(student), log=log, teacher_actors=local_scoring)
        backend, score = workers, (workers.score if local_scoring else teacher.score)
    elif cfg.rollout.backend == "server" and offline_data is None:  # an inference server samples for the student
        backend = make_server_backend(cfg, student, tokenizer, params, version=version, run_dir=run_dir,
                                      private_copy=ahead > 0, rank=0 if dp is None else dp.rank)
        score = teacher.score
    else:
        backend = LocalRollout(student if ahead == 0 else copy.deepcopy(student), tokenizer, params, version=version,
                               generator=gen, max_prompt_tokens=cfg.prompts.max_prompt_tokens, guide=guide,
                               sampling_copy=sampling_copy)
        score = teacher.score
    # what publish() hands the backend after an update: nothing when it samples with the trainer's own student
    publish_weights = (lambda: None) if backend is not workers and ahead == 0 else (lambda: weights_of(student))
    backend_metrics = getattr(backend, "metrics", dict)  # e.g. the server backend's weight-sync time

    student_width = student.get_output_embeddings().weight.shape[0]  # a same-tokenizer teacher's head may differ

    def produce(step: int, backend) -> ScoredBatch:
        if offline_data is not None:  # offline baseline: stored teacher completions and their teacher logprobs
            # as many rows a step as on-policy trains on (batch_size x samples_per_prompt), so the two compare step for step
            rollout, scores = offline_data.batch(step, cfg.prompts.batch_size * cfg.rollout.samples_per_prompt, cfg.seed)
            return ScoredBatch(step, rollout, scores)
        # 1. prompts (a data-parallel rank takes its share)
        prompts = [p for p in stream.batch(step) for _ in range(cfg.rollout.samples_per_prompt)]
        if dp is not None:
            prompts = prompts[dp.shard(len(prompts))]
        # 2. student rollout with the backend's weights
        t0 = time.perf_counter()
        with teacher_lock if guide is not None else nullcontext():  # guided sampling runs the teacher too
            rollout = backend.rollout(prompts, step)
        t1 = time.perf_counter()
        # 3. teacher scores the student's own prefixes
        if cfg.feedback.constant_advantage is None:
            with teacher_lock:
                scores = score(rollout, full=needs_full).fit_vocab(student_width)
        else:  # teacher-free control: A_t = c exactly, no teacher call, no teacher tokens spent
            scores = TeacherScores(rollout.behaviour_logprobs + cfg.feedback.constant_advantage,
                                   rollout.completion_mask.clone())
        return ScoredBatch(step, rollout, scores, rollout_s=t1 - t0, teacher_s=time.perf_counter() - t1)

    # max_policy_lag lowered since the checkpoint: a batch made ahead that would train past the new bound (and every
    # one after it) is made again with newer weights
    within = 0
    for j, made in enumerate(pending[:ahead]):
        if version + j * cfg.train.updates_per_batch - int(made.rollout.policy_version.min()) > cfg.max_policy_lag:
            break
        within = j + 1
    dropped = len(pending) - within
    if dropped:
        log(f"dropping {dropped} of the {len(pending)} batches made ahead of the checkpoint "
            f"(max_policy_lag is now {cfg.max_policy_lag}): they are sampled again with newer weights")
        stream.rewind([made.step for made in pending[within:]])  # their prompts are drawn again, not skipped
        pending = pending[:within]
    if ckpt is not None and not dropped and not remade and ahead > 0 and \
            len(pending) < min(ahead, cfg.train.max_steps - start):
        # A run that reached its own max_steps made nothing past it, so the batches the extension would have made
        # ahead (with weights older than these) are sampled now: fresher than an uninterrupted longer run's.
        log(f"the checkpoint holds {len(pending)} of the {ahead} batches made ahead (the run had reached its "
            f"max_steps): steps {start + len(pending) + 1}-{min(start + ahead, cfg.train.max_steps)} are sampled "
            "with the newest weights, so this run differs from one that had the longer max_steps from the start")
    batches = make_batches(produce, backend, stream.state_dict, start=start, max_steps=cfg.train.max_steps,
                           ahead=ahead, pending=pending)

    metrics = MetricsLog(run_dir, tensorboard=cfg.monitor.tensorboard, resume_after_step=start if ckpt else None) \
        if main else _NoMetrics()

    def run_counters() -> dict[str, float]:
        """Cumulative fault counts over the whole run: those up to the checkpoint this run resumed from, plus what
        the teacher clients (and Ray workers) have counted since, of every data-parallel rank (a collective: every
        rank calls it)."""
        now = {**teacher.counters(), **(workers.counters() if workers is not None else {})}
        return sum_run_counters(counters_before, [now] if dp is None else dp.gathered(now))

    def periodic(step: int) -> bool:  # a step train.checkpoint_every writes a checkpoint at
        return bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0

    def checkpoint(step: int) -> None:
        made = batches.state_dict(step)  # sampler and prompt position after the batches made ahead, and those batches
        ranks = None
        if dp is not None:  # each rank's own sampler, RNG and batches made ahead, so that each resumes exactly
            ranks = dp.gathered({"sampler": made["sampler"], "torch": torch.get_rng_state(), "pending": made["pending"]})
        counters = run_counters()  # before rank 0 goes on alone: every rank adds its counts
        if not main:
            return
        state = {
            "mode": mode, "step": step, "version": version, "budget": budget, "first_eval": first_eval, "skips": skips, "elapsed_s": time.time() - t_start,
            "counters": counters,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"sampler": made["sampler"], "torch": torch.get_rng_state()},
            # a data-parallel run's batches made ahead are each rank's share, kept in `ranks` only: a resume with
            # another world size makes its batches again instead of training on rank 0's half of one
            "prompts": made["prompts"], "pending": made["pending"] if ranks is None else [], "ranks": ranks,
        }
        if has_lora(student):
            state["adapter"] = adapter_state(student)
        save_checkpoint(run_dir, step, student, tokenizer, state, keep=cfg.train.keep_checkpoints)

    last_eval = dict(first_eval)
    if ckpt is not None and main:  # a resumed run's latest evaluation so far: its summary if no step is left to run
        evals = [r for r in read_metrics(run_dir) if "eval/length" in r]  # rows up to the checkpoint (MetricsLog)
        if evals:
            last_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    step = start
    interrupted = False
    # rank 0 shows the run; the others' display prints nothing and runs no live panel's refresh thread
    display_cfg, display_console = (cfg.monitor, console) if main else \
        (cfg.monitor.model_copy(update={"live": "off"}), Console(quiet=True))
    with RunDisplay(display_cfg, cfg.train.max_steps, start, console=display_console) as display, \
            closing(workers) if workers is not None else nullcontext(), closing(batches):
        # (closed in reverse: the producer stops before the Ray workers it calls go away)
        if ckpt is None:
            first_eval = eval_row(0, version) if main else {}
            last_eval = dict(first_eval)
            row = {"step": 0, **first_eval, **{f"budget/{k}": v for k, v in budget.items()},
                   "time/elapsed_s": time.time() - t_start}
            metrics.write(row)
            display.update(row)
            checkpoint(0)

        steps_left = range(start + 1, cfg.train.max_steps + 1)
        if stopping():  # a Ctrl-C while the run was set up (after the warm start: Ray actors starting, the step-0 eval)
            log(f"interrupted before step {start + 1}: the checkpoint of step {start} stands; continue with "
                f"`{resume_command(mode, run_dir)}`")
            interrupted, steps_left = True, range(0)
        for step in steps_left:
            t0 = time.perf_counter()
            # 1-3. prompts, rollout, teacher scores: this step's batch (made now, or ahead while earlier steps trained)
            try:
                batch = batches.get(step)
            except RunAborted:  # e.g. a Ray worker lost for good: the steps trained so far are kept
                if ahead == 0 and step - 1 > start and not periodic(step - 1):
                    stream.rewind([step])  # this step's prompts were drawn: a resume draws them again
                    checkpoint(step - 1)
                raise
            rollout, scores = batch.rollout, batch.scores
            crash_point("rollout", step)
            t2 = time.perf_counter()
            crash_point("teacher", step)
            # 4. token feedback
            correct = [verify(p, c) for p, c in zip(rollout.prompts, rollout.texts)]
            rewards = torch.tensor([float(c or 0) for c in correct]) if objective.name == "hybrid" else None
            if rewards is not None and scores.rewards is not None:  # score-only teachers give the reward themselves
                rewards = torch.where(torch.isfinite(scores.rewards), scores.rewards, rewards)
            feedback = compute_feedback(rollout, scores, feedback_cfg, rewards=rewards,
                                        reward_weight=cfg.objective.reward_weight, opd_weight=cfg.objective.opd_weight,
                                        group_size=cfg.rollout.samples_per_prompt,
                                        sum_over_ranks=None if dp is None else dp.sums)  # whitening: the whole batch's
            # 5. update the student near its own rollout distribution
            finite = _finite(scores, feedback)
            if dp is not None:  # every rank updates, or none does
                finite = dp.all_true(finite)
            if finite:
                trained = student if bf16 is None else bf16.model()
                upd, new_version = update_student(trained, optimizer, scheduler, rollout, scores, feedback,
                                                  objective=objective, train=cfg.train, version=version,
                                                  ref_model=ref_model, chunk_size=cfg.teacher.chunk_size, dp=dp)
            else:  # a non-finite teacher logprob or advantage: never train on it
                upd, new_version = {"stability/skipped_batches": float(cfg.train.updates_per_batch)}, version
            # no step applied: for non-finite numbers (counted in skipped_batches), or for want of any token to train on
            # (the teacher scored none, or every one was truncated after a broken prefix)
            skipped_all = new_version == version
            nothing_to_train = skipped_all and upd["stability/skipped_batches"] == 0
            version = new_version
            lost = None  # a Ray worker lost for good while this step trained: the step is kept, then the run stops
            try:
                batches.publish(step, version, publish_weights)  # the weights later batches are sampled with
            except RunAborted as e:
                lost = e
            skips["total"] += int(upd["stability/skipped_batches"])
            skips["consecutive"] = skips["consecutive"] + 1 if skipped_all else 0
            skips["empty"] = skips.get("empty", 0) + 1 if nothing_to_train else 0
            t3 = time.perf_counter()
            crash_point("update", step)

            n_tok, n_scored = rollout.num_tokens, scores.tokens_scored
            if dp is not None:  # the budget counts every rank's tokens
                n_tok, n_scored = int(dp.sum(n_tok)), int(dp.sum(n_scored))
            if offline_data is None:
                budget["student_tokens"] += n_tok
                budget["teacher_tokens"] += n_scored
                budget["flops"] += 2 * n_student * n_tok + 2 * n_teacher * n_scored
                if guide is not None:  # the teacher also ran a forward for every token it helped choose
                    budget["teacher_tokens"] += n_tok
                    budget["flops"] += 2 * n_teacher * n_tok
            # forward and backward once per token: updates_per_batch splits the batch into mini-batches, each
            # trained once; the reference model's forward (kl_ref_coef) on top
            budget["flops"] += 6 * n_student * n_tok + (2 * n_student * n_tok if ref_model is not None else 0)
            if offline_data is not None:  # teacher-written data: no student policy to be fresh against, no scoring
                upd = {k: v for k, v in upd.items() if not k.startswith("freshness/")}
            if cfg.feedback.constant_advantage is not None:  # the control never asked the teacher
                row_drop = ("teacher/", "opd/reverse_kl")
            else:
                row_drop = ()
            times = {"rollout_s": batch.rollout_s, "teacher_s": batch.teacher_s, "wait_s": t2 - t0, "update_s": t3 - t2,
                     "step_s": t3 - t0}
            step_metrics = {**_step_metrics(rollout, scores, feedback, correct, times, offline_data is not None,
                                            kl_estimable), **upd}
            if dp is not None:  # the whole global batch's figures, not rank 0's share
                step_metrics = dp.merged_metrics(step_metrics)
            row = {"step": step, **step_metrics,
                   "stability/skipped_batches_total": skips["total"], **prompt_counts,
                   **{f"budget/{k}": v for k, v in budget.items()}, "time/elapsed_s": time.time() - t_start}
            row = {k: v for k, v in row.items() if not k.startswith(row_drop)} if row_drop else row
            if main and ((cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.max_steps):
                last_eval = eval_row(step, version)
                row.update(last_eval)
                crash_point("eval", step)
            # cumulative teacher faults (evaluation scoring included) and calls re-issued after a Ray worker died
            row.update(counters := run_counters())
            if counters.get("teacher/cache_lookups_total"):  # over the whole run, a resumed one's included
                row["teacher/cache_hit_rate"] = counters["teacher/cache_hits_total"] / counters["teacher/cache_lookups_total"]
            row.update(backend_metrics())
            row.update(health_metrics(assess(row, cfg.monitor)))
            metrics.write(row)
            display.update(row)
            crash_point("metrics", step)
            if lost is not None:
                if ahead == 0:
                    checkpoint(step)
                metrics.close()
                raise lost
            if skips["consecutive"] >= cfg.train.max_consecutive_skips:
                checkpoint(step)
                metrics.close()
                if skips["empty"] == skips["consecutive"]:
                    cause = ("the teacher scored no token (teacher/coverage 0: is the teacher up? see teacher/failures "
                             "and teacher/dropped)" if n_scored == 0 else
                             "no token was left in the loss (feedback.broken_prefix = 'truncate' cut every sequence: "
                             "raise feedback.break_logprob or feedback.keep_after_break)")
                    raise RunAborted(f"{skips['consecutive']} steps in a row trained on nothing: {cause} (step {step}); "
                                     f"a checkpoint is in {run_dir}/checkpoints; continue with --resume once it is fixed.")
                raise RunAborted(
                    f"{skips['consecutive']} steps in a row were skipped for non-finite teacher logprobs, advantages, "
                    f"losses or gradients (step {step}); a checkpoint is in {run_dir}/checkpoints. Lower train.lr, set "
                    "feedback.clip, or check the teacher's outputs, then continue with --resume."
                )
            halt = stopping()
            if halt or periodic(step):
                checkpoint(step)
            if halt:
                log(f"interrupted: checkpoint written at step {step}; continue with `{resume_command(mode, run_dir)}`")
                interrupted = True
                break

        if not interrupted and not periodic(step) and step > start:
            checkpoint(step)
    if not interrupted and main:
        # written beside, then renamed: an interrupted write leaves no half final/ that loads as the trained model
        final, partial = run_dir / "final", run_dir / "final.partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_plain(student, partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    metrics.close()
    if dp is not None:
        dp.close()
    return RunResult(run_dir=run_dir, steps=step, first_eval=first_eval, last_eval=last_eval, interrupted=interrupted)


def warm_start(cfg: Config, student, teacher_model, tokenizer, stream: PromptStream, params: SamplingParams,
               budget: dict, log, should_stop=lambda: False) -> bool:
    """A short supervised phase on teacher completions, so on-policy samples start out readable; False when
    should_stop() cut it short."""
    t0 = time.time()
    prompts = stream.extra_prompts(cfg.student.warm_start_samples, key=1)
    local = isinstance(teacher_model, torch.nn.Module)
    if local:
        batches = generate(teacher_model, tokenizer, prompts, params, seed=cfg.seed + 1,
                           batch_size=cfg.teacher.batch_size, max_prompt_tokens=cfg.prompts.max_prompt_tokens)
    else:  # a teacher server writes them (plain generation through its API)
        batches = teacher_model.generate(tokenizer, prompts, params, seed=cfg.seed + 1,
                                         batch_size=cfg.teacher.batch_size, max_prompt_tokens=cfg.prompts.max_prompt_tokens)
    data = concat_rollouts(batches, tokenizer.pad_token_id)
    crash_point("warm_start", 0)
    losses = supervised_train(student, data, steps=cfg.student.warm_start_steps, batch_size=cfg.student.warm_start_batch_size,
                              lr=cfg.student.warm_start_lr, seed=cfg.seed, should_stop=should_stop)
    if not losses:  # stopped before its first step
        return False
    rows_a_step = min(cfg.student.warm_start_batch_size, len(prompts))  # supervised_train's mini-batch
    trained_tokens = data.num_tokens * cfg.student.warm_start_steps * rows_a_step / len(prompts)
    budget["teacher_tokens"] += data.num_tokens
    n_teacher = count_params(teacher_model) if local else 0
    budget["flops"] += 2 * n_teacher * data.num_tokens + 6 * count_params(student) * trained_tokens
    log(f"warm start: {data.num_tokens} teacher tokens, {len(losses)} steps, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({time.time() - t0:.0f}s)")
    return len(losses) == cfg.student.warm_start_steps


def prepare_offline(cfg: Config, run_dir: Path, teacher_model, tokenizer, stream: PromptStream, params: SamplingParams,
                    log, should_stop=lambda: False) -> tuple[OfflineData | None, ObjectiveConfig]:
    """The offline baseline's data (generated now, or reused from offline.data) and its imitation objective; no data
    (None) when `should_stop` interrupted the generation."""
    folder = Path(cfg.offline.data) if cfg.offline.data else run_dir / "offline-data"
    # Everything the stored data depends on: which prompts (num_prompts and the prompt settings, not the training
    # batch size), how the teacher wrote them, and the generation batches (rows of a batch share one generator).
    meta = {"teacher": cfg.teacher.model, "teacher_dtype": cfg.teacher.dtype, "temperature": params.temperature,
            "top_p": params.top_p, "max_new_tokens": params.max_new_tokens, "stop": params.stop,
            "topk": cfg.offline.topk, "seed": cfg.seed, "num_prompts": cfg.offline.num_prompts,
            "generate_batch_size": cfg.offline.generate_batch_size,
            "prompts": cfg.prompts.model_dump(mode="json", exclude={"batch_size"})}
    teacher = LocalTeacher(teacher_model, batch_size=cfg.teacher.batch_size, chunk_size=cfg.teacher.chunk_size,
                           topk=cfg.offline.topk, fast=cfg.teacher.forward == "auto")
    made = generate_offline_data(folder, teacher, tokenizer, stream.extra_prompts(cfg.offline.num_prompts, key=2),
                                 params, meta=meta, topk=cfg.offline.topk, seed=cfg.seed,
                                 batch_size=cfg.offline.generate_batch_size,
                                 max_prompt_tokens=cfg.prompts.max_prompt_tokens, log=log, should_stop=should_stop)
    # sequence_kd = cross-entropy on the teacher's text; token_kd = forward KL to its stored top-k.
    name = "sft" if cfg.offline.loss == "sequence_kd" else "topk_kl"
    objective = ObjectiveConfig.model_construct(**{**cfg.objective.model_dump(), "name": name,
                                                   "topk_direction": "forward", "kl_ref_coef": 0.0})
    if made.get("interrupted"):
        return None, objective
    data = OfflineData(folder, tokenizer, temperature=params.temperature, max_prompt_tokens=cfg.prompts.max_prompt_tokens)
    return data, objective


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts of different widths into one batch (prompts left-padded, completions right-padded)."""
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    T = max(r.completion_ids.shape[1] for r in rollouts)

    def pad(t: torch.Tensor, width: int, left: bool, value) -> torch.Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        prompts=[p for r in rollouts for p in r.prompts],
        prompt_ids=torch.cat([pad(r.prompt_ids, P, True, pad_id) for r in rollouts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, True, 0) for r in rollouts]),
        completion_ids=torch.cat([pad(r.completion_ids, T, False, pad_id) for r in rollouts]),
        completion_mask=torch.cat([pad(r.completion_mask, T, False, 0) for r in rollouts]),
        behaviour_logprobs=torch.cat([pad(r.behaviour_logprobs, T, False, 0.0) for r in rollouts]),
        policy_version=torch.cat([r.policy_version for r in rollouts]),
        texts=[t for r in rollouts for t in r.texts],
        finished=torch.cat([r.finished for r in rollouts]),
        temperature=rollouts[0].temperature,
        # guided rollouts: the student's own logprobs (what A_t compares the teacher with) and the teacher's share;
        # a part sampled without guidance has its behaviour logprobs as its own, and no teacher share
        student_logprobs=None if all(r.student_logprobs is None for r in rollouts) else torch.cat(
            [pad(r.policy_logprobs, T, False, 0.0) for r in rollouts]),
        teacher_share=None if all(r.teacher_share is None for r in rollouts) else torch.cat(
            [pad(r.teacher_share if r.teacher_share is not None else torch.zeros_like(r.behaviour_logprobs), T, False, 0.0)
             for r in rollouts]),
    )


def _finite(scores, feedback) -> bool:
    m = feedback.loss_mask.bool()
    return bool(torch.isfinite(scores.token_logprobs[m]).all() and torch.isfinite(feedback.advantages[m]).all())


def _step_metrics(rollout, scores, feedback, correct, times: dict, offline: bool = False,
                  kl_estimable: bool = True) -> dict:
    mask = rollout.completion_mask.bool()
    n = int(mask.sum())
    scored = (rollout.completion_mask * scores.scored_mask).bool()
    checked = [c for c in correct if c is not None]
    out = {
        "rollout/tokens": n,
        "rollout/length_mean": n / max(1, len(rollout.texts)),
        "rollout/finished_frac": float(rollout.finished.float().mean()),
        "rollout/tokens_per_s": n / max(times["rollout_s"], 1e-9),
        "teacher/coverage": scores.coverage if scores.coverage is not None else float(scored.sum()) / max(1, n),
        "teacher/failures": scores.failures,
        "teacher/tokens_per_s": scores.tokens_scored / max(times["teacher_s"], 1e-9),
        "teacher/latency_s": scores.latency_s,
        **feedback.metrics,
        **scores.metrics,
        **{f"time/{k}": v for k, v in times.items()},
    }
    # what the teacher's scores measure: left out of a step where it scored no token, not reported as NaN or 0
    if scored.any():
        out["teacher/logprob_mean"] = float(scores.token_logprobs[scored].mean())
        gap = (rollout.policy_logprobs - scores.token_logprobs)[scored]
        if rollout.student_logprobs is None:
            out["opd/reverse_kl"] = float(gap.mean())
        elif kl_estimable:  # drawn from q (teacher_mix < 1, top-p), not pi_theta: weighted by pi_own / q, self-normalised
            w = (rollout.student_logprobs - rollout.behaviour_logprobs)[scored].double().exp()
            out["opd/reverse_kl"] = float((w * gap).sum() / w.sum())
    if n:
        out["student/logprob_mean"] = float(rollout.policy_logprobs[mask].mean())
    if offline:  # the rows are the teacher's own text: their "behaviour" logprobs are the teacher's, not the student's
        for k in ("rollout/tokens_per_s", "teacher/tokens_per_s", "teacher/latency_s", "student/logprob_mean",
                  "opd/reverse_kl", "opd/advantage_mean", "opd/advantage_pos_frac"):
            out.pop(k, None)
    if rollout.teacher_share is not None and n:  # guided rollouts: tokens that are not the student's own
        out["rollout/teacher_token_frac"] = float(rollout.teacher_share[mask].mean())
    if checked:
        out["rollout/accuracy"] = float(np.mean(checked))
    return out
