"""Stage 3: a local teacher scores the student's own prefixes.

One forward pass per sequence over prompt + completion yields log pi_T(a_t | s, a_<t) for every
completion token, plus optional top-k logprobs and, when an objective needs it, the full
distribution at each student state. The teacher stays in eval mode, without grad, in its own dtype.
"""

from __future__ import annotations

import time

import torch

from opd import cpu_kernels, llama
from opd.logprobs import completion_hidden, entropy_of, per_position, scatter_tokens
from opd.objectives import fused
from opd.types import Rollout, TeacherScores


class LocalTeacher:
    """Any Hugging Face causal LM sharing the student's tokenizer."""

    def __init__(self, model, *, batch_size: int = 64, chunk_size: int = 1024, topk: int = 0, fast: bool = True):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.topk = topk
        self.fast = fast  # teacher.forward = "auto": opd.llama's forward where it supports the model

    @torch.no_grad()
    def score(self, rollout: Rollout, *, full: bool = False) -> TeacherScores:
        t0 = time.perf_counter()
        B, T = rollout.completion_ids.shape
        lp = torch.zeros((B, T), dtype=torch.float32)
        ent = torch.zeros((B, T), dtype=torch.float32)
        k = self.topk
        topk_ids = torch.zeros((B, T, k), dtype=torch.long) if k else None
        topk_lp = torch.full((B, T, k), float("-inf")) if k else None
        full_lp = None
        temp = rollout.temperature  # (T is the completion length here)
        in_place = False  # full_lp filled row by row by the C pass (below)
        token_only = not (k or full) and fused.supports(self.model)  # token logprob and entropy, no [n, V] log-probs
        for start in range(0, B, self.batch_size):
            rows = slice(start, min(start + self.batch_size, B))
            cmask = rollout.completion_mask[rows]
            targets = rollout.completion_ids[rows][cmask.bool()].to(next(self.model.parameters()).device)
            hidden = completion_hidden(
                self.model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows], cmask,
                fast=self.fast,
            )

            def fn(logp: torch.Tensor, sl: slice):
                outs = [logp.gather(1, targets[sl, None]).squeeze(1), entropy_of(logp)]
                if k:
                    v, i = logp.topk(k, dim=-1)
                    outs += [v, i]
                if full:
                    outs.append(logp)
                return tuple(outs)

            head = llama.frozen_head(self.model) if token_only else None
            if head is not None and hidden.dtype == torch.bfloat16 and hidden.device.type == "cpu" and temp > 0:
                # token logprob and entropy as the AMX kernel's LM head products come: no [n, V] logits at all
                res = cpu_kernels.amx_head_terms(hidden, head, targets, temp)
            elif token_only:  # one pass over the logits
                res = per_position(self.model, hidden,
                                   lambda logits, sl: fused.token_terms(logits, None, targets[sl], temp)[:2],
                                   temp, self.chunk_size, raw_logits=True)
            elif full and not k and fused.supports(self.model) and targets.device.type == "cpu":
                # the full distribution, its entropy and token: each real token's log-probs written straight into
                # the scores' [B, T, V] block (the padding's rows zeroed), not gathered [N, V] and scattered after
                if full_lp is None:
                    full_lp = torch.empty((B, T, self.model.get_output_embeddings().weight.shape[0]))
                    # by row index: a [B, T] mask broadcast over the vocabulary is a pass over the whole block
                    # (~3.5 ms for 4 x 64 x 49k) even where no row is padding
                    padding = torch.nonzero(~rollout.completion_mask.bool().reshape(-1))[:, 0]
                    if padding.numel():
                        full_lp.view(B * T, -1)[padding] = 0.0
                flat = full_lp.view(B * T, -1)
                out_rows = torch.nonzero(cmask.bool().reshape(-1))[:, 0] + start * T
                res = per_position(self.model, hidden,
                                   lambda logits, sl: fused.log_softmax_terms(logits, targets[sl], temp, flat,
                                                                              out_rows[sl])[:2],
                                   temp, self.chunk_size, raw_logits=True)
                in_place = True
            elif full and not k and fused.supports(self.model):
                res = per_position(self.model, hidden,
                                   lambda logits, sl: fused.log_softmax_terms(logits, targets[sl], temp),
                                   temp, self.chunk_size, raw_logits=True)
            else:
                res = per_position(self.model, hidden, fn, temp, self.chunk_size)
            if not res:
                continue
            lp[rows] = scatter_tokens(res[0].cpu(), cmask)
            ent[rows] = scatter_tokens(res[1].cpu(), cmask)
            if k:
                topk_lp[rows] = scatter_tokens(res[2].cpu(), cmask, fill=float("-inf"))
                topk_ids[rows] = scatter_tokens(res[3].cpu(), cmask)
            if full and not in_place:
                chunk_full = scatter_tokens(res[-1].cpu(), cmask)
                if rows == slice(0, B):  # the whole batch in one block: no second [B, T, V] copy
                    full_lp = chunk_full
                else:
                    if full_lp is None:
                        full_lp = torch.zeros((B, T, chunk_full.shape[-1]), dtype=torch.float32)
                    full_lp[rows] = chunk_full
        return TeacherScores(
            token_logprobs=lp,
            scored_mask=rollout.completion_mask.clone(),
            topk_ids=topk_ids,
            topk_logprobs=topk_lp,
            full_logprobs=full_lp,
            entropy=ent,
            latency_s=time.perf_counter() - t0,
            tokens_scored=rollout.num_tokens,
        )
