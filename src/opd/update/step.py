"""Stage 5: update the student near its own rollout distribution.

One rollout batch is split into `updates_per_batch` mini-batches (one optimizer step each) and
each mini-batch into micro-batches (gradient accumulation). The loss of a mini-batch is
normalised by its total token (or sequence) count, so accumulation gives the same gradient as
one big forward. Each micro-batch costs exactly one student forward: sampled-token logprobs,
entropy and any full-distribution objective come from the same chunked pass.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from opd import cpu_kernels, matmul
from opd.config import ObjectiveConfig, TrainConfig
from opd.logprobs import completion_hidden, entropy_of, per_position, sampled_logprobs
from opd.objectives import fused as fused_terms
from opd.objectives import generalized_jsd, kl_to_reference, pg_loss, reverse_kl, topk_kl
from opd.types import TEACHER_WRITTEN, Feedback, Rollout, TeacherScores
from opd.update.bf16 import MasterAdamW, grad_norm
from opd.update.layer_ops import CausalSoftmaxBF16, layer_ops

PG_FAMILY = ("pg", "hybrid")


def make_optimizer(model, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    return adamw(model, lr=lr or cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def adamw(model, **kwargs) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with the fused kernel where torch has one for them."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates each parameter in one pass over its weights, moments and gradient; the default
    # per-tensor loop makes ~10 passes (0.9 s a step for an 80M-parameter student on 2 CPU cores, as much as
    # the rest of the update). Same update rule, same state_dict layout.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def use_config_hyperparameters(optimizer, scheduler, cfg: TrainConfig) -> list[str]:
    """On resume, after the optimizer's and the scheduler's load_state_dict: the config's lr, betas and weight decay
    in place of the checkpoint's (load_state_dict restores the values they were made with; the moments, the step
    counts and the schedule's position stay). Returns what changed, for the log."""
    changed = []
    for name, new in (("lr", cfg.lr), ("betas", tuple(cfg.betas)), ("weight_decay", cfg.weight_decay)):
        old = scheduler.base_lrs[0] if name == "lr" else optimizer.param_groups[0][name]
        if tuple(old) != new if name == "betas" else old != new:
            changed.append(f"train.{name} {old} -> {new}")
    for group in optimizer.param_groups:
        group["betas"], group["weight_decay"], group["initial_lr"] = tuple(cfg.betas), cfg.weight_decay, cfg.lr
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):  # the schedule at its current step
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    return changed


def step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(), then mark the parameters it wrote as written in place: the fused AdamW kernel does not move
    their version counters, and opd.llama's caches of fused / int8 weights use them to see that a weight changed (a
    stale cache would sample the next rollout with the previous step's weights)."""
    optimizer.step()
    if not getattr(optimizer, "marks_versions", False):  # opd.update.bf16.MasterAdamW marks them itself
        torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


def make_scheduler(optimizer, cfg: TrainConfig, total_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def update_autocast(model, mode: str):
    """train.autocast: the student's forward in bf16 (matmuls and their backward) while the parameters, the
    optimizer and the loss stay fp32. lm_logits upcasts the logits to fp32 before the log-softmax; autocast also
    runs log_softmax and the reductions in fp32 by itself. With checkpointed LM-head chunks, the recomputation in
    the backward pass runs under the same autocast state (torch.utils.checkpoint records it)."""
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


# On the CPU in bf16 (autocast or train.bf16_weights), HF's eager attention (bf16 matmuls, softmax in fp32) trains faster than SDPA's
# flash kernel at the short lengths of a rollout: the flash backward costs ~8 ms a layer even at 100 tokens, and
# the update of a batch-4 step got ~17% faster (bench/NOTES.md). Eager keeps each layer's [B, heads, L, L]
# probabilities for the backward pass, so it is used only while those stay under this many bytes in all.
EAGER_ATTENTION_MAX_BYTES = 256 * 2**20


def grouped_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention (transformers' eager_attention_forward: scores, mask, fp32 softmax, bf16 probabilities)
    without repeat_kv: the query heads that share a key/value head are stacked as rows of one product with that
    head, instead of the key and value heads being copied for each query head (and their gradients summed back
    over the copies). The same sums; ~10% fewer milliseconds a layer for the update's attention at 4 x 112 (session
    17). The queries are scaled before the product ([L, D] values, not [L, L]): with a power-of-two scale, as
    head size 64 gives, that is exactly HF's product.

    Masks as HF's SDPA attention takes them (its mask function is registered with this one): None where the
    attention is plainly causal (or, for one query or a module that is not causal, where it is full), else a
    boolean mask (True: attend) or an additive one. The plainly causal case on bf16 CPU tensors with opd's AVX-512
    BF16 build takes the scale, the mask, the softmax and the cast in one C pass each way
    (layer_ops.CausalSoftmaxBF16: 1.50 -> 1.19 ms a layer forward and backward at 4 x 112, session 18), without
    building a [B, L, L] mask at all."""
    B, H, L, D = query.shape
    KV, Lk = key.shape[1], key.shape[2]
    group = H // KV
    causal = attention_mask is None and L > 1 and getattr(module, "is_causal", True)
    if causal and cpu_kernels.bf16_training_ops() and query.dtype == key.dtype == torch.bfloat16 \
            and query.device.type == "cpu" and Lk >= L and math.frexp(scaling)[0] == 0.5:
        # the scale goes into the C pass: for a power of two, scaling the product is exactly scaling the queries
        scores = torch.matmul(query.reshape(B, KV, group * L, D), key.transpose(2, 3))
        probs = CausalSoftmaxBF16.apply(scores, L, scaling)
    else:
        q = (query * scaling).reshape(B, KV, group * L, D)  # row j L + l of head g: query head g * group + j
        scores = torch.matmul(q, key.transpose(2, 3))
        if causal:
            attention_mask = torch.ones((L, Lk), dtype=torch.bool, device=scores.device).tril(Lk - L)[None, None]
        if attention_mask is not None:
            scores = scores.view(B, KV, group, L, Lk)
            mask = attention_mask[:, :, None]  # [B or 1, 1, 1, L, Lk]: the same for each query head of a group
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
            scores = scores.view(B, KV, group * L, Lk)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).view(B, H, L, D)
    return out.transpose(1, 2).contiguous(), probs


GROUPED_EAGER = "opd_grouped_eager"


def _register_grouped_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_EAGER, sdpa_mask)  # None where plainly causal, else boolean


@contextlib.contextmanager
def training_attention(model, rollout: Rollout, autocast: str):
    """The student's attention for one micro-batch's forward: eager where that is the faster choice (above),
    otherwise the model's own. Exact either way; the backward pass replays whatever the forward recorded."""
    cfg = model.config
    L = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
    heads, layers = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_hidden_layers", None)
    # fp32 scores, bf16 probabilities and their fp32 softmax output per layer (upper bound: rows are left-aligned)
    saved = rollout.prompt_ids.shape[0] * (heads or 0) * L * L * 10 * (layers or 0)
    bf16 = autocast == "bfloat16" or next(model.parameters()).dtype == torch.bfloat16  # autocast, or bf16 weights
    if (not bf16 or heads is None or layers is None or next(model.parameters()).device.type != "cpu" or saved > EAGER_ATTENTION_MAX_BYTES
            or getattr(cfg, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation")):
        yield
        return
    _register_grouped_eager()
    model.set_attn_implementation(GROUPED_EAGER)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


# Below this many weights the dense embedding backward's fill and add cost next to nothing.
EMBEDDING_ROWS_MIN_WEIGHTS = 2**20


class _LookUpRows(torch.autograd.Function):
    """F.embedding(ids, weight) whose backward hands the looked-up rows' gradient to `rows` (an EmbeddingRowsGrad)
    instead of returning a gradient for the weight."""

    @staticmethod
    def forward(ctx, weight, ids, rows):
        ctx.rows = rows
        ctx.save_for_backward(ids)
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.rows.pending.append((ids.reshape(-1), grad.reshape(-1, grad.shape[-1])))
        return None, None, None


class EmbeddingRowsGrad:
    """The input embedding's gradient as its few looked-up rows, added in place into the dense gradient the tied
    LM head gives the same weight (`add_to_grad`, after each backward pass).

    Why: the dense embedding backward zero-fills and adds a whole [vocab, hidden] tensor (-9% of a bf16 update of
    the half-depth SmolLM2 student when replaced, bench/NOTES.md session 12), and a sparse gradient (the previous
    way) is summed with the head's dense one by autograd out of place: one more [vocab, hidden] copy a backward
    pass (~18 ms at batch 4, session 16). Rows at the embedding's padding_idx get no gradient, as in F.embedding."""

    def __init__(self, emb: torch.nn.Embedding | None):
        self.emb = emb
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def look_up(self, ids: torch.Tensor) -> torch.Tensor:
        return _LookUpRows.apply(self.emb.weight, ids, self)

    def add_to_grad(self) -> None:
        if not self.pending:
            return
        w = self.emb.weight
        if w.grad is None:  # the head took no part in this backward pass
            w.grad = torch.zeros_like(w)
        for ids, rows in self.pending:
            if self.emb.padding_idx is not None:
                keep = ids != self.emb.padding_idx
                ids, rows = ids[keep], rows[keep]
            w.grad.index_add_(0, ids, rows.to(w.grad.dtype))
        self.pending.clear()


@contextlib.contextmanager
def embedding_rows_grad(model):
    """EmbeddingRowsGrad for the model's input embedding while the update runs, where that embedding is tied to the
    LM head and large; otherwise one whose add_to_grad does nothing (the embedding keeps its own backward)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = (isinstance(emb, torch.nn.Embedding) and head is not None and emb.weight is head.weight
            and emb.weight.requires_grad and not emb.sparse and emb.max_norm is None and not emb.scale_grad_by_freq)
    if not tied or emb.weight.numel() < EMBEDDING_ROWS_MIN_WEIGHTS:
        yield EmbeddingRowsGrad(None)
        return
    rows = EmbeddingRowsGrad(emb)
    emb.forward = rows.look_up  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield rows
    finally:
        del emb.forward
        rows.pending.clear()


@dataclass
class TokenTerms:
    """Per-token quantities of one micro-batch, over its real completion tokens [N]."""

    new_logprobs: torch.Tensor  # with grad
    entropy: torch.Tensor  # detached
    distribution_loss: torch.Tensor | None  # with grad, for reverse_kl / gkd / topk_kl


# Objectives whose vocabulary work opd.objectives.fused does in one pass: the policy-gradient family needs only the
# sampled token's logprob (and the entropy it reports), reverse_kl also the KL to the teacher's full distribution.
FUSED_OBJECTIVES = (*PG_FAMILY, "sft", "reverse_kl")


def student_token_terms(model, rollout: Rollout, scores: TeacherScores, obj: ObjectiveConfig, chunk_size: int,
                        *, fused: bool = True) -> TokenTerms:
    mask = rollout.completion_mask.bool()
    dev = next(model.parameters()).device
    targets = rollout.completion_ids[mask].to(dev)
    hidden = completion_hidden(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    fuse = fused and obj.name in FUSED_OBJECTIVES and fused_terms.supports(model)
    teacher_full, teacher_rows = None, None  # [N, V]; or the [B x T, V] block and each token's row in it
    if obj.name in ("reverse_kl", "gkd"):
        full = scores.full_logprobs
        flat = full.reshape(-1, full.shape[-1])  # a view: no copy
        if bool(mask.all()):
            teacher_full = flat.to(dev)
        elif fuse:  # the fused terms read each real token's row in place: no gathered ~50 MB copy when a row ends early
            teacher_full, teacher_rows = flat.to(dev), torch.nonzero(mask.reshape(-1))[:, 0].to(dev)
        else:
            teacher_full = full[mask].to(dev)
    if fuse:
        T = rollout.temperature

        def terms(logits: torch.Tensor, sl: slice):
            if teacher_rows is not None:  # the whole block, and this chunk's rows in it
                return fused_terms.token_terms(logits, teacher_full, targets[sl], T, teacher_rows[sl])
            return fused_terms.token_terms(logits, None if teacher_full is None else teacher_full[sl], targets[sl], T)

        tok, ent, kl = per_position(model, hidden, terms, T, chunk_size, raw_logits=True)
        return TokenTerms(new_logprobs=tok, entropy=ent, distribution_loss=kl if obj.name == "reverse_kl" else None)
    if obj.name == "topk_kl":
        tk_ids, tk_lp = scores.topk_ids[mask].to(dev), scores.topk_logprobs[mask].to(dev)

    def fn(logp: torch.Tensor, sl: slice):
        outs = [logp.gather(1, targets[sl, None]).squeeze(1), entropy_of(logp.detach())]
        if obj.name == "reverse_kl":
            outs.append(reverse_kl(logp, teacher_full[sl]))
        elif obj.name == "gkd":
            outs.append(generalized_jsd(logp, teacher_full[sl], obj.beta))
        elif obj.name == "topk_kl":
            outs.append(topk_kl(logp, tk_ids[sl], tk_lp[sl], obj.topk_direction))
        return tuple(outs)

    res = per_position(model, hidden, fn, rollout.temperature, chunk_size)
    return TokenTerms(new_logprobs=res[0], entropy=res[1], distribution_loss=res[2] if len(res) > 2 else None)


@torch.no_grad()
def reference_logprobs(ref_model, rollout: Rollout, chunk_size: int) -> torch.Tensor:
    return sampled_logprobs(ref_model, rollout, rollout.temperature, chunk_size)


def update_student(
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rollout: Rollout,
    scores: TeacherScores,
    feedback: Feedback,
    *,
    objective: ObjectiveConfig,
    train: TrainConfig,
    version: int,
    ref_model=None,
    chunk_size: int = 1024,
    dp=None,
) -> tuple[dict[str, float], int]:
    """Runs the optimizer steps for one rollout batch. Returns (metrics, new policy version).

    `version` is the policy version of `model` now; rows sampled by an older one (a pipelined loop) are stale and
    get a truncated importance weight. `dp` (opd.engine.distributed.DataParallel): this process holds one rank's
    share of the batch; the loss is normalised by the global token count and gradients are summed over ranks."""
    model.train()
    batch_version = version
    B = rollout.completion_ids.shape[0]
    acc = _Accumulator()
    skipped = 0
    used_lr = None
    # fp32 training: the student's matmuls, forward and backward, through oneDNN where that is the faster kernel
    # (under bf16 autocast they already are); bf16 weights: the norms and SiLU x up in C (opd.update.layer_ops).
    with (matmul.onednn_fp32(model, active=train.autocast == "none"), embedding_rows_grad(model) as embedding_rows,
          layer_ops(model)):
        for mb in np.array_split(np.arange(B), min(train.updates_per_batch, B)):
            mb_mask = feedback.loss_mask[mb]
            # token: the (weighted) tokens in the loss; sequence: the rows with any token in the loss (a row the
            # teacher dropped adds nothing to the loss, so it must not shrink the step by adding to the count)
            local_denom = float(mb_mask.sum()) if objective.loss_norm == "token" else float((mb_mask.sum(1) > 0).sum())
            denom = local_denom
            if dp is not None:  # token-mean over the global mini-batch, not a mean of per-rank means
                denom = dp.sum(denom)
            if denom == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            micro = train.micro_batch_size or len(mb)
            finite = True
            mb_loss = 0.0  # this rank's share of the objective times denom
            for start in range(0, len(mb), micro):
                rows = mb[start : start + micro].tolist()
                r, s, f = rollout.select(rows), scores.select(rows), feedback.select(rows)
                loss, stats = _micro_batch_loss(model, r, s, f, objective, chunk_size, version, ref_model, denom,
                                                batch_version, train.autocast)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                embedding_rows.add_to_grad()
                mb_loss += stats.pop("loss")
                acc.add(stats)
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:  # fused AdamW needs dense gradients (a model may bring its own sparse embedding)
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
            if dp is not None:  # every rank steps, or none does
                finite = dp.all_true(finite)
                if finite:
                    dp.all_reduce_grads(params)
            if finite:  # update/loss: the objective this step minimised, over this rank's share
                acc.loss_sum += mb_loss
                acc.loss_weight += local_denom
            grad_norm = clip_gradients(params, train.grad_clip, optimizer)
            if not finite or not torch.isfinite(grad_norm):
                skipped += 1  # never apply a non-finite step; the batch is counted and dropped
                optimizer.zero_grad(set_to_none=True)
                continue
            acc.grad_norms.append(float(grad_norm))
            used_lr = optimizer.param_groups[0]["lr"]  # the rate this step takes (the scheduler then sets the next)
            step_optimizer(optimizer)
            scheduler.step()
            version += 1
    if dp is not None:  # update/loss of the global batch: its ranks' objectives over their summed denominators
        acc.loss_sum, acc.loss_weight = dp.sums([acc.loss_sum, acc.loss_weight])
    metrics = acc.summary()
    if skipped and "stability/grad_norm" not in metrics:
        metrics["stability/grad_norm"] = float("nan")  # every mini-batch was non-finite: never healthy (Stability red)
    metrics["stability/skipped_batches"] = float(skipped)
    metrics["train/lr"] = float(used_lr if version > batch_version else optimizer.param_groups[0]["lr"])
    return metrics, version


def clip_gradients(params: list[torch.Tensor], max_norm: float, optimizer) -> torch.Tensor:
    """Clip the gradients' global norm to max_norm (0 = off); returns the norm before clipping. An optimizer that
    scales the gradients as it reads them (opd.update.bf16.MasterAdamW) gets the clip's coefficient instead of a
    pass over them; the coefficient is clip_grad_norm_'s, max_norm / (norm + 1e-6) capped at 1."""
    if not isinstance(optimizer, MasterAdamW):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = grad_norm(params)
    if max_norm > 0 and math.isfinite(norm):
        optimizer.grad_mul = min(1.0, max_norm / (norm + 1e-6))
    return torch.tensor(norm)


def teacher_outside_loss_zeroed(scores: TeacherScores, loss_mask: torch.Tensor, completion_mask: torch.Tensor) -> TeacherScores:
    """The teacher's distributions at tokens outside the loss (truncated after a broken prefix, unscored) set to
    finite zeros: a token with weight 0 then contributes exactly 0 to the loss and its gradient, where a NaN
    there would still poison both (NaN * 0 = NaN, also in the backward pass)."""
    keep = loss_mask > 0
    if not bool((completion_mask.bool() & ~keep).any()):
        return scores  # the common case: every completion token trains, no copy of a [B, T, V] tensor
    out = copy.copy(scores)
    if scores.full_logprobs is not None:
        out.full_logprobs = torch.where(keep[..., None], scores.full_logprobs, 0.0)
    if scores.topk_logprobs is not None:
        out.topk_logprobs = torch.where(keep[..., None], scores.topk_logprobs, 0.0)
    return out


def _micro_batch_loss(model, r, s, f, objective, chunk_size, version, ref_model, denom, batch_version: int,
                      autocast: str):
    mask = r.completion_mask.bool()
    s = teacher_outside_loss_zeroed(s, f.loss_mask, r.completion_mask)
    # the student's forward only; the reference model stays as it is
    with update_autocast(model, autocast), training_attention(model, r, autocast):
        terms = student_token_terms(model, r, s, objective, chunk_size)
    dev = terms.new_logprobs.device
    # The tokens were drawn from q (behaviour_logprobs): the student's softmax, or for a teacher-guided rollout the
    # mixture / corrected distribution, or for top-p the nucleus. The policy gradient weights every token by
    # pi_theta / q, split as (pi_theta / pi_own) x (pi_own / q), pi_own the student's own softmax at sampling time:
    # PPO's clip acts on the first factor, the student's move since it sampled (1 on a fresh batch, so nothing is
    # clipped before the student has moved), the second is a fixed importance weight (1 without guidance or top-p).
    # Full-distribution objectives (reverse_kl, gkd, topk_kl) are exact at each visited state whoever chose the
    # token, so guided states enter them unweighted, as in GKD / speculative KD.
    old_lp = r.behaviour_logprobs[mask].to(dev)
    own_lp = r.policy_logprobs[mask].to(dev)  # the student's own sampling-time logprob: what drift checks
    adv = f.advantages[mask].to(dev)
    weight = f.loss_mask[mask].to(dev)
    ratio = torch.exp(terms.new_logprobs.detach() - old_lp)  # pi_theta / q: the stale tokens' truncated IS weight
    policy_ratio = ratio if r.student_logprobs is None else torch.exp(terms.new_logprobs.detach() - own_lp)
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if objective.name in PG_FAMILY:
        tok_loss, policy_ratio, clipped = pg_loss(terms.new_logprobs, own_lp, adv, objective.clip_eps)
        if r.student_logprobs is not None:
            tok_loss = tok_loss * torch.exp(own_lp - old_lp)
    elif objective.name == "sft":  # the offline baseline's sequence-level KD: cross-entropy on teacher text
        tok_loss = -terms.new_logprobs
    else:
        tok_loss = terms.distribution_loss
    token_rows = torch.nonzero(mask)[:, 0]
    # Imitating stored teacher text is not a policy gradient: its rows are never stale (their behaviour logprobs
    # are the teacher's, and pi_theta / pi_teacher would reweight the imitation loss).
    sampled = (r.policy_version != TEACHER_WRITTEN)[token_rows].to(dev)
    stale = ((batch_version - r.policy_version)[token_rows] > 0).to(dev) & sampled
    if bool(stale.any()):
        # pg's stale token: the whole importance weight pi_theta / q. A distribution objective, exact at each state
        # whoever chose the token: the student's own move since sampling, pi_theta / pi_own (1 while unchanged)
        moved = ratio if objective.name in PG_FAMILY else policy_ratio
        tok_loss, clipped = _stale_weighted(tok_loss, clipped, stale, moved, terms.new_logprobs, adv, objective)
    kl_ref = None
    if ref_model is not None and objective.kl_ref_coef > 0:
        ref_lp = reference_logprobs(ref_model, r, chunk_size).to(dev)
        kl_ref = kl_to_reference(terms.new_logprobs, ref_lp)
        tok_loss = tok_loss + objective.kl_ref_coef * kl_ref
    tok_loss = tok_loss * weight
    in_loss = weight > 0  # the tokens that train (the rest: truncated after a broken prefix, or unscored)
    if objective.loss_norm == "token":
        loss = tok_loss.sum() / denom
    else:
        seq_id = token_rows.to(dev)
        per_seq = torch.zeros(mask.shape[0], device=dev).index_add(0, seq_id, tok_loss)
        # a weighted mean within each sequence: divided by its summed weights, which broken_prefix = "downweight"
        # makes fractional (a clamp at 1 turned rows weighing less than 1 into sums); rows without weight add 0
        lengths = torch.zeros(mask.shape[0], device=dev).index_add(0, seq_id, weight)
        loss = (per_seq / torch.where(lengths > 0, lengths, 1.0)).sum() / denom
    lag = torch.where(sampled, (version - r.policy_version).float()[token_rows].to(dev), 0.0)
    fresh = lag == 0
    stats = {
        "loss": float(loss.detach()) * denom,  # summed back; update_student divides by its share's denominator
        "ratio": policy_ratio.detach(),  # freshness: how far the student moved since it sampled
        "clipped": clipped.float()[in_loss],
        "entropy": terms.entropy,
        "new_lp": terms.new_logprobs.detach(),
        "lag": lag,
        "drift": (terms.new_logprobs.detach() - own_lp).abs()[fresh],
        "kl_ref": None if kl_ref is None else kl_ref.detach(),
        "dist": None if terms.distribution_loss is None else terms.distribution_loss.detach()[in_loss],
    }
    return loss, stats


def _stale_weighted(tok_loss, clipped, stale, ratio, new_lp, adv, objective):
    """Tokens an older policy sampled (pipelined loop): weight w = min(ratio, cap), detached (the caller's ratio:
    pi_theta / q for pg, pi_theta / pi_own for a distribution objective).
    pg / hybrid: the truncated-importance-sampling policy gradient -w A grad log pi_theta (the PPO clip around the
    behaviour policy would freeze a stale token's gradient outright); distribution objectives: w times the loss
    at that state. Tokens of the current policy keep their loss unchanged."""
    w = ratio.clamp(max=objective.max_stale_weight)
    if objective.name in PG_FAMILY:
        stale_loss = -w * adv * new_lp
    else:
        stale_loss = w * tok_loss
    return torch.where(stale, stale_loss, tok_loss), torch.where(stale, ratio > objective.max_stale_weight, clipped)


class _Accumulator:
    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.loss_sum = 0.0  # the mini-batches' objectives times their denominators
        self.loss_weight = 0.0  # those denominators: update/loss is the objective as minimised, whatever loss_norm
        self.grad_norms: list[float] = []

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            if v is not None:
                self.parts.setdefault(k, []).append(v.float().cpu())

    def summary(self) -> dict[str, float]:
        cat = {k: torch.cat(v) for k, v in self.parts.items()}

        # a figure for what was measured; none (not a made-up 0 or 1) where no token was (nothing in the loss)
        out = {}
        if self.loss_weight:
            out["update/loss"] = self.loss_sum / self.loss_weight
        for key, part, reduce in (
            ("freshness/ratio_mean", "ratio", torch.mean), ("freshness/ratio_max", "ratio", torch.max),
            ("freshness/ratio_min", "ratio", torch.min), ("freshness/policy_lag", "lag", torch.mean),
            ("freshness/policy_lag_max", "lag", torch.max), ("stability/clip_frac", "clipped", torch.mean),
            ("stability/entropy", "entropy", torch.mean), ("update/new_logprob_mean", "new_lp", torch.mean),
            ("freshness/logprob_drift", "drift", torch.mean),  # tokens of the current policy only
            ("stability/kl_ref", "kl_ref", torch.mean), ("update/distribution_loss", "dist", torch.mean),
        ):
            t = cat.get(part)
            if t is not None and t.numel():
                out[key] = float(reduce(t))
        if self.grad_norms:
            out["stability/grad_norm"] = float(np.mean(self.grad_norms))
        return out
