"""Supervised imitation of stored completions (the warm start, and the offline baseline's core):
cross-entropy on the completion tokens of a Rollout, prompt and padding excluded."""

from __future__ import annotations

import numpy as np
import torch

from opd import matmul
from opd.logprobs import sampled_logprobs
from opd.types import Rollout
from opd.update.step import adamw, step_optimizer


def sft_loss(model, batch: Rollout, chunk_size: int = 1024) -> torch.Tensor:
    # at the temperature the data was written at, as the offline baseline's sft objective and every logprob in opd
    return -sampled_logprobs(model, batch, batch.temperature, chunk_size).mean()


def supervised_train(model, data: Rollout, *, steps: int, batch_size: int, lr: float, seed: int,
                     should_stop=lambda: False) -> list[float]:
    """AdamW on random mini-batches of `data` for `steps` steps (fewer once should_stop() is true); the loss curve."""
    if steps == 0:
        return []
    model.train()
    opt = adamw(model, lr=lr)
    rng = np.random.default_rng([seed, 0x5F7])
    n = data.completion_ids.shape[0]
    losses = []
    with matmul.onednn_fp32(model):  # fp32 matmuls, forward and backward, through the faster kernel
        for _ in range(steps):
            if should_stop():
                break
            rows = rng.choice(n, size=min(batch_size, n), replace=False)
            loss = sft_loss(model, data.select(rows.tolist()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            step_optimizer(opt)
            losses.append(float(loss.detach()))
    return losses
