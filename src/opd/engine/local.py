"""Rollouts in this process: the student samples with the weights it holds."""

from __future__ import annotations

import torch

from opd.rollout import SamplingParams, sample
from opd.types import Prompt, Rollout


class LocalRollout:
    """A RolloutBackend on one model. Synchronous loops hand it the trainer's own student (load_weights(None, v)
    only moves the version); a pipelined producer gets a copy, refreshed with each published state. With a
    `sampling_copy` (rollout.dtype = "bfloat16") a low-precision copy, refreshed from the model before every
    rollout, does the sampling."""

    def __init__(self, model, tokenizer, params: SamplingParams, *, version: int, generator: torch.Generator,
                 max_prompt_tokens: int, guide=None, sampling_copy=None):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.version, self.generator = version, generator
        self.max_prompt_tokens, self.guide, self.sampling_copy = max_prompt_tokens, guide, sampling_copy

    def load_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        if state is not None:
            self.model.load_state_dict(state)
        self.version = version

    def rollout(self, prompts: list[Prompt], step: int) -> Rollout:
        policy = self.model if self.sampling_copy is None else self.sampling_copy.refresh(self.model)
        return sample(policy, self.tokenizer, prompts, self.params, policy_version=self.version,
                      generator=self.generator, max_prompt_tokens=self.max_prompt_tokens, guide=self.guide)

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()
