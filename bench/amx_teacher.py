"""The bf16 teacher forward on opd's AMX kernel against oneDNN's path, A/B in one process (not in `make bench`).

LocalTeacher.score of SmolLM2-135M-Instruct in bfloat16 on synthetic rollouts (as bench/teacher_scoring.py), with
OPD_AMX_GEMM=off (oneDNN's products, separate SiLU x up / RoPE / residual-add passes, the LM head's logits and the
vocabulary pass) and the default (csrc/gemm_amx.c: products with their epilogues, the LM head straight into the token
terms), the two taking turns round by round; each round also times every step of the forward in place (the
functions opd.llama and opd.teacher.local call, wrapped) and measures the bf16 matmul limit (bench/common.py: the
best of torch's kernels and opd's). Needs a CPU with AMX.

    python bench/amx_teacher.py                 # 8x256 and 8x512, writes bench/results/amx_teacher.json
    python bench/amx_teacher.py 16x256
    BENCH_COLD=1 python bench/amx_teacher.py    # each call after a pass over 1 GiB: weights from DRAM
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, forward_flops, measure_matmul_limit, threads, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import opd.teacher.local as local  # noqa: E402
from opd import cpu_kernels, llama  # noqa: E402
from opd.models import count_params, load_model  # noqa: E402
from opd.teacher import LocalTeacher  # noqa: E402
from teacher_scoring import MODEL, synthetic_rollout  # noqa: E402

ROUNDS = 3
# Between the calls of a real run (and of bench/teacher_scoring.py, where vLLM scores in between) the rollout and the
# update pass over other memory, so the teacher's weights come from DRAM, not from L3: with BENCH_COLD=1 each timed
# call follows a pass over a buffer larger than the L3 (not timed).
COLD_BYTES = 1 << 30


def evict_caches(buffer: torch.Tensor | None) -> None:
    if buffer is not None:
        buffer.add_(1)


def set_path(model, setting: str) -> None:
    """OPD_AMX_GEMM for the next forwards, with the model's packed and fused weights dropped (packed again)."""
    os.environ["OPD_AMX_GEMM"] = setting
    cpu_kernels._gemm_library.cache_clear()
    for cache in (llama._PACKED, llama._HEAD, llama._FUSED):
        cache.pop(model, None)


class StepTimes:
    """Wall time per step of the forward, by wrapping the module-level functions the forward calls."""

    STEPS = [(llama, "_product"), (cpu_kernels, "amx_linear"), (llama, "add_rms_norm_"), (llama, "rope_"),
             (llama, "rms_norm"), (llama, "silu_mul"), (cpu_kernels, "causal_attention"),
             (cpu_kernels, "amx_mlp"), (cpu_kernels, "amx_layers"), (cpu_kernels, "amx_head_terms"),
             (local, "per_position")]

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        for module, name in self.STEPS:
            self._wrap(module, name)

    def _wrap(self, module, name):
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            if name == "_product" and isinstance(args[1], cpu_kernels.AmxWeight):
                return fn(*args, **kwargs)  # timed as amx_linear, which it calls
            label = name
            if name in ("_product", "amx_linear"):  # by weight shape and epilogue
                w = args[1]
                label = f"product {tuple(w.shape)}" + (" +rope" if kwargs.get("rope") is not None else "") \
                    + (" +add" if kwargs.get("add_to") is not None else "") \
                    + (" +silu" if getattr(w, "silu_mul", False) else "")
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[label] += time.perf_counter() - t0
            return out

        setattr(module, name, timed)


def main() -> None:
    torch.set_num_threads(threads())
    if not cpu_kernels.gemm_amx():
        sys.exit("this CPU has no AMX tile unit (or Linux refused its state): nothing to compare")
    shapes = [tuple(int(v) for v in s.split("x")) for s in (sys.argv[1:] or ["8x256", "8x512"])]
    model = load_model(MODEL, dtype="bfloat16", device="cpu").eval()
    params = count_params(model)
    teacher = LocalTeacher(model, batch_size=64)
    steps = StepTimes()
    cold = os.environ.get("BENCH_COLD", "0") == "1"
    buffer = torch.zeros(COLD_BYTES // 4) if cold else None
    rows = []
    for batch, length in shapes:
        roll = synthetic_rollout(batch, length, model.config.vocab_size, seed=batch * 1000 + length)
        scores = {}
        for rnd in range(ROUNDS):
            limit = max(measure_matmul_limit("bfloat16", size=s, min_seconds=0.5)["flops_per_s"] for s in (512, 2048))
            for setting in ("off", "auto"):
                set_path(model, setting)
                for _ in range(2):  # seen twice: packed
                    teacher.score(roll)
                best, by_step = float("inf"), {}
                for _ in range(3):
                    evict_caches(buffer)
                    steps.seconds.clear()
                    t0 = time.perf_counter()
                    scores[setting] = teacher.score(roll)
                    took = time.perf_counter() - t0
                    if took < best:
                        best, by_step = took, {k: round(v * 1e3, 1) for k, v in steps.seconds.items()}
                rows.append({"batch": batch, "length": length, "round": rnd, "path": "oneDNN" if setting == "off" else "opd AMX",
                             "seconds": round(best, 4), "tokens_per_s": round(batch * length / best, 1),
                             "matmul_limit_flops_per_s": round(limit),
                             "fraction_of_matmul_limit": round(forward_flops(params, batch * length) / best / limit, 4),
                             "steps_ms": dict(sorted(by_step.items(), key=lambda kv: -kv[1]))})
                print(rows[-1], flush=True)
        diff = (scores["auto"].token_logprobs - scores["off"].token_logprobs).abs()
        rows.append({"batch": batch, "length": length, "logprob_abs_diff_mean": float(diff.mean()),
                     "logprob_abs_diff_max": float(diff.max()),
                     "entropy_abs_diff_max": float((scores["auto"].entropy - scores["off"].entropy).abs().max())})
        print(rows[-1], flush=True)

    def best_of(path, batch, length):
        return min((r for r in rows if r.get("path") == path and (r["batch"], r["length"]) == (batch, length)),
                   key=lambda r: r["seconds"])

    headline = []
    for batch, length in shapes:
        a, b = best_of("oneDNN", batch, length), best_of("opd AMX", batch, length)
        headline.append({"figure": f"bf16 teacher scoring {batch}x{length}, opd AMX kernel / oneDNN path",
                         "value": round(a["seconds"] / b["seconds"], 2),
                         "unit": f"x ({b['tokens_per_s']:.0f} against {a['tokens_per_s']:.0f} tok/s; "
                                 f"{b['fraction_of_matmul_limit']:.0%} against {a['fraction_of_matmul_limit']:.0%} "
                                 "of the bf16 matmul limit)"})
    write_result("amx_teacher", {
        "what": "LocalTeacher.score of SmolLM2-135M-Instruct in bf16, OPD_AMX_GEMM=off (oneDNN) and the default (opd's "
                "AMX kernel) taking turns; best of 3 per round; steps_ms: the best call's time per step of the forward"
                + ("; each call after a pass over 1 GiB (weights from DRAM)" if cold else ""),
        "cold": cold,
        "model": MODEL, "params": params, "rows": rows,
    }, headline=headline)


if __name__ == "__main__":
    main()
