"""Stage 2: student rollout with the current weights (optionally teacher-guided)."""

from opd.rollout.guidance import TeacherGuide, make_guide
from opd.rollout.sampler import (SamplingCopy, SamplingParams, encode_prompts, int8_decode_unsupported, sample,
                                 sampling_copy_for, sampling_logprobs)

__all__ = ["SamplingCopy", "SamplingParams", "TeacherGuide", "encode_prompts", "int8_decode_unsupported", "make_guide",
           "sample", "sampling_copy_for", "sampling_logprobs"]
