"""Stage 1: sample prompts s ~ D from a weighted mixture of sources."""

from opd.prompts.sources import PromptStream, chat_renderer, prompt_stream
from opd.prompts.tasks import get_task, verify

__all__ = ["PromptStream", "chat_renderer", "get_task", "prompt_stream", "verify"]
