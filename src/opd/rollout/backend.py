"""Stage 2 on an inference server, in the loop's backend interface (opd.engine.pipeline.RolloutBackend):

    backend.rollout(prompts, step) -> Rollout        # behaviour logprobs + the version that sampled each row
    backend.load_weights(state, version)             # after an update: the server loads the new weights
    backend.rng_state()                              # None: the server's sampling state is not ours to save
    backend.metrics()                                # per-step numbers for the metrics row

`rollout.backend = "local"` uses opd.engine.LocalRollout; `"server"` wraps opd.rollout.remote.ServerRollout here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from opd.config import Config
from opd.rollout.sampler import SamplingParams
from opd.types import Prompt, Rollout


class ServerBackend:
    """The student sampled by an OpenAI-compatible server; weights are saved and loaded there after each update.

    A synchronous loop hands it the trainer's own student (load_weights(None, v) publishes it as it is); a
    pipelined producer gets a private copy that each published state is loaded into first, so saving never
    races the trainer."""

    def __init__(self, server, student, params: SamplingParams, *, version: int, private_copy: bool):
        self.server, self.params, self.version = server, params, version
        self.model = copy.deepcopy(student) if private_copy else student
        self.server.publish(self.model, version)  # the warm-started (or resumed) student

    def rollout(self, prompts: list[Prompt], step: int) -> Rollout:
        return self.server.sample(prompts, self.params, self.version, step=step)

    def load_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        if state is not None:
            self.model.load_state_dict(state)
        self.server.publish(self.model, version)
        self.version = version

    def rng_state(self) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return self.server.metrics()


def make_server_backend(cfg: Config, student, tokenizer, params: SamplingParams, *, version: int, run_dir: Path,
                        private_copy: bool, rank: int = 0) -> ServerBackend:
    """`rank`: a data-parallel rank samples with its own seeds (as the local backend's generator does), else every
    rank would draw the same completions of its prompts."""
    from opd.rollout.remote import ServerRollout, server_settings

    weights_dir = Path(cfg.rollout.weights_dir) if cfg.rollout.weights_dir else Path(run_dir) / "rollout-weights"
    if rank:  # each rank publishes (and prunes) its own folders: ranks writing one vN folder at once would race
        weights_dir = weights_dir / f"rank-{rank}"
    server = ServerRollout(server_settings(cfg.rollout), tokenizer, weights_dir=weights_dir, seed=cfg.seed + 7919 * rank,
                           max_prompt_tokens=cfg.prompts.max_prompt_tokens)
    return ServerBackend(server, student, params, version=version, private_copy=private_copy)
