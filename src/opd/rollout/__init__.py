"""Stage 2: student rollout with the current weights (optionally teacher-guided)."""

from opd.rollout.guidance import TeacherGuide
from opd.rollout.sampler import SamplingParams, encode_prompts, sample, sampling_logprobs

__all__ = ["SamplingParams", "TeacherGuide", "encode_prompts", "sample", "sampling_logprobs"]
