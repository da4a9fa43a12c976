"""How fast can one on-policy distillation step at the peer benchmark's settings be here, with torch's kernels?

A floor, measured in this run, for the SmolLM2-135M teacher and its half-depth student at batch 4 with
64 new tokens (the settings of bench/peer_trl.py):

- decoding: every new token needs one pass over all the student's linear weights at batch 4: a few FLOPs per
  byte read, so it is bound by how fast the matmul kernels stream the weights, not by the FLOP limit. The floor
  per token is the measured time of exactly those matmuls ([4, in] @ W^T for every nn.Linear, the LM head
  included) with this torch build's kernels, nothing else (no attention, norms, sampling); times 64 tokens.
  The streaming read rate of the memory (a sum over 1 GiB) is measured too: weights / that rate is the bound
  a decoder with hand-written batch-4 kernels (or 8-bit weights) could approach;
- the student's prompt prefill, the teacher's scoring forward and the update (forward + backward) at the
  matmul limit measured in this run (2 x params x tokens, resp. 6 x params x tokens);
- one more row, for CPUs without bf16 instructions (where torch's bf16 and int8-on-bf16 kernels are emulated):
  int8 weights read at the memory's rate for decoding, fp32 at the limit for the rest: the floor of
  rollout.dtype = "int8" with an fp32 teacher and update, for any kernel.

The floor step's student tokens/s bounds any implementation built on torch's matmuls here; divided by TRL
GKDTrainer's measured student tokens/s (bench/results/peer_trl.json, another run on this machine: its date
is recorded) it bounds the ratio opd can reach over TRL at equal settings.

    python bench/step_floor.py          # writes bench/results/step_floor.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from common import ROOT, RESULTS, forward_flops, measure_matmul_limit, threads, train_flops, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import torch  # noqa: E402

from opd.config import load_config  # noqa: E402
from opd.models import count_params, load_model, load_student, load_tokenizer  # noqa: E402
from opd.prompts import PromptStream, chat_renderer  # noqa: E402

CONFIG = ROOT / "configs/smollm2-halfdepth.toml"
BATCH, NEW_TOKENS = 4, 64


def read_bandwidth_gb_s(gib: float = 1.0, reps: int = 5) -> float:
    """Best streaming read rate: summing a tensor larger than every cache touches each byte once."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def decode_floor_s(model, dtype: torch.dtype | str, reps: int = 20) -> float:
    """Best time of one decode step's weight matmuls at batch BATCH: [B, in] @ W^T for every linear layer.
    dtype "int8": torch's weight-only int8 kernel on bf16 activations (what rollout.dtype = "int8" decodes with)."""
    from opd.llama import int8_linear, quantize_int8

    linears = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if dtype == "int8":
        weights = [quantize_int8(w.to(torch.bfloat16)) for w in linears]
        inputs = [torch.randn(BATCH, w.shape[1], dtype=torch.bfloat16) for w in linears]
        matmul = int8_linear
    else:
        weights = [w.to(dtype) for w in linears]
        inputs = [torch.randn(BATCH, w.shape[1], dtype=dtype) for w in weights]
        matmul = lambda x, w: x @ w.T  # noqa: E731
    with torch.inference_mode():
        for x, w in zip(inputs, weights):  # warm-up
            matmul(x, w)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for x, w in zip(inputs, weights):
                matmul(x, w)
            best = min(best, time.perf_counter() - t0)
    return best


READ_RATE_ROW = "int8 decode at the memory read rate, float32 prefill, teacher and update"


def main() -> None:
    torch.set_num_threads(threads())
    limit = {d: measure_matmul_limit(d)["flops_per_s"] for d in ("float32", "bfloat16")}
    bandwidth = read_bandwidth_gb_s()
    cfg = load_config(CONFIG, ["student.warm_start_steps=0"])
    tok = load_tokenizer(cfg.student.model)
    student = load_student(cfg.student, cfg.seed)
    student_params = count_params(student)
    teacher_params = count_params(load_model(cfg.teacher.model, device="cpu"))
    linear_params = sum(m.weight.numel() for m in student.modules() if isinstance(m, torch.nn.Linear))
    stream = PromptStream(cfg.prompts, 0, chat_renderer(tok), count_tokens=lambda t: len(tok(t)["input_ids"]))
    prompts = stream.extra_prompts(16, key=0)
    prompt_len = sum(len(tok(p.text)["input_ids"]) for p in prompts) / len(prompts)
    tokens = BATCH * (prompt_len + NEW_TOKENS)  # scored by the teacher and trained on, per step

    def floor_row(decode: float, dt_rest: str) -> dict:
        """A step of `decode` seconds of decoding, the prefill, teacher and update at the dt_rest matmul limit."""
        prefill = forward_flops(student_params, BATCH * prompt_len) / limit[dt_rest]
        teacher = forward_flops(teacher_params, tokens) / limit[dt_rest]
        update = train_flops(student_params, tokens) / limit[dt_rest]
        step = decode + prefill + teacher + update
        return {"decode_s": round(decode, 3), "prefill_s": round(prefill, 3), "teacher_s": round(teacher, 3),
                "update_s": round(update, 3), "step_s": round(step, 3),
                "student_tokens_per_s": round(BATCH * NEW_TOKENS / step, 1), "decode_share": round(decode / step, 3)}

    rows = {}
    for name, dt_decode, dt_rest in (("float32", torch.float32, "float32"),
                                     ("bfloat16 (decode, teacher and update)", torch.bfloat16, "bfloat16"),
                                     ("int8 decode, bfloat16 teacher and update", "int8", "bfloat16")):
        rows[name] = floor_row(NEW_TOKENS * decode_floor_s(student, dt_decode), dt_rest)
        print(name, rows[name])
    # Without bf16 instructions (bf16 products emulated, torch's int8 kernel on bf16 activations with them) the
    # rows above say little; the floor there is int8 decoding at the memory's read rate (what opd's own int8
    # kernels approach) and everything else in fp32 at the limit: rollout.dtype = "int8" with fp32 otherwise.
    rows[READ_RATE_ROW] = floor_row(NEW_TOKENS * linear_params / (bandwidth * 1e9), "float32")
    print(READ_RATE_ROW, rows[READ_RATE_ROW])

    peer_file = RESULTS / "peer_trl.json"
    peer = json.loads(peer_file.read_text()) if peer_file.is_file() else {}
    trl = peer.get("trl_student_tokens_per_s")
    bounds = {k: round(r["student_tokens_per_s"] / trl, 2) for k, r in rows.items()} if trl else {}
    bytes_per_step = {"float32": linear_params * 4, "bfloat16": linear_params * 2, "int8": linear_params}
    write_result("step_floor", {
        "what": "the fastest a loop step (batch 4, 64 new tokens, SmolLM2-135M teacher, half-depth student) can be "
                "here with torch's kernels: decode = the student's linear-weight matmuls at batch 4 per token "
                "(measured), prefill/teacher/update = FLOPs at the matmul limit (measured in this run); the ratio over "
                "TRL GKDTrainer that this floor allows; and the memory's streaming read rate, the bound for "
                "hand-written decode kernels (row '" + READ_RATE_ROW + "': that bound for any kernel, fp32 "
                "otherwise, the floor of rollout.dtype = 'int8' on CPUs without bf16 instructions)",
        "matmul_limit_flops_per_s": limit,
        "read_bandwidth_gb_s": round(bandwidth, 1),
        "decode_bytes_per_token": bytes_per_step,
        "decode_floor_from_bandwidth_s": {k: round(v / (bandwidth * 1e9), 4) for k, v in bytes_per_step.items()},
        "student_params": student_params, "teacher_params": teacher_params, "student_linear_params": linear_params,
        "mean_prompt_tokens": round(prompt_len, 1),
        "floor": rows,
        "trl_student_tokens_per_s": trl,
        "trl_measured": {"file": "bench/results/peer_trl.json", "date": peer.get("date")},
        "max_ratio_over_trl": bounds,
    }, headline=[{"figure": f"floor ({'any kernel' if k == READ_RATE_ROW else 'torch kernels'}): max opd / TRL GKD "
                            f"ratio at batch 4, 64 new ({k})", "value": v, "unit": "x"} for k, v in bounds.items()]
             + [{"figure": "floor: memory read rate (decode bound for hand-written kernels)", "value": round(bandwidth, 1),
                 "unit": "GB/s"}])


if __name__ == "__main__":
    main()
