"""A fault-injecting HTTP proxy in front of a teacher server, run in a thread of the test process.

`schedule(n, body) -> kind | None` decides, per request, which fault to inject:
  "http500"     answer 500 without asking upstream
  "hang"        answer nothing for `hang_s` (the client times out)
  "malformed"   200 with a body that is not JSON
  "cut_utf8"    200 with a body cut inside a multi-byte UTF-8 character (not JSON, and not even UTF-8)
  "wrong_count" 200 with the upstream answer minus its last position (a partial answer)
Requests that reach a dead upstream are answered 502 ("upstream"). A request whose client hung up before its
answer was ready (the client timed out on a slow upstream) is counted as "client_gone", whatever upstream said:
the client saw a timeout. Every outcome is counted, so a test can check that the client's metrics show exactly
the faults that happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from teacher_servers import AppThread


def drop_last_position(answer: dict) -> dict:
    """Remove the last scored position from any of the three logprob shapes."""
    for choice in answer.get("choices", []):
        if choice.get("prompt_logprobs"):
            choice["prompt_logprobs"].pop()
        if choice.get("logprobs"):
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                choice["logprobs"][key].pop()
    meta = answer.get("meta_info")
    if meta:
        meta["input_token_logprobs"].pop()
        if meta.get("input_top_logprobs"):
            meta["input_top_logprobs"].pop()
    return answer


class FaultProxy:
    def __init__(self, upstream: str, schedule=lambda n, body: None, hang_s: float = 3.0):
        self.upstream, self.schedule, self.hang_s = upstream, schedule, hang_s
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.on_request = None  # optional hook(n) run before each request (e.g. to kill the server)
        self.client: httpx.AsyncClient | None = None  # to upstream, made when the app starts
        self.served = AppThread(self._build())

    @property
    def url(self) -> str:
        return self.served.url

    def _build(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            # One client for the proxy's life: making one per request (an SSL context each, 25-65 ms here) pushed
            # answers past a client's timeout on a loaded host. No keep-alive, so that each request still meets
            # upstream on a fresh connection (a pooled one left over from before a server's restart would fail).
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                self.client = client
                yield

        app = FastAPI(lifespan=lifespan)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request):
            raw = await request.body()
            body = json.loads(raw) if raw else None
            with self.lock:
                n = self.counts["requests"]
                self.counts["requests"] += 1
            if self.on_request:
                await asyncio.get_running_loop().run_in_executor(None, self.on_request, n)
            kind = self.schedule(n, body) if request.method == "POST" else None
            if kind in ("http500", "hang", "malformed", "cut_utf8"):  # these never reach upstream
                self.counts[kind] += 1
            if kind == "http500":
                return JSONResponse({"error": "injected"}, 500)
            if kind == "hang":
                await asyncio.sleep(self.hang_s)
                return JSONResponse({"error": "too late"}, 504)
            if kind == "malformed":
                return Response(b'{"choices": [', media_type="application/json")
            if kind == "cut_utf8":
                return Response('{"choices": [{"text": "Ġ'.encode()[:-1], media_type="application/json")
            try:
                resp = await self.client.request(request.method, f"{self.upstream}/{path}", content=raw,
                                                 headers={"content-type": "application/json"})
            except httpx.HTTPError:
                resp = None
            # Under load a request can wait on upstream past the client's timeout: the client counted a timeout
            # and retried, so counting this one as "upstream" or "ok" would count the same attempt twice.
            if await request.is_disconnected():
                self.counts["client_gone"] += 1
                return Response(status_code=499)
            if resp is None:
                self.counts["upstream"] += 1
                return JSONResponse({"error": "upstream down"}, 502)
            if resp.status_code != 200:
                self.counts["upstream"] += 1
                return Response(resp.content, resp.status_code)
            if kind == "wrong_count":
                self.counts[kind] += 1
                return JSONResponse(drop_last_position(resp.json()))
            self.counts["ok"] += 1
            return Response(resp.content, media_type="application/json")

        return app

    def start(self) -> "FaultProxy":
        self.served.start()
        return self

    def stop(self) -> None:
        self.served.stop()

    @property
    def faults(self) -> Counter:
        return Counter({k: v for k, v in self.counts.items() if k not in ("requests", "ok")})
