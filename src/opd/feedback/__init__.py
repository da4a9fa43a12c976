"""Stage 4: turn teacher and student logprobs into a token-level learning signal."""

from opd.feedback.advantages import compute_feedback, discounted_returns, group_normalised_rewards, whiten

__all__ = ["compute_feedback", "discounted_returns", "group_normalised_rewards", "whiten"]
