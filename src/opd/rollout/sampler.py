"""Stage 2: student rollout a ~ pi_theta(. | s) with the current weights.

Batched sampling with a KV cache over left-padded prompts. For each sampled token we keep its
id and its log-probability under the distribution it was actually drawn from (logits /
temperature, then top-p renormalised), and each sequence carries the policy version (optimizer
step) of the weights that produced it. The token that ends a sequence (EOS, the chat template's
end-of-turn token, or the last token of a stop string) belongs to the completion; everything after it is padding with mask 0.

The forward passes go through a decoder (prefill the prompts, then one token per step): opd's lean
Llama decoder (opd.rollout.fast_llama) where it supports the model and rollout.decoder = "auto", else the
Hugging Face model with its dynamic KV cache (HFDecoder). Both give the same logits.

With a TeacherGuide (rollout.teacher_mix / teacher_correct_topk) the teacher runs in lockstep
with its own KV cache over the same tokens and takes part in choosing each one (opd.rollout.guidance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import inspect

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from opd import cpu_kernels, matmul
from opd.llama import fuse_storage, int8_supported, unsupported_reason
from opd.models import DTYPES
from opd.rollout.fast_llama import build_decoder
from opd.rollout.guidance import TeacherGuide, align_vocab, choose, inverse_cdf, uniforms
from opd.types import Prompt, Rollout


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    decoder: str = "auto"  # rollout.decoder: "auto" = opd.rollout.fast_llama where it supports the model, "hf" = always HF
    int8: bool = False  # rollout.dtype = "int8": the fast decoder's decode steps read int8 weights (fp32/bf16 models on CPU)


def prompt_token_ids(tokenizer, text: str, as_text: bool = False) -> list[int]:
    """A prompt's ids: a prompt that already starts with BOS (chat templates) gets no second one. as_text: the prompt
    holds no template markup, so a special token's string in it is text (split_special_tokens), not that token."""
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos, **({"split_special_tokens": True} if as_text else {}))[
        "input_ids"]


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_tokens: int,
                   as_text: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise (prompt_token_ids; as_text[i] for prompt i) and left-pad. A prompt longer than max_prompt_tokens keeps
    its end (what the completion continues) and its BOS: a model reads text without its BOS as something else
    (Gemma's logprobs moved by ~1 nat a token)."""
    rows = []
    for i, p in enumerate(prompts):
        ids = prompt_token_ids(tokenizer, p.text, bool(as_text and as_text[i]))
        if len(ids) > max_prompt_tokens:
            keep_bos = max_prompt_tokens > 1 and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
            ids = ids[:1] + ids[len(ids) - max_prompt_tokens + 1:] if keep_bos else ids[-max_prompt_tokens:]
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution tokens are drawn from: softmax(logits / T), top-p renormalised."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # no [B, V] copy at T = 1
    logp = F.log_softmax(scaled, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    cum = sorted_logp.exp().cumsum(-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    drop_sorted = (cum - sorted_logp.exp()) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logp = logp.masked_fill(drop, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def draw_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """One token a row from softmax(logits / T) (top-p renormalised) and its log-prob, by inverse CDF with one
    uniform a row from `generator` (opd.rollout.guidance.draw). On the CPU at top_p = 1 one C pass a row
    (cpu_kernels.sample_rows), where torch's ops cost ~0.5 ms a decode step at batch 4 and a 49k vocabulary; the
    same uniforms either way."""
    u = uniforms(logits.shape[0], generator, logits.device)
    if not (top_p >= 1.0 and (out := cpu_kernels.sample_rows(logits, temperature, u)) is not None):
        logp = sampling_logprobs(logits, temperature, top_p)
        tok = inverse_cdf(logp.exp(), u)  # = draw(logp.exp(), generator): the same uniforms
        out = tok, logp.gather(1, tok[:, None]).squeeze(1)
    if not torch.isfinite(out[1]).all():  # NaN or inf logits: torch's path drew a NaN "token", the C pass none
        bad = (~torch.isfinite(out[1])).sum().item()
        raise FloatingPointError(
            f"the model's logits are NaN or infinite in {bad} of {len(out[1])} row(s) of a decode step: its weights "
            "have diverged (or its inputs overflow). Resume from an earlier checkpoint with a lower train.lr or "
            "train.grad_clip, or check the model's dtype")
    return out


# End-of-turn markers of common chat templates (ChatML/SmolLM/Qwen, Gemma, Llama 3, Phi).
END_OF_TURN_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def end_token_ids(tokenizer) -> list[int]:
    """EOS, plus the end-of-turn token of the tokenizer's chat template: a chat completion ends with its turn."""
    ids = {tokenizer.eos_token_id} - {None}
    template = str(getattr(tokenizer, "chat_template", None) or "")
    markers = [tokenizer.convert_tokens_to_ids(m) for m in END_OF_TURN_MARKERS if m in template]
    ids |= {i for i in markers if i is not None and i != tokenizer.unk_token_id}
    return sorted(ids)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[Prompt],
    params: SamplingParams,
    *,
    policy_version: int = 0,
    generator: torch.Generator | None = None,
    max_prompt_tokens: int = 256,
    guide: TeacherGuide | None = None,
) -> Rollout:
    dev = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    B = len(prompts)
    end_ids = torch.tensor(end_token_ids(tokenizer), device=dev)
    pad = tokenizer.pad_token_id
    stop_tail = max((len(s) for s in params.stop), default=0) + 8  # tokens to decode when checking stops

    P = prompt_ids.shape[1]
    # The mask of prompt + every position the completion may reach, written once; each step passes a view of
    # its first P + t columns instead of concatenating a new [B, P + t] tensor per token.
    full_attn = torch.ones((B, P + params.max_new_tokens), dtype=prompt_mask.dtype, device=dev)
    full_attn[:, :P] = prompt_mask.to(dev)
    attn = full_attn[:, :P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    decoder = make_decoder(model, params.decoder, B, P + params.max_new_tokens, int8=params.int8)
    logits = decoder.prefill(prompt_ids.to(dev), attn, pos)
    next_pos = pos[:, -1:] + 1
    teacher = _TeacherStepper(guide.model, params.decoder, prompt_ids, attn, pos, P + params.max_new_tokens) \
        if guide is not None else None

    tokens = torch.full((B, params.max_new_tokens), pad, dtype=torch.long, device=dev)
    logprobs = torch.zeros((B, params.max_new_tokens), dtype=torch.float32, device=dev)
    mask = torch.zeros((B, params.max_new_tokens), dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    # The student's own log pi_theta(a_t), where the distribution sampled from is another: a guided mixture, or the
    # top-p nucleus (renormalised). A_t and the update's trust region compare with this one, the model's softmax.
    track_own = guide is not None or params.top_p < 1.0
    if track_own:
        own_logprobs = torch.zeros_like(logprobs)
    if guide is not None:
        teacher_share = torch.zeros_like(logprobs)
    steps = 0
    for t in range(params.max_new_tokens):
        if guide is None:
            tok, tok_lp = draw_token(logits, params.temperature, params.top_p, generator)
        else:
            logp = sampling_logprobs(logits, params.temperature, params.top_p)
            teacher_logp = sampling_logprobs(align_vocab(teacher.logits().to(dev), logp.shape[-1]),
                                             params.temperature, params.top_p)
            pick = choose(guide, logp, teacher_logp, generator)
            tok, tok_lp = pick.tokens, pick.behaviour_logprobs
            own_lp = pick.student_logprobs
            teacher_share[:, t] = torch.where(done, 0.0, pick.teacher_share)
        if params.top_p < 1.0:  # the untruncated softmax's logprob, not the nucleus's
            own_lp = sampling_logprobs(logits, params.temperature, 1.0).gather(1, tok[:, None]).squeeze(1)
        if track_own:
            own_logprobs[:, t] = torch.where(done, 0.0, own_lp)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens[:, t] = tok
        logprobs[:, t] = torch.where(done, 0.0, tok_lp)
        mask[:, t] = (~done).long()
        ended = torch.isin(tok, end_ids) & ~done
        if params.stop:
            ended |= _hits_stop(tokenizer, tokens[:, : t + 1], done, params.stop, stop_tail)
        finished |= ended
        done |= ended
        steps = t + 1
        if bool(done.all()):
            break
        attn = full_attn[:, : P + t + 1]
        logits = decoder.step(tok, attn, next_pos)
        if teacher is not None:
            teacher.step(tok, attn, next_pos)
        next_pos = next_pos + 1
    if was_training:
        model.train()

    tokens, logprobs, mask = tokens[:, :steps].cpu(), logprobs[:, :steps].cpu(), mask[:, :steps].cpu()
    texts = tokenizer.batch_decode(tokens.masked_fill(mask == 0, pad), skip_special_tokens=True)
    guided = {}
    if track_own:
        guided["student_logprobs"] = own_logprobs[:, :steps].cpu()
    if guide is not None:
        guided["teacher_share"] = teacher_share[:, :steps].cpu()
    return Rollout(
        prompts=list(prompts),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens,
        completion_mask=mask,
        behaviour_logprobs=logprobs,
        policy_version=torch.full((B,), policy_version, dtype=torch.long),
        texts=texts,
        finished=finished.cpu(),
        temperature=params.temperature,
        **guided,
    )


class SamplingCopy:
    """A lower-precision copy of the student that writes the rollouts (rollout.dtype = "bfloat16").

    Decoding a small batch is bound by reading the weights once per token, so bf16 weights (half the bytes,
    and avx512_bf16 / tensor-core matmuls) sample faster; training keeps the student's own dtype. `refresh`
    copies the current weights in before every rollout, so the copy is never a step behind. Its logprobs are
    the behaviour logprobs: the update's importance ratio pi_theta / pi_behaviour accounts for the rounding
    (as with bf16 inference-engine rollouts), and freshness/logprob_drift shows its size. Only parameters change
    dtype; buffers (e.g. rotary inverse frequencies) stay as they are.
    """

    def __init__(self, model, dtype: torch.dtype):
        import copy

        self.dtype = dtype
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(dtype)
        # each layer's Q/K/V and gate/up weights one after another in one buffer: the fast decoder's fused weights
        # are then these buffers, not a concatenation made again before every rollout (opd.llama.fuse_storage)
        fuse_storage(self.model)
        self._written_from: list[int] | None = None  # see written_from

    @torch.no_grad()
    def refresh(self, model):
        if self._written_from is not None and self._written_from == _versions(model):
            return self.model  # written by the optimizer step that made model's current weights
        self._written_from = None
        for dst, src in zip(self.model.parameters(), model.parameters(), strict=True):
            dst.copy_(src)
        return self.model

    def written_from(self, model) -> None:
        """The copy now holds `model`'s current weights (opd.update.bf16's optimizer wrote both in one pass): the
        next refresh skips its copy unless a parameter of `model` has been written in place since (its version
        counter moved). Only this marks a copy current, so the version counters never stand in for a first copy."""
        self._written_from = _versions(model)


def _versions(model) -> list[int]:
    return [p._version for p in model.parameters()]


def sampling_copy_for(model, dtype: str) -> SamplingCopy | None:
    """rollout.dtype's sampling copy of `model`: None where the model itself samples ("same"). "int8" decode steps
    read int8 weights (SamplingParams.int8) and the prefill runs in the sampler's own dtype: a bf16 copy where the
    CPU has bf16 instructions; the model itself (fp32 prefill, bf16-rounded activations in the int8 products only)
    where it has none, since a bf16 prefill there runs many times slower than fp32 (matmul.cpu_lacks_bf16)."""
    if dtype == "same":
        return None
    if dtype == "int8":
        on_cpu = next(model.parameters()).device.type == "cpu"
        return None if on_cpu and matmul.cpu_lacks_bf16() else SamplingCopy(model, torch.bfloat16)
    return SamplingCopy(model, DTYPES[dtype])


class HFDecoder:
    """The Hugging Face model with its own KV cache, behind the decoder interface: prefill, then one token a step."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with matmul.onednn_fp32(self.model):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1)
        self.cache = _cache_of(out)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with matmul.onednn_fp32(self.model):
            out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{_CACHE_KW: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1]


def make_decoder(model, kind: str, batch: int, max_len: int, int8: bool = False):
    """rollout.decoder: "auto" = the fast Llama decoder when it supports the model (else HF), "hf" = HF always."""
    if kind not in ("auto", "hf"):
        raise ValueError(f"unknown decoder {kind!r}: use 'auto' or 'hf'")
    fast = build_decoder(model, batch, max_len, int8=int8) if kind == "auto" else None
    return fast if fast is not None else HFDecoder(model)


def int8_decode_unsupported(model, kind: str) -> str | None:
    """Why int8 decode steps (rollout.dtype = "int8") cannot run for `model` (the sampler), or None."""
    p = next(model.parameters())
    if kind != "auto":
        return "rollout.decoder = 'hf' (int8 decoding is part of opd's own decoder)"
    if (reason := unsupported_reason(model)) is not None:
        return f"opd's decoder does not support this model ({reason})"
    if not int8_supported(p.device, p.dtype):
        return f"torch has no weight-only int8 kernel for {p.dtype} on {p.device.type} (CPU, fp32/bf16 only)"
    return None


class _TeacherStepper:
    """The teacher's side of a guided rollout: the same tokens, masks and positions, its own KV cache and device."""

    def __init__(self, model, kind: str, prompt_ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, max_len: int):
        self.dev = next(model.parameters()).device
        self.decoder = make_decoder(model, kind, prompt_ids.shape[0], max_len)
        self.out = self.decoder.prefill(prompt_ids.to(self.dev), attn.to(self.dev), pos.to(self.dev))

    def logits(self) -> torch.Tensor:
        return self.out.float()

    def step(self, tok: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> None:
        self.out = self.decoder.step(tok.to(self.dev), attn.to(self.dev), pos.to(self.dev))


# transformers >= 5.2x renamed `past_key_values` to `cache`; accept both.
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) if hasattr(out, "cache") else out.past_key_values


def _hits_stop(tokenizer, tokens: torch.Tensor, done: torch.Tensor, stops: list[str], tail: int) -> torch.Tensor:
    hit = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for i in torch.nonzero(~done).flatten().tolist():
        text = tokenizer.decode(tokens[i, -tail:].tolist(), skip_special_tokens=True)
        hit[i] = any(s in text for s in stops)
    return hit
