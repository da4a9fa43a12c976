"""Where stage 2 runs: the student samples in this process (`rollout.backend = "local"`), or an inference
server samples for it (`"server"`, opd.rollout.remote). The loop sees one interface either way:

    rollouts.sample(prompts, params, version) -> Rollout   # behaviour logprobs + the version that sampled
    rollouts.publish(student, version)                    # after an update: the sampler gets the new weights
    rollouts.metrics()                                    # per-step numbers for the metrics row
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from opd.config import Config
from opd.rollout.guidance import TeacherGuide
from opd.rollout.sampler import SamplingParams, sample
from opd.types import Prompt, Rollout


class RolloutBackend(Protocol):
    def sample(self, prompts: list[Prompt], params: SamplingParams, version: int) -> Rollout: ...

    def publish(self, model, version: int) -> None: ...

    def metrics(self) -> dict[str, float]: ...


class LocalRollout:
    """The student's own weights, sampled in this process: always current, so publish has nothing to do."""

    def __init__(self, model, tokenizer, *, generator: torch.Generator, max_prompt_tokens: int,
                 guide: TeacherGuide | None = None):
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.max_prompt_tokens, self.guide = max_prompt_tokens, guide

    def sample(self, prompts: list[Prompt], params: SamplingParams, version: int) -> Rollout:
        return sample(self.model, self.tokenizer, prompts, params, policy_version=version, generator=self.generator,
                      max_prompt_tokens=self.max_prompt_tokens, guide=self.guide)

    def publish(self, model, version: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def make_rollout_backend(cfg: Config, student, tokenizer, *, generator: torch.Generator, guide: TeacherGuide | None,
                         run_dir: Path) -> RolloutBackend:
    if cfg.rollout.backend == "local":
        return LocalRollout(student, tokenizer, generator=generator, max_prompt_tokens=cfg.prompts.max_prompt_tokens,
                            guide=guide)
    from opd.rollout.remote import ServerRollout, server_settings

    weights_dir = Path(cfg.rollout.weights_dir) if cfg.rollout.weights_dir else Path(run_dir) / "rollout-weights"
    return ServerRollout(server_settings(cfg.rollout), tokenizer, weights_dir=weights_dir, seed=cfg.seed,
                         max_prompt_tokens=cfg.prompts.max_prompt_tokens)
