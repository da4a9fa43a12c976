"""Teacher scoring throughput: prompt tokens/s of the local teacher (transformers, in process),
`opd serve-teacher` (over HTTP, dynamic batching) and, when its URL is given, a vLLM server — for
several batch sizes, lengths and concurrency levels, in float32 and bfloat16, each with its largest
logprob error against float32 transformers.

    python bench/teacher_throughput.py                       # built-in teacher, writes bench/results/teacher_throughput.json
    python bench/teacher_throughput.py --model smol-shaped   # a random-weight model of SmolLM2-135M's shape
    python bench/teacher_throughput.py --vllm-url http://127.0.0.1:8011 --vllm-dtype float32

Every sequence is one request (as RemoteTeacher sends them), `prompt_logprobs: 0`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core machine: one thread each
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from opd.models import load_model  # noqa: E402
from opd.teacher.protocols import ScoreRequest  # noqa: E402
from opd.teacher.remote import RemoteSettings, RemoteTeacher  # noqa: E402

SHAPES = [(8, 64), (8, 256), (32, 64)]  # (sequences, tokens each)
CONCURRENCY = [1, 8]


def smol_shaped(folder: Path) -> str:
    """A LlamaForCausalLM with SmolLM2-135M's shape and random weights, with opd's char tokenizer
    (kept in runs/smol-shaped so a vLLM server can load the same folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return str(folder)

    from opd.models import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def sequences(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, min(vocab, 99), (length - 1,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def reference_logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """float32 transformers, one sequence at a time: log p(token_p | tokens_<p) for p >= 1."""
    out = []
    for s in seqs:
        logits = model(input_ids=torch.tensor([s])).logits[0, :-1].float()
        out.append(F.log_softmax(logits, -1).gather(1, torch.tensor(s[1:])[:, None]).squeeze(1))
    return out


@torch.no_grad()
def local_scores(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The local path as LocalTeacher runs it: one batched forward (equal lengths: no padding)."""
    ids = torch.tensor(seqs)
    logits = model(input_ids=ids).logits[:, :-1].float()
    lp = F.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return list(lp)


def remote_scores(url: str, seqs: list[list[int]], concurrency: int, model_name: str = "") -> list[torch.Tensor]:
    teacher = RemoteTeacher(RemoteSettings(url, api="vllm", served_model=model_name, max_in_flight=concurrency,
                                           timeout_s=600, retries=2, backoff_s=0.1, breaker_threshold=0))
    calls = []
    for s in seqs:
        req = ScoreRequest(s, 1, 0, 1.0, model_name)
        path, body = teacher.build_request(req)
        calls.append((path, body, lambda b, req=req: teacher.parse(b, req)))
    from collections import Counter

    stats = Counter()
    answers = teacher.requests.run(calls, stats, [])
    if stats["dropped"]:
        raise RuntimeError(f"{stats['dropped']} sequences got no answer from {url}: {dict(stats)}")
    if stats["failures"]:
        print(f"note: {dict(stats)} against {url} (retried)", file=sys.stderr)
    return [torch.tensor(a.logprobs) for a in answers]


def timed(fn, repeats: int = 3):
    fn()  # warm-up
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def max_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((g.float() - r).abs().max()) for g, r in zip(got, ref))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, dtype: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli", "serve-teacher", model, "--port", str(port), "--dtype", dtype],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve-teacher did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:arith-teacher", help="a model spec, or `smol-shaped`")
    ap.add_argument("--vllm-url", default="", help="a running vLLM server to measure too")
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--vllm-model-name", default="")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default=",".join(f"{n}x{L}" for n, L in SHAPES))
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="default bench/results/teacher_throughput[-MODEL].json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    spec = smol_shaped(ROOT / "runs/smol-shaped") if args.model == "smol-shaped" else args.model
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    fp32 = load_model(spec, dtype="float32", device="cpu").eval()
    vocab = fp32.config.vocab_size
    rows = []

    def record(**row):
        rows.append(row)
        print(json.dumps(row))

    for dtype in args.dtypes.split(","):
        model = fp32 if dtype == "float32" else load_model(spec, dtype=dtype, device="cpu").eval()
        proc, url = start_server(spec, dtype)
        try:
            for n, length in shapes:
                seqs = sequences(n, length, vocab, seed=n * 1000 + length)
                ref = reference_logprobs(fp32, seqs)
                tokens = n * (length - 1)
                secs, got = timed(lambda: local_scores(model, seqs), args.repeats)
                record(backend="local", dtype=dtype, sequences=n, length=length, concurrency=None,
                       tokens_per_s=tokens / secs, max_abs_error=max_error(got, ref))
                for c in levels:
                    secs, got = timed(lambda: remote_scores(url, seqs, c), args.repeats)
                    record(backend="opd serve-teacher", dtype=dtype, sequences=n, length=length, concurrency=c,
                           tokens_per_s=tokens / secs, max_abs_error=max_error(got, ref))
                if args.vllm_url and dtype == args.vllm_dtype:
                    for c in levels:
                        secs, got = timed(lambda: remote_scores(args.vllm_url, seqs, c, args.vllm_model_name), args.repeats)
                        record(backend="vllm-cpu", dtype=dtype, sequences=n, length=length, concurrency=c,
                               tokens_per_s=tokens / secs, max_abs_error=max_error(got, ref))
        finally:
            proc.terminate()
            proc.wait()
    result = {
        "what": f"teacher prompt-scoring throughput (prompt tokens/s, best of {args.repeats}) and max |logprob - fp32 transformers|",
        "command": "python " + " ".join(sys.argv),
        "model": args.model,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_avg_at_end": os.getloadavg()},
        "rows": rows,
    }
    suffix = "" if args.model == "builtin:arith-teacher" else "-" + Path(args.model).name.replace(":", "-")
    out = Path(args.out or ROOT / f"bench/results/teacher_throughput{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
