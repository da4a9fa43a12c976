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
- only the last position's hidden state goes through the LM head;
- int8 decode steps in fp32 (rollout.dtype = "int8" where opd's int8 kernel builds) run as a single C call for
  every layer (`NativeStep`, csrc/decode_step.c) instead of ~600 small torch ops: 2.3x faster a step at batch 4.

The layer arithmetic (fused weights, RMSNorm, RoPE) is shared with the teacher's scoring forward (opd.llama).
`build_decoder` returns None for anything it does not reproduce exactly (LoRA-injected layers, biases,
rope types whose frequencies depend on the length, other architectures ...); the sampler then uses the HF
model. tests/rollout/test_fast_llama.py checks the logits against HF's at prefill and at every decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from opd.llama import (head_dim, int8_linear, int8_supported, int8_weights, layer_sources, layer_weights, rms_norm, rope_,
                       rope_table, silu_mul, unsupported_reason)
from opd import cpu_kernels, matmul


class FastLlamaDecoder:
    """Prefill a left-padded batch of prompts, then decode one token per row per step; returns last-position logits.

    Usage (what opd.rollout.sampler does):
        dec = build_decoder(model, batch=B, max_len=P + max_new)   # None -> use the HF model
        logits = dec.prefill(prompt_ids, prompt_mask, position_ids) # [B, vocab]
        logits = dec.step(tokens, attention_mask[:, :P + t + 1], next_positions)
    """

    def __init__(self, model: LlamaForCausalLM, batch: int, max_len: int, int8: bool = False, native: bool = True):
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.gqa = {"enable_gqa": True} if self.heads != self.kv_heads else {}  # the keyword exists from torch 2.5
        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()  # the embedding itself when tied
        self.layers = layer_weights(model, model.model.layers[: cfg.num_hidden_layers])
        # rollout.dtype = "int8": decode steps (one token a row) read int8 copies of the matmul weights, a quarter of
        # fp32's bytes; the prefill (many rows at once, where the int8 kernel is slow) keeps the model's own weights.
        self.int8 = None
        if int8 and int8_supported(self.device, self.dtype):
            layers = model.model.layers[: cfg.num_hidden_layers]
            flat = int8_weights(model, [t for w in self.layers for t in (w.qkv, w.o, w.gate_up, w.down)] + [self.lm_head],
                                sources=layer_sources(layers) + [model.lm_head.weight])
            self.int8 = [flat[4 * i : 4 * i + 4] for i in range(len(self.layers))] + [flat[-1:]]
        # Where the int8 products take fp32 activations (opd's own kernel, also for a bf16 copy: int8_kernel_dtype),
        # decode steps run in fp32 throughout: no bf16 round trip around every product and norm (~180 small casts a
        # step), and activations as exact as the fp32 student's (up to the VNNI build's int16 rounding inside the
        # products); the prefill keeps the model's dtype.
        self.step_dtype = self.dtype
        if self.int8 is not None and self.int8[0][0].scale.dtype == torch.float32:
            self.step_dtype = torch.float32
        self.step_norms = [(w.input_norm.to(self.step_dtype), w.post_norm.to(self.step_dtype)) for w in self.layers]
        self.step_final_norm = self.final_norm.to(self.step_dtype)
        # On CPU keys and values are kept (exactly) in fp32 and attention runs in fp32 whatever the weights' dtype:
        # the CPU bf16 attention kernel is ~5x slower than the fp32 one at decode shapes, and the cache is small.
        att_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.cache = torch.empty((len(self.layers), 2, batch, self.kv_heads, max_len, self.head_dim),
                                 dtype=att_dtype, device=self.device)
        # cos/sin of every position the rollout can reach (a left-padded row's positions stay below max_len).
        self.cos, self.sin = rope_table(model, max_len, self.dtype, self.device)
        self.step_cos, self.step_sin = (self.cos, self.sin) if self.step_dtype == self.dtype else \
            rope_table(model, max_len, self.step_dtype, self.device)
        self.filled = 0  # cache positions written so far
        # Int8 decode steps in fp32 on the CPU run as one C call for all layers (csrc/decode_step.c): the ~600 small
        # torch ops of a step around its products cost about as much as the products (bench/NOTES.md, session 12).
        self.native = None
        if (native and self.int8 is not None and self.step_dtype == torch.float32 and self.device.type == "cpu"
                and cpu_kernels.int8_gemv_available()):
            self.native = NativeStep(self, batch, max_len, intermediate=self.layers[0].gate_up.shape[0] // 2)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        P = input_ids.shape[1]
        real = attention_mask.bool()
        causal = torch.ones((P, P), dtype=torch.bool, device=self.device).tril()
        # A padding query sees only itself: it never reaches a real row, but a row with no key at all would turn
        # its keys/values into NaN in the next layer, and 0 x NaN is still NaN in the attention's product.
        eye = torch.eye(P, dtype=torch.bool, device=self.device)
        mask = ((causal & real[:, None, :]) | eye)[:, None]  # [B, 1, P, P]
        self.filled = 0
        return self._forward(input_ids, position_ids, mask, decode=False)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row; `attention_mask` covers every cached position plus this one."""
        if self.native is not None:
            logits = self.native(tokens, attention_mask, position_ids, start=self.filled)
            self.filled += 1
            return logits
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, filled + 1]
        return self._forward(tokens[:, None], position_ids, mask, decode=True)

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, decode: bool) -> torch.Tensor:
        B, T = ids.shape
        start, end = self.filled, self.filled + T
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        q8 = self.int8 if decode else None  # the prefill keeps the model's own weights, a 1-token prompt's too
        step = q8 is not None  # a decode step with int8 products: in step_dtype
        cos_table, sin_table = (self.step_cos, self.step_sin) if step else (self.cos, self.sin)
        gathered = cos_table[position_ids][:, :, None], sin_table[position_ids][:, :, None]  # [B, T, 1, D]
        positions = position_ids.to(torch.int64).contiguous()

        def linear(x: torch.Tensor, w: torch.Tensor, layer: int, which: int) -> torch.Tensor:
            return matmul.linear(x, w) if q8 is None else int8_linear(x, q8[layer][which])

        x = F.embedding(ids, self.embed)
        if step:
            x = x.to(self.step_dtype)
        for i, w in enumerate(self.layers):
            input_norm, post_norm = self.step_norms[i] if step else (w.input_norm, w.post_norm)
            h = rms_norm(x, input_norm, self.eps)
            qkv = linear(h, w.qkv, i, 0).view(B, T, H + 2 * KV, D)
            qk = rope_(qkv, H + KV, (cos_table, sin_table), positions, gathered).transpose(1, 2)  # queries and keys
            qkv = qkv.transpose(1, 2)
            keys, values = self.cache[i, 0, :B], self.cache[i, 1, :B]
            keys[:, :, start:end] = qk[:, H:]
            values[:, :, start:end] = qkv[:, H + KV :]
            att = F.scaled_dot_product_attention(qk[:, :H].to(keys.dtype), keys[:, :, :end], values[:, :, :end],
                                                 attn_mask=mask, scale=self.scale, **self.gqa)
            x = x + linear(att.transpose(1, 2).reshape(B, T, H * D).to(x.dtype), w.o, i, 1)
            x = x + linear(silu_mul(linear(rms_norm(x, post_norm, self.eps), w.gate_up, i, 2)), w.down, i, 3)
        self.filled = end
        if self.int8 is not None and not step:
            # the prefill's last positions through the int8 head, as every decode step's: the first token is drawn
            # like the others, and the head's read is its int8 copy (28 MB for SmolLM2's, not 56; ~3 -> ~1 ms)
            last = rms_norm(x[:, -1].to(self.step_dtype), self.step_final_norm, self.eps)
            return int8_linear(last, self.int8[-1][0])
        return linear(rms_norm(x[:, -1], self.step_final_norm if step else self.final_norm, self.eps), self.lm_head, -1, 0)


class NativeStep:
    """FastLlamaDecoder's int8 decode step as one call of opd_decode_step (csrc/decode_step.c): the same arithmetic
    as `_forward` with T = 1 in fp32, over the decoder's own int8 weights, norms, RoPE table and KV cache. Holds
    the raw pointers of the decoder's tensors, so it lives as long as the decoder (one rollout)."""

    def __init__(self, dec: FastLlamaDecoder, batch: int, max_len: int, intermediate: int):
        layers, (head,) = dec.int8[:-1], dec.int8[-1]
        self.tensors = [dec.embed, dec.cache, dec.step_cos, dec.step_sin, dec.step_final_norm]  # kept alive
        a = cpu_kernels.DecodeStep()
        a.batch, a.hidden, a.heads, a.kv_heads, a.head_dim = batch, dec.embed.shape[1], dec.heads, dec.kv_heads, dec.head_dim
        a.inter, a.layers, a.vocab, a.eps, a.scale = intermediate, len(layers), head.q.shape[0], dec.eps, dec.scale
        for i, name in enumerate(("qkv", "o", "gu", "down")):
            setattr(a, f"{name}_q", self._pointers([w[i].q for w in layers]))
            setattr(a, f"{name}_s", self._pointers([w[i].scale for w in layers]))
        a.in_norm = self._pointers([n[0].contiguous() for n in dec.step_norms])
        a.post_norm = self._pointers([n[1].contiguous() for n in dec.step_norms])
        a.final_norm, a.head_q, a.head_s = dec.step_final_norm.data_ptr(), head.q.data_ptr(), head.scale.data_ptr()
        self.tensors += [head.q, head.scale]
        assert dec.embed.is_contiguous() and dec.embed.dtype in (torch.float32, torch.bfloat16)
        a.embed, a.embed_bf16 = dec.embed.data_ptr(), int(dec.embed.dtype == torch.bfloat16)
        self.vocab_rows = dec.embed.shape[0]
        a.cache, a.cache_batch, a.max_len = dec.cache.data_ptr(), batch, max_len
        a.cos, a.sin = dec.step_cos.data_ptr(), dec.step_sin.data_ptr()
        self.scratch = torch.empty(cpu_kernels.decode_scratch_floats(batch, a.hidden, a.heads, a.kv_heads, a.head_dim,
                                                                     intermediate, max_len))
        a.scratch = self.scratch.data_ptr()
        self.args = a

    def _pointers(self, tensors: list[torch.Tensor]) -> int:
        assert all(t.is_contiguous() and t.dtype in (torch.int8, torch.float32) for t in tensors)
        self.tensors += tensors
        table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
        self.tensors.append(table)
        return table.data_ptr()

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor:
        B = tokens.shape[0]
        # The C code indexes raw memory: what torch's ops would refuse with an error must not get that far.
        if B > self.args.cache_batch or start >= self.args.max_len or attention_mask.shape != (B, start + 1):
            raise ValueError(f"decode step of {B} rows at cache position {start} with a mask of "
                             f"{tuple(attention_mask.shape)}: the decoder holds {self.args.cache_batch} rows and "
                             f"{self.args.max_len} positions, and the mask must cover every cached position plus this one")
        if B and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.vocab_rows:
            raise IndexError(f"token ids {tokens.tolist()} outside the embedding's {self.vocab_rows} rows")
        tokens, positions = tokens.to(torch.int64).contiguous(), position_ids.to(torch.int64).reshape(B, -1)
        if B and not 0 <= int(positions.min()) <= int(positions.max()) < self.args.max_len:
            raise IndexError(f"positions {positions.flatten().tolist()} outside the RoPE table's {self.args.max_len}")
        mask = attention_mask.to(torch.int64)
        if mask.stride(1) != 1:
            mask = mask.contiguous()
        logits = torch.empty(B, self.args.vocab)
        a = self.args
        a.batch, a.tokens, a.positions, a.pos_stride = B, tokens.data_ptr(), positions.data_ptr(), positions.stride(0)
        a.mask, a.mask_stride, a.start, a.logits = mask.data_ptr(), mask.stride(0), start, logits.data_ptr()
        cpu_kernels.decode_step(a)
        return logits


def build_decoder(model, batch: int, max_len: int, int8: bool = False) -> FastLlamaDecoder | None:
    """The fast decoder for `model`, or None when it does not support it (use the HF model then)."""
    if unsupported_reason(model) is not None:
        return None
    return FastLlamaDecoder(model, batch, max_len, int8=int8)
