"""Stage 2: student rollout with the current weights."""

from opd.rollout.sampler import SamplingParams, encode_prompts, sample, sampling_logprobs

__all__ = ["SamplingParams", "encode_prompts", "sample", "sampling_logprobs"]
