"""Stage 2 on an inference engine: an OpenAI-compatible server samples the student's completions
(`rollout.backend = "server"`; vLLM in production, `opd serve-teacher MODEL` in tests).

Each prompt is sent as the student's own token ids (`/v1/completions`, `logprobs: 0`,
`return_token_ids`), so nothing is re-tokenised; the answer's token ids and their logprobs become the
Rollout exactly as the local sampler (opd.rollout.sampler) builds it: behaviour logprobs of the
distribution sampled from (logits / T, top-p renormalised), the end token inside the completion,
padding after it with mask 0.

Weights: after every update `publish` saves the student (save_pretrained, merged LoRA) to
`weights_dir/vN` and asks the server to load it, tagged with version N (`POST /v1/load_weights`;
docs/scaling.md says what a vLLM deployment uses). Every sample carries the version of the weights
that wrote it, as the server reports it, so a rollout sampled before a sync landed shows up as
policy lag in freshness/*, not as fresh.

Requests go through the teacher client's resilient machinery (timeouts, retries with backoff and
jitter, circuit breaker: opd.teacher.remote.ResilientRequests). A sequence that still fails after its
retries stops the run with an error: a batch with holes would silently change what is trained on.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from opd.config import RolloutConfig
from opd.rollout.sampler import SamplingParams, encode_prompts, end_token_ids
from opd.teacher.protocols import BadResponse
from opd.teacher.remote import RemoteSettings, ResilientRequests, request_metrics
from opd.types import Prompt, Rollout

LOAD_WEIGHTS_PATH = "/v1/load_weights"


def server_settings(r: RolloutConfig) -> RemoteSettings:
    return RemoteSettings(url=r.url.rstrip("/"), served_model=r.served_model, timeout_s=r.timeout_s,
                          max_in_flight=r.max_in_flight, retries=r.retries)


class ServerRollout:
    """The student sampled by an inference server; its weights follow the trainer's through `publish`."""

    def __init__(self, settings: RemoteSettings, tokenizer, *, weights_dir: Path, seed: int = 0,
                 max_prompt_tokens: int = 256):
        self.settings = settings
        self.tokenizer = tokenizer
        self.weights_dir = Path(weights_dir)
        self.seed = seed
        self.max_prompt_tokens = max_prompt_tokens
        self.requests = ResilientRequests(settings, seed=seed)
        self.end_ids = end_token_ids(tokenizer)
        self.synced_version: int | None = None  # the version the server last confirmed loading
        self.calls = 0  # for calls that name no step
        self._metrics: dict[str, float] = {}

    # ---------------------------------------------------------------------------------- sampling
    def sample(self, prompts: list[Prompt], params: SamplingParams, version: int, step: int | None = None) -> Rollout:
        """`version` is the trainer's current version; each row's policy_version is what the server reports.
        `step`: the training step the rollout is for."""
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        # Per-sequence seeds: reproducible, and different at every step. Keyed on the step, not on a count of calls,
        # so that a resumed run (whose count would start again at 0) samples what an uninterrupted one does.
        key = step if step is not None else 2**40 + self.calls
        seeds = np.random.default_rng([self.seed, 0x5A3B, version, key]).integers(2**31, size=len(prompts))
        self.calls += 1
        calls = []
        for i in range(len(prompts)):
            body = {"prompt": prompt_ids[i][prompt_mask[i].bool()].tolist(), "max_tokens": params.max_new_tokens,
                    "temperature": params.temperature, "top_p": params.top_p, "stop": list(params.stop),
                    "stop_token_ids": self.end_ids, "seed": int(seeds[i]), "logprobs": 0,
                    "return_token_ids": True, "return_tokens_as_token_ids": True, "add_special_tokens": False}
            if self.settings.served_model:
                body["model"] = self.settings.served_model
            calls.append(("/v1/completions", body, parse_sampled))
        stats, latencies = Counter(), []
        answers = self.requests.run(calls, stats, latencies)
        failed = sum(a is None for a in answers)
        if failed:
            raise RuntimeError(f"the rollout server at {self.settings.url} failed {failed} of {len(answers)} "
                               f"generation requests after {self.settings.retries} retries each "
                               f"({dict(stats)}); is it up? (rollout.url, rollout.timeout_s, rollout.retries)")
        rollout = self._assemble(prompts, prompt_ids, prompt_mask, answers, params, default_version=version)
        lag = version - rollout.policy_version
        self._metrics = {**{k.replace("teacher/", "rollout/server_"): v for k, v in
                            request_metrics(stats, latencies, len(calls)).items()},
                         "rollout/server_s": time.perf_counter() - t0,
                         "rollout/server_version_lag_max": float(lag.max()) if len(lag) else 0.0}
        return rollout

    def _assemble(self, prompts, prompt_ids, prompt_mask, answers: list[dict], params: SamplingParams,
                  default_version: int) -> Rollout:
        rows, lps, finished, versions = [], [], [], []
        for a in answers:
            ids, lp = list(a["token_ids"]), list(a["logprobs"])
            # The end token belongs to the completion; anything a server returned after it does not.
            cut = next((k + 1 for k, t in enumerate(ids) if t in self.end_ids), len(ids))
            ids, lp = ids[: min(cut, params.max_new_tokens)], lp[: min(cut, params.max_new_tokens)]
            rows.append(ids)
            lps.append(lp)
            finished.append(a["finished"] or cut < len(a["token_ids"]) or (bool(ids) and ids[-1] in self.end_ids))
            # A server that does not report versions samples with what was last synced to it.
            v = a["policy_version"]
            versions.append(v if v is not None else (self.synced_version if self.synced_version is not None
                                                     else default_version))
        B, T = len(rows), max(1, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id
        completion_ids = torch.full((B, T), pad, dtype=torch.long)
        completion_mask = torch.zeros((B, T), dtype=torch.long)
        behaviour = torch.zeros((B, T), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(rows, lps)):
            completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            completion_mask[i, : len(r)] = 1
            behaviour[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        texts = self.tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad),
                                            skip_special_tokens=True)
        return Rollout(prompts=list(prompts), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=completion_ids, completion_mask=completion_mask, behaviour_logprobs=behaviour,
                       policy_version=torch.tensor(versions, dtype=torch.long), texts=texts,
                       finished=torch.tensor(finished, dtype=torch.bool), temperature=params.temperature)

    # ---------------------------------------------------------------------------------- weights
    def publish(self, model, version: int) -> None:
        """Save the student as version `version` and have the server load it (no-op when already there)."""
        if version == self.synced_version:
            return
        from opd.lora import save_plain

        t0 = time.perf_counter()
        folder = (self.weights_dir / f"v{version}").resolve()
        save_plain(model, folder)
        stats = Counter()
        answer, = self.requests.run([(LOAD_WEIGHTS_PATH, {"path": str(folder), "version": version}, parse_loaded)],
                                    stats, [])
        if answer is None or answer != version:
            raise RuntimeError(f"the rollout server at {self.settings.url} did not load the student's weights "
                               f"(version {version}, {folder}) after {self.settings.retries} retries ({dict(stats)}); "
                               "it must be able to read rollout.weights_dir and serve the student's architecture")
        for old in self.weights_dir.glob("v*"):  # the server holds the weights now; keep only the newest folder
            if old.is_dir() and old.resolve() != folder:
                shutil.rmtree(old, ignore_errors=True)
        self.synced_version = version
        self._metrics["rollout/weight_sync_s"] = time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)


# ------------------------------------------------------------------------------------------ parsing
def parse_sampled(body) -> dict:
    """choices[0] of a /v1/completions answer -> token ids, their logprobs, finished, policy_version."""
    choice = body["choices"][0] if isinstance(body, dict) and body.get("choices") else None
    if not isinstance(choice, dict):
        raise BadResponse("malformed", "generation answer without choices[0]")
    logprobs = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None and isinstance(logprobs.get("tokens"), list):  # servers without return_token_ids
        try:
            ids = [int(str(t).removeprefix("token_id:")) for t in logprobs["tokens"]]
        except ValueError:
            raise BadResponse("malformed", "logprobs.tokens are not `token_id:N` (return_tokens_as_token_ids)") from None
    lps = logprobs.get("token_logprobs")
    if not isinstance(ids, list) or not isinstance(lps, list):
        raise BadResponse("malformed", "generation answer without token ids and logprobs.token_logprobs")
    if len(ids) != len(lps):
        raise BadResponse("mismatch", f"{len(ids)} token ids but {len(lps)} logprobs")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BadResponse("malformed", "token ids must be integers")
    if not all(isinstance(v, (int, float)) and v == v and v <= 1e-4 and v != float("-inf") for v in lps):
        raise BadResponse("malformed", "a sampled token's logprob is missing, non-finite or positive")
    version = choice.get("policy_version", body.get("policy_version"))
    return {"token_ids": ids, "logprobs": [float(v) for v in lps], "finished": choice.get("finish_reason") == "stop",
            "policy_version": int(version) if version is not None else None}


def parse_loaded(body) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("policy_version"), int):
        raise BadResponse("malformed", f"load_weights answer without policy_version: {json.dumps(body)[:200]}")
    return body["policy_version"]
