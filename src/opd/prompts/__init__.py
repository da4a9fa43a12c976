"""Stage 1: sample prompts s ~ D from a weighted mixture of sources."""

from opd.prompts.sources import PromptStream
from opd.prompts.tasks import get_task, verify

__all__ = ["PromptStream", "get_task", "verify"]
