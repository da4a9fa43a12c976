"""A lean decoder for Llama-architecture students: the hot path of the rollout.

Decoding a small batch reads every weight once per token, and for tiny models the Hugging Face forward's
per-step Python (mask building, dynamic cache bookkeeping, output dataclasses, hooks) costs more than the
matmuls. This decoder does the same arithmetic as `LlamaForCausalLM` (RMSNorm in fp32, RoPE, GQA attention,
SiLU-gated MLP, last position through the LM head) with less around it:

- a static KV cache [layers, 2, B, kv_heads, P + max_new, head_dim], allocated once per rollout, in fp32 on
  CPU (bf16 keys/values are stored exactly; CPU attention is much faster in fp32 than in bf16);
- fused QKV and gate/up weights (one matmul instead of three / two), concatenated from the model's current
  weights when the decoder is built, i.e. at the start of every rollout, so training updates are always seen
  (the fused buffers are kept per model and refilled in place; skipped when no weight changed);
- a cos/sin table for every position the rollout can reach, computed once with the model's own inverse
  frequencies, gathered by the position ids (which respect left padding);
- only the last position's hidden state goes through the LM head.

`build_decoder` returns None for anything it does not reproduce exactly (LoRA-injected layers, biases,
rope types whose frequencies depend on the length, other architectures ...); the sampler then uses the HF
model. tests/rollout/test_fast_llama.py checks the logits against HF's at prefill and at every decode step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

# RoPE variants whose inverse frequencies are fixed (not re-computed from the sequence length at run time):
# for these, positions x model.rotary_emb.inv_freq (x attention_scaling) is exactly what HF computes.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def unsupported_reason(model) -> str | None:
    """Why the fast decoder cannot reproduce `model` exactly, or None if it can."""
    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not LlamaForCausalLM"
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE_TYPES:
        return f"rope_type {rope.get('rope_type')!r}"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "attention or MLP bias"
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if model.training and getattr(cfg, "attention_dropout", 0.0) > 0:
        return "attention dropout in training mode"
    if getattr(cfg, "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1"
    if cfg.num_key_value_heads != cfg.num_attention_heads and torch.torch_version.TorchVersion(torch.__version__) < "2.5":
        return "grouped-query attention needs torch >= 2.5 (scaled_dot_product_attention's enable_gqa)"
    # LoRA/PEFT injects its own layer types in place of nn.Linear; quantised layers likewise.
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            return f"{name} is {type(module).__name__}"
        if any(hasattr(module, a) for a in ("lora_A", "base_layer")):
            return f"{name} is an adapter layer"
    if type(model.model.embed_tokens) is not nn.Embedding:
        return "embedding is not nn.Embedding"
    if len({p.dtype for p in model.parameters()}) != 1:
        return "parameters of mixed dtypes"
    return None


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


# The fused QKV and gate/up weights of each model, kept between rollouts: refilled in place (a fresh 100-200 MB
# allocation costs more in page faults than the copy itself) and only when a source weight changed since (its
# storage or its in-place version counter, which optimizer steps and SamplingCopy.refresh move).
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused(model, groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """torch.cat of each group of weights, reusing the model's previous result when nothing changed."""
    key = [(w.data_ptr(), w._version, w.shape, w.dtype) for g in groups for w in g]
    cached = _FUSED.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    outs = cached[1] if cached is not None and len(cached[1]) == len(groups) else [None] * len(groups)
    result = []
    for g, out in zip(groups, outs):
        shape = (sum(w.shape[0] for w in g), *g[0].shape[1:])
        if out is None or out.shape != shape or out.dtype != g[0].dtype or out.device != g[0].device:
            out = torch.empty(shape, dtype=g[0].dtype, device=g[0].device)
        result.append(torch.cat([w.detach() for w in g], out=out))
    _FUSED[model] = (key, result)
    return result


def layer_weights(model, layers) -> list[LayerWeights]:
    groups = []
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        groups += [[att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], [mlp.gate_proj.weight, mlp.up_proj.weight]]
    cat = fused(model, groups)
    return [LayerWeights(input_norm=layer.input_layernorm.weight.detach(), qkv=cat[2 * i],
                         o=layer.self_attn.o_proj.weight.detach(), post_norm=layer.post_attention_layernorm.weight.detach(),
                         gate_up=cat[2 * i + 1], down=layer.mlp.down_proj.weight.detach())
            for i, layer in enumerate(layers)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one op, the same numbers as LlamaRMSNorm's five
        return F.rms_norm(x, weight.shape, weight, eps)
    # As LlamaRMSNorm: statistics in fp32, the product in the model's dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class FastLlamaDecoder:
    """Prefill a left-padded batch of prompts, then decode one token per row per step; returns last-position logits.

    Usage (what opd.rollout.sampler does):
        dec = build_decoder(model, batch=B, max_len=P + max_new)   # None -> use the HF model
        logits = dec.prefill(prompt_ids, prompt_mask, position_ids) # [B, vocab]
        logits = dec.step(tokens, attention_mask[:, :P + t + 1], next_positions)
    """

    def __init__(self, model: LlamaForCausalLM, batch: int, max_len: int):
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.gqa = {"enable_gqa": True} if self.heads != self.kv_heads else {}  # the keyword exists from torch 2.5
        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()  # the embedding itself when tied
        self.layers = layer_weights(model, model.model.layers[: cfg.num_hidden_layers])
        # On CPU keys and values are kept (exactly) in fp32 and attention runs in fp32 whatever the weights' dtype:
        # the CPU bf16 attention kernel is ~5x slower than the fp32 one at decode shapes, and the cache is small.
        att_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.cache = torch.empty((len(self.layers), 2, batch, self.kv_heads, max_len, self.head_dim),
                                 dtype=att_dtype, device=self.device)
        # cos/sin of every position the rollout can reach (a left-padded row's positions stay below max_len).
        rotary = model.model.rotary_emb
        freqs = torch.arange(max_len, device=self.device, dtype=torch.float)[:, None] * rotary.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)
        self.sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)
        self.filled = 0  # cache positions written so far

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        P = input_ids.shape[1]
        real = attention_mask.bool()
        causal = torch.ones((P, P), dtype=torch.bool, device=self.device).tril()
        # A padding query sees only itself: it never reaches a real row, but a row with no key at all would turn
        # its keys/values into NaN in the next layer, and 0 x NaN is still NaN in the attention's product.
        eye = torch.eye(P, dtype=torch.bool, device=self.device)
        mask = ((causal & real[:, None, :]) | eye)[:, None]  # [B, 1, P, P]
        self.filled = 0
        return self._forward(input_ids, position_ids, mask)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row; `attention_mask` covers every cached position plus this one."""
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, filled + 1]
        return self._forward(tokens[:, None], position_ids, mask)

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        start, end = self.filled, self.filled + T
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[position_ids][:, None], self.sin[position_ids][:, None]  # [B, 1, T, D]
        x = F.embedding(ids, self.embed)
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, self.eps)
            qkv = F.linear(h, w.qkv).view(B, T, H + 2 * KV, D).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + KV], cos, sin)  # queries and keys rotated in one go
            keys, values = self.cache[i, 0, :B], self.cache[i, 1, :B]
            keys[:, :, start:end] = qk[:, H:]
            values[:, :, start:end] = qkv[:, H + KV :]
            att = F.scaled_dot_product_attention(qk[:, :H].to(keys.dtype), keys[:, :, :end], values[:, :, :end],
                                                 attn_mask=mask, scale=self.scale, **self.gqa)
            x = x + F.linear(att.transpose(1, 2).reshape(B, T, H * D).to(x.dtype), w.o)
            gate, up = F.linear(rms_norm(x, w.post_norm, self.eps), w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        self.filled = end
        return F.linear(rms_norm(x[:, -1], self.final_norm, self.eps), self.lm_head)


def build_decoder(model, batch: int, max_len: int) -> FastLlamaDecoder | None:
    """The fast decoder for `model`, or None when it does not support it (use the HF model then)."""
    if unsupported_reason(model) is not None:
        return None
    return FastLlamaDecoder(model, batch, max_len)
