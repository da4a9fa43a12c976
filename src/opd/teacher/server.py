"""`opd serve-teacher MODEL`: a local model behind the subset of vLLM's and SGLang's HTTP API that
on-policy distillation needs, so the same client talks to it in tests and to vLLM in production.

- POST /v1/completions  token-id (or text) prompts; `prompt_logprobs: k` (vLLM's shape), `echo` +
                        `logprobs` (OpenAI-legacy shape, `return_tokens_as_token_ids`), plain
                        generation with `max_tokens`, `temperature`, `top_p`, `stop`, `seed`.
                        `temperature` also applies to prompt logprobs (opd's convention; vLLM's
                        are at temperature 1).
                        With `logprobs: k`: each sampled token's id (`return_token_ids`) and logprob
                        under the distribution it was drawn from (logits / T, top-p renormalised), plus
                        that distribution's top-k; with `echo`, after the prompt's entries (as vLLM).
                        Prompt + max_tokens past the model's context (`--max-model-len`, else the
                        config's max_position_embeddings): 400, as vLLM.
                        Every answer carries `policy_version`: the version of the weights that wrote it.
- POST /v1/load_weights `{"path": FOLDER, "version": N}`: load a `save_pretrained` folder of the same
                        architecture into the served model and tag what it writes with version N
                        (opd's rollout backend syncs the student this way; docs/scaling.md says what a
                        vLLM deployment uses instead). Requests in flight finish on the old weights.
- POST /generate        SGLang's native scoring: `input_ids`, `return_logprob`, `logprob_start_len`,
                        `top_logprobs_num`, `sampling_params.max_new_tokens = 0`.
- GET  /health, /v1/models, /metrics (Prometheus).

Dynamic batching: concurrent scoring requests wait in one queue; a worker takes what is there (up
to `max_batch_tokens`, waiting at most `max_wait_ms` for more) and scores it in one forward pass.

Every use of the model (scoring, generation, loading weights) runs on one thread, which the app's shutdown
ends. Why one: torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that has run a
parallel op; once a process holds more of them than it has cores, every team's workers sleep instead of spinning
between ops, and each op pays a futex wake-up. A thread left behind by a stopped app made the rest of its process's
training steps 1.8-10x slower on 2 cores (bench/NOTES.md, session 20); one model thread also keeps a server that
both generates and scores to one team.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from opd.config import ConfigError
from opd.teacher.scorer import GenerateJob, GenerateResult, ScoreJob, ScoreResult, generate_one, score_batch


class DynamicBatcher:
    """Collects concurrent jobs into batches and runs them on the model's thread (`executor`, one worker: the model
    is not re-entrant)."""

    def __init__(self, fn, executor: ThreadPoolExecutor, *, max_batch_tokens: int, max_wait_ms: float, on_batch=None):
        self.fn = fn
        self.executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, jobs: list) -> list:
        if self.task is None:  # started by the first request, inside the server's event loop
            self.start()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        for job, fut in zip(jobs, futures):
            self.queue.put_nowait((job, fut))
        return await asyncio.gather(*futures)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # never dies: a failure fails the batch's requests, not the worker
            batch = [await self.queue.get()]
            tokens = batch[0][0].cost
            deadline = loop.time() + self.max_wait_s
            while tokens < self.max_batch_tokens:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                tokens += item[0].cost
            batch = [(j, f) for j, f in batch if not f.done()]  # the client gave up on these
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [j for j, _ in batch])
            except Exception as e:  # a bad batch fails its requests, not the server
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch:
                self.on_batch(len(batch), tokens, time.perf_counter() - t0)
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


def load_weights_from(model, folder: str) -> None:
    """Copy the weights of a save_pretrained folder into `model` in place (same architecture and shapes)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{folder}: not a save_pretrained model folder (no config.json)")
    new = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).state_dict()
    # Checked before anything is copied: load_state_dict copies every tensor that fits and only then raises on the
    # rest, which would leave a refused load's first layers in the served model.
    own = model.state_dict()
    misfits = sorted(own.keys() ^ new.keys()) + [k for k in own.keys() & new.keys() if own[k].shape != new[k].shape]
    if misfits:
        shown = ", ".join(f"{k} {tuple(own[k].shape) if k in own else '(absent)'} <- "
                          f"{tuple(new[k].shape) if k in new else '(absent)'}" for k in misfits[:4])
        raise ValueError(f"{folder} does not fit the served model: {len(misfits)} tensor(s) differ in name or shape "
                         f"(served <- folder): {shown}{', ...' if len(misfits) > 4 else ''}")
    model.load_state_dict(new, strict=True)


# ---------------------------------------------------------------------------------- request bodies
TokenIds = list[int]


class CompletionRequest(BaseModel):
    model: Optional[str] = None
    prompt: Union[TokenIds, list[TokenIds], str, list[str]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    logprobs: Optional[int] = Field(None, ge=0)
    prompt_logprobs: Optional[int] = Field(None, ge=0)
    echo: bool = False
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=1)
    add_special_tokens: bool = True
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False


class LoadWeightsRequest(BaseModel):
    path: str
    version: int = Field(..., ge=0)


class SglangRequest(BaseModel):
    input_ids: Union[TokenIds, list[TokenIds]]
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = Field(0, ge=0)
    model: Optional[str] = None


# ----------------------------------------------------------------------------------------- the app
def build_app(model, tokenizer, *, name: str = "teacher", max_batch_tokens: int = 8192, max_wait_ms: float = 2.0,
              chunk_size: int = 1024, max_logprobs: int = 20, max_model_len: int | None = None) -> FastAPI:
    registry = CollectorRegistry()
    requests = Counter("opd_teacher_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    scored = Counter("opd_teacher_tokens_scored", "Positions whose logprob was returned", registry=registry)
    generated = Counter("opd_teacher_tokens_generated", "Tokens generated", registry=registry)
    batch_size = Histogram("opd_teacher_batch_sequences", "Sequences per forward pass", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    batch_seconds = Histogram("opd_teacher_batch_seconds", "Forward time per batch", registry=registry)
    latency = Histogram("opd_teacher_request_seconds", "Request latency", ["endpoint"], registry=registry)
    queued = Gauge("opd_teacher_queue_depth", "Scoring jobs waiting", registry=registry)
    # Names of token ids for `decoded_token`; a model may have more rows than its tokenizer has tokens.
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    vocab += [f"<unused{i}>" for i in range(len(vocab), getattr(model.config, "vocab_size", 0) or 0)]
    pad_id = tokenizer.pad_token_id or 0

    def on_batch(n: int, tokens: int, seconds: float) -> None:
        batch_size.observe(n)
        batch_seconds.observe(seconds)

    # Scoring, generation and weight loads all run on the one model thread (below), so no forward pass sees
    # half-loaded weights and a batch's version is the version of the weights it ran on.
    served_version = 0

    def score_jobs(jobs: list[ScoreJob]) -> list[ScoreResult]:
        return score_batch(model, jobs, chunk_size=chunk_size, pad_id=pad_id)

    def generate_jobs(jobs: list[GenerateJob]) -> list[GenerateResult]:
        results = [generate_one(model, tokenizer, j) for j in jobs]
        for r in results:
            r.policy_version = served_version
        return results

    def load_weights_on_model_thread(path: str, version: int) -> None:
        nonlocal served_version
        load_weights_from(model, path)
        served_version = version

    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher")  # see the module docstring
    scorer = DynamicBatcher(score_jobs, model_thread, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                            on_batch=on_batch)
    generator = DynamicBatcher(generate_jobs, model_thread, max_batch_tokens=1, max_wait_ms=0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scorer.stop()
        generator.stop()
        model_thread.shutdown(wait=True)  # the thread ends, and with it its OpenMP team

    app = FastAPI(title=f"opd teacher: {name}", lifespan=lifespan)

    def error(status: int, message: str, endpoint: str) -> JSONResponse:
        requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status)

    # The context the model was trained for; vLLM refuses longer requests (its max_model_len, by default the config's
    # max_position_embeddings), and so does this server, instead of scoring positions the model never saw (RoPE runs
    # past it without a word). `max_model_len` sets it otherwise, as vLLM's --max-model-len.
    max_len = max_model_len or getattr(model.config, "max_position_embeddings", None)

    def too_long(ids_list: list[list[int]], new_tokens: int) -> str | None:
        total = max((len(ids) for ids in ids_list), default=0) + new_tokens
        if max_len and total > max_len:
            return (f"This model's maximum context length is {max_len} tokens. However, you requested {total} "
                    f"tokens ({total - new_tokens} in the prompt, {new_tokens} in the completion). Please reduce "
                    "the length of the prompt or completion.")
        return None

    def token_ids(prompt, add_special_tokens: bool) -> list[list[int]]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(p, str) else list(p)
            if not ids or min(ids) < 0 or max(ids) >= len(vocab):
                raise ValueError(f"prompt token ids must be non-empty and in [0, {len(vocab)})")
            out.append(ids)
        return out

    async def score(ids_list: list[list[int]], start: int | None, topk: int, temperature: float,
                    sample_next: bool = False) -> list[ScoreResult]:
        jobs = [ScoreJob(ids, max(1, start if start is not None else 1), topk, temperature or 1.0, sample_next)
                for ids in ids_list]
        queued.inc(len(jobs))
        try:
            results = await scorer.submit(jobs)
        finally:
            queued.dec(len(jobs))
        scored.inc(sum(len(r.logprobs) for r in results))
        return results

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "policy_version": served_version}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "opd",
                                            "max_model_len": max_len}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/load_weights")
    async def load_weights(req: LoadWeightsRequest):
        t0 = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(
                model_thread, load_weights_on_model_thread, req.path, req.version)
        except (ValueError, OSError) as e:
            return error(400, str(e), "load_weights")
        requests.labels("load_weights", "200").inc()
        return {"policy_version": served_version, "path": req.path, "load_s": time.perf_counter() - t0}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        t0 = time.perf_counter()
        if req.model and req.model != name:  # as vLLM answers: a client naming another model learns it at once
            return error(404, f"The model `{req.model}` does not exist.", "completions")
        try:
            ids_list = token_ids(req.prompt, req.add_special_tokens)
        except ValueError as e:
            return error(400, str(e), "completions")
        if message := too_long(ids_list, req.max_tokens):
            return error(400, message, "completions")
        k_prompt = req.prompt_logprobs if req.prompt_logprobs is not None else (req.logprobs if req.echo else None)
        if k_prompt is not None and k_prompt > max_logprobs:
            return error(400, f"requested {k_prompt} logprobs, at most {max_logprobs}", "completions")
        # vLLM needs max_tokens >= 1 next to prompt_logprobs; that one token comes from the scoring pass (unless
        # echo wants its logprob too: the scoring pass does not keep the sampled token's distribution).
        one_token = k_prompt is not None and req.max_tokens == 1 and not req.stop and not req.echo
        prompt_scores = await score(ids_list, 1, k_prompt, req.temperature, one_token) if k_prompt is not None else None
        gens = [None] * len(ids_list)
        if one_token:
            gens = [GenerateResult([r.next_token], "stop" if r.next_token == tokenizer.eos_token_id else "length")
                    for r in prompt_scores]
        elif req.max_tokens > 0:
            if req.logprobs is not None and not req.echo and req.logprobs > max_logprobs:
                return error(400, f"requested {req.logprobs} logprobs, at most {max_logprobs}", "completions")
            stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
            gens = await generator.submit([GenerateJob(ids, req.max_tokens, req.temperature, req.top_p, stop, req.seed,
                                                       req.logprobs, tuple(req.stop_token_ids or ()))
                                           for ids in ids_list])
            generated.inc(sum(len(g.token_ids) for g in gens))
        choices = []
        for i, ids in enumerate(ids_list):
            ps = prompt_scores[i] if prompt_scores else None
            g = gens[i]
            out_ids = g.token_ids if g else []
            text = tokenizer.decode(out_ids, skip_special_tokens=True)
            choice: dict[str, Any] = {"index": i, "text": text, "logprobs": None,
                                      "finish_reason": g.finish_reason if g else "length", "stop_reason": None}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = [None] + [_vllm_entry(ps, p, ids[p + 1], vocab) for p in range(len(ps.logprobs))]
            if req.echo and req.logprobs is not None:  # the prompt's entries, then the generated tokens' (as vLLM)
                choice["text"] = tokenizer.decode(ids) + text
                choice["logprobs"] = _echo_logprobs(ids, ps, vocab, req.return_tokens_as_token_ids)
                if g is not None and g.logprobs is not None:
                    more = _sampled_logprobs(g, vocab, req.return_tokens_as_token_ids,
                                             start=sum(len(vocab[t]) for t in ids))
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        choice["logprobs"][key] += more[key] or [None] * len(g.token_ids)
            elif g is not None and g.logprobs is not None:
                choice["logprobs"] = _sampled_logprobs(g, vocab, req.return_tokens_as_token_ids)
            choice["policy_version"] = g.policy_version if g and g.policy_version is not None else served_version
            if req.return_token_ids:
                choice["prompt_token_ids"] = ids
                choice["token_ids"] = out_ids
            choices.append(choice)
        n_prompt = sum(len(ids) for ids in ids_list)
        n_gen = sum(len(g.token_ids) for g in gens if g)
        requests.labels("completions", "200").inc()
        latency.labels("completions").observe(time.perf_counter() - t0)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or name, "choices": choices, "policy_version": served_version,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    @app.post("/generate")
    async def generate(req: SglangRequest):
        t0 = time.perf_counter()
        batched = bool(req.input_ids) and isinstance(req.input_ids[0], list)
        try:
            ids_list = token_ids(req.input_ids, False)
        except ValueError as e:
            return error(400, str(e), "generate")
        if req.sampling_params.get("max_new_tokens", 128) != 0:
            return error(400, "this server scores only: set sampling_params.max_new_tokens = 0 "
                              "(use /v1/completions to generate)", "generate")
        if message := too_long(ids_list, 0):
            return error(400, message, "generate")
        if req.return_logprob and (short := [len(ids) for ids in ids_list if req.logprob_start_len >= len(ids)]):
            return error(400, f"logprob_start_len {req.logprob_start_len} is past the end of a sequence of "
                              f"{short[0]} tokens (the last position to score is len(input_ids) - 1)", "generate")
        out = []
        if req.return_logprob:
            temperature = float(req.sampling_params.get("temperature", 1.0)) or 1.0
            starts = [req.logprob_start_len if req.logprob_start_len >= 0 else len(ids) - 1 for ids in ids_list]
            # One start per sequence; the batcher puts them (and other requests) in one forward pass.
            answers = await asyncio.gather(*(score([ids], start, req.top_logprobs_num, temperature)
                                             for ids, start in zip(ids_list, starts)))
            results = [a[0] for a in answers]
        for i, ids in enumerate(ids_list):
            meta: dict[str, Any] = {"id": uuid.uuid4().hex, "prompt_tokens": len(ids), "completion_tokens": 0,
                                    "finish_reason": {"type": "length", "length": 0}}
            if req.return_logprob:
                r, start = results[i], starts[i]
                first = [[None, ids[0], None]] if start == 0 else []
                meta["input_token_logprobs"] = first + [[lp, ids[max(start, 1) + j], None]
                                                        for j, lp in enumerate(r.logprobs)]
                if req.top_logprobs_num:
                    meta["input_top_logprobs"] = ([None] if start == 0 else []) + [
                        [[v, t, None] for v, t in zip(vs, ts)] for vs, ts in zip(r.topk_logprobs, r.topk_ids)]
                meta["output_token_logprobs"] = []
            out.append({"text": "", "output_ids": [], "meta_info": meta})
        requests.labels("generate", "200").inc()
        latency.labels("generate").observe(time.perf_counter() - t0)
        return out if batched else out[0]

    return app


def _vllm_entry(ps: ScoreResult, p: int, token: int, vocab: list[str]) -> dict:
    """vLLM's prompt_logprobs entry: the sent token plus the top-k, each {logprob, rank, decoded_token}."""
    entry = {str(token): {"logprob": ps.logprobs[p], "rank": ps.ranks[p], "decoded_token": vocab[token]}}
    for rank, (t, v) in enumerate(zip(ps.topk_ids[p], ps.topk_logprobs[p]), start=1):
        entry.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": vocab[t]})
    return entry


def _text_offsets(ids: list[int], vocab: list[str], start: int = 0) -> list[int]:
    """Where each token's text starts, from `start`."""
    offsets, at = [], start
    for t in ids:
        offsets.append(at)
        at += len(vocab[t])
    return offsets


def _sampled_logprobs(g: GenerateResult, vocab: list[str], as_ids: bool, start: int = 0) -> dict:
    """OpenAI-legacy logprobs of generated tokens: tokens, token_logprobs, top_logprobs, text_offset (from `start`:
    after an echoed prompt, its text's length)."""
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: vocab[t])  # noqa: E731
    tops = None
    if g.topk_ids is not None:
        tops = [{name(t): v for t, v in zip(ts, vs)} for ts, vs in zip(g.topk_ids, g.topk_logprobs)]
    return {"tokens": [name(t) for t in g.token_ids], "token_logprobs": list(g.logprobs), "top_logprobs": tops,
            "text_offset": _text_offsets(g.token_ids, vocab, start)}


def _echo_logprobs(ids: list[int], ps: ScoreResult, vocab: list[str], as_ids: bool) -> dict:
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: vocab[t])  # noqa: E731
    tops: list[dict | None] = [None]
    for p in range(len(ps.logprobs)):
        top = {name(ids[p + 1]): ps.logprobs[p]}
        for t, v in zip(ps.topk_ids[p], ps.topk_logprobs[p]):
            top.setdefault(name(t), v)
        tops.append(top)
    return {"tokens": [name(t) for t in ids], "token_logprobs": [None] + list(ps.logprobs),
            "top_logprobs": tops, "text_offset": _text_offsets(ids, vocab)}


def serve(model_spec: str, *, host: str, port: int, dtype: str = "float32", device: str = "auto",
          max_batch_tokens: int = 8192, max_wait_ms: float = 2.0, max_model_len: int | None = None,
          log_level: str = "warning", announce=print) -> None:
    import uvicorn

    from opd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, dtype=dtype, device=device).eval()
    app = build_app(model, tokenizer, name=model_spec, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                    max_model_len=max_model_len)
    # The port is taken before anything is announced: a port another server holds is a clear error, not a "serving"
    # line followed by uvicorn's bind error (a client polling /health there would reach the other server).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server holds the port? "
                          "choose another with --port)") from None
    # A stuck request must not keep a stopping server alive forever.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    announce(f"serving {model_spec} ({dtype}) on http://{host}:{port} (/v1/completions, /generate, /health, /metrics)")
    server.run(sockets=[sock])
