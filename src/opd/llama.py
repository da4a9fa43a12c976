"""The Llama arithmetic opd runs itself, shared by the rollout's decoder and the teacher's scoring forward.

Hugging Face's `LlamaForCausalLM` forward spends much of a small model's time around its matmuls (mask
building, RMSNorm as five ops, dtype round trips, output dataclasses). The hot paths of the loop run the same
arithmetic here instead:

- `opd.rollout.fast_llama` decodes with a static KV cache (prefill, then one token a step);
- `causal_hidden` runs whole sequences without grad (teacher scoring, evaluation, the reference model) over
  rows that opd.logprobs has left-aligned, so plain causal attention is exact and no [B, L, L] mask exists.

`unsupported_reason` says when a model is outside what these reproduce; callers then use the HF model.
tests/test_logprobs.py and tests/rollout/test_fast_llama.py compare both against HF.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from opd import cpu_kernels, matmul

# RoPE variants whose inverse frequencies are fixed (not re-computed from the sequence length at run time):
# for these, positions x model.rotary_emb.inv_freq (x attention_scaling) is exactly what HF computes.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def unsupported_reason(model) -> str | None:
    """Why opd's Llama forward cannot reproduce `model` exactly, or None if it can."""
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
        # (looked up in the module's own dicts: hasattr on a missing name goes through Module.__getattr__'s
        # exception, ~1.5 ms a call for a 30-layer model, and the teacher asks on every score)
        if any(a in module._modules or a in module.__dict__ for a in ("lora_A", "base_layer")):
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


# The fused QKV and gate/up weights of each model, kept between calls: refilled in place (a fresh 100-200 MB
# allocation costs more in page faults than the copy itself) and only when a source weight changed since (its
# storage or its in-place version counter, which SamplingCopy.refresh and update.step.step_optimizer move).
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(weights: list[torch.Tensor]) -> list[tuple]:
    return [(w.data_ptr(), w._version, w.shape, w.dtype) for w in weights]


def _rebuilt_when_changed(store: weakref.WeakKeyDictionary, model, weights: list[torch.Tensor], build,
                          sources: list[torch.Tensor] | None = None):
    """The model's last `build(previous)` result while none of `sources` (the tensors it is made from; `weights` by
    default) changed (storage or in-place version); otherwise `build(previous)` again, handed the last result (or
    None) so it can refill those buffers in place. The store keeps (key, result, weights, sources)."""
    sources = weights if sources is None else sources
    key = _weights_key(sources)
    cached = store.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = build(None if cached is None else cached[1])
    store[model] = (key, result, weights, sources)
    return result


def _adjacent(group: list[torch.Tensor]) -> bool:
    """The group's weights lie one after another in one storage, each contiguous (fuse_storage made them so)."""
    first = group[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.shape[1:] == first.shape[1:] and w.device == first.device
               and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for w in group):
        return False
    return all(b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(group, group[1:]))


def fused(model, groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """torch.cat of each group of weights, reusing the model's previous result when nothing changed; a view of the
    weights themselves (no copy) where they already lie one after another (fuse_storage)."""

    def build(previous):
        outs = previous if previous is not None and len(previous) == len(groups) else [None] * len(groups)
        result = []
        for g, out in zip(groups, outs):
            shape = (sum(w.shape[0] for w in g), *g[0].shape[1:])
            if _adjacent(g):
                result.append(torch.as_strided(g[0].detach(), shape, g[0].stride()))
                continue
            if out is None or out.shape != shape or out.dtype != g[0].dtype or out.device != g[0].device \
                    or out.untyped_storage().data_ptr() == g[0].untyped_storage().data_ptr():
                out = torch.empty(shape, dtype=g[0].dtype, device=g[0].device)
            result.append(torch.cat([w.detach() for w in g], out=out))
        return result

    return _rebuilt_when_changed(_FUSED, model, [w for g in groups for w in g], build)


def _fused_groups(layer) -> list[list[torch.Tensor]]:
    att, mlp = layer.self_attn, layer.mlp
    return [[att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], [mlp.gate_proj.weight, mlp.up_proj.weight]]


def layer_sources(layers) -> list[torch.Tensor]:
    """The parameters that layer_weights' weights of `layers` are made of (what their caches are keyed on)."""
    sources = []
    for layer in layers:
        qkv, gate_up = _fused_groups(layer)
        sources += [*qkv, layer.self_attn.o_proj.weight, *gate_up, layer.mlp.down_proj.weight]
    return sources


@torch.no_grad()
def fuse_storage(model) -> int:
    """Move each Llama layer's Q, K, V weights into one buffer, one after another, and its gate and up weights into
    another (the parameters become views of them): `fused` then hands out those buffers as they are instead of
    concatenating the weights again before every rollout (~6 ms for the 81M half-depth student, session 18). For a
    model that no longer trains in place of anything else: SamplingCopy's copy, whose optimizer writes the views
    (opd.update.bf16). Layers that are not plain Llama ones (LoRA-wrapped projections, biases) are left alone;
    returns how many groups moved."""
    moved = 0
    for layer in getattr(getattr(model, "model", None), "layers", []):
        try:
            projections = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj]
        except AttributeError:
            continue
        if not all(type(m) is torch.nn.Linear and m.bias is None for m in projections):
            continue
        for group in _fused_groups(layer):
            if _adjacent(group) or len({(w.dtype, w.device, w.shape[1:]) for w in group}) != 1:
                continue
            base = torch.cat([w.detach() for w in group])
            start = 0
            for w in group:
                w.data = base[start : start + w.shape[0]]
                start += w.shape[0]
            moved += 1
    return moved


def layer_weights(model, layers) -> list[LayerWeights]:
    groups = [g for layer in layers for g in _fused_groups(layer)]
    cat = fused(model, groups)
    return [LayerWeights(input_norm=layer.input_layernorm.weight.detach(), qkv=cat[2 * i],
                         o=layer.self_attn.o_proj.weight.detach(), post_norm=layer.post_attention_layernorm.weight.detach(),
                         gate_up=cat[2 * i + 1], down=layer.mlp.down_proj.weight.detach())
            for i, layer in enumerate(layers)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if (y := cpu_kernels.rms_norm(x, weight, eps)) is not None:  # bf16 / fp32 on the CPU, no grad: one C pass
        return y
    if x.dtype == torch.float32:  # one op, the same numbers as LlamaRMSNorm's five
        return F.rms_norm(x, weight.shape, weight, eps)
    # As LlamaRMSNorm: statistics in fp32, the product in the model's dtype (3 ops instead of 8: small decode
    # steps pay per op, not per element).
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then rms_norm(x): one C pass for bf16 on the CPU without grad."""
    if (y := cpu_kernels.add_rms_norm_(x, delta, weight, eps)) is not None:
        return y
    return rms_norm(x.add_(delta), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_(qkv: torch.Tensor, heads: int, tables: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
          gathered: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on the first `heads` heads of qkv [B, T, all heads, D] at positions [B, T]; returns them [B, T, heads, D].
    bf16 / fp32 on the CPU without grad: rotated in place in qkv by one C pass (csrc/layer_ops.c) from the
    [positions, D] `tables`; otherwise a new tensor from the torch ops with the `gathered` cos / sin (broadcastable
    to it)."""
    if cpu_kernels.rope_(qkv, heads, *tables, positions):
        return qkv[:, :, :heads]
    return apply_rope(qkv[:, :, :heads], *gathered)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up of the fused gate/up product [..., 2 * intermediate] (one C pass on the CPU)."""
    if (y := cpu_kernels.silu_mul(gate_up)) is not None:
        return y
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_table(model, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] of positions 0 .. length - 1, from the model's own inverse frequencies."""
    rotary = model.model.rotary_emb
    freqs = torch.arange(length, device=device, dtype=torch.float)[:, None] * rotary.inv_freq.float().to(device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rotary.attention_scaling).to(dtype), (emb.sin() * rotary.attention_scaling).to(dtype)


def final_norm(model, x: torch.Tensor) -> torch.Tensor:
    """The model's last RMSNorm (what HF's last_hidden_state has been through)."""
    return rms_norm(x, model.model.norm.weight.detach(), model.config.rms_norm_eps)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ------------------------------------------------------------------------------------- int8 decode weights
@dataclass
class Int8Weight:
    """Weight-only int8 with one scale per output channel: w ~ q * scale[:, None]."""

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out], in the kernel's activation dtype (int8_kernel_dtype)


def int8_kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the int8 products run in for a model of `dtype` (and so its scales' dtype).

    fp32 where opd's own kernel runs them (opd.cpu_kernels: fp32 activations, exact or, in its VNNI build, rounded
    to int16 per row, ~100x finer than bf16): for fp32 models wherever it builds, and for bf16 models where its
    AVX-512 builds run (bf16 activations are exact in fp32; on a Xeon with
    AMX it was faster than torch's kernel, bench/NOTES.md session 11). Otherwise torch's kernel in the model's
    own dtype, and for fp32 models in bf16: their decode activations are then rounded to bf16 (torch's fp32 path
    is ~10-40x slower; the rounding of 4-16 rows is a few microseconds)."""
    if dtype == torch.float32:
        return torch.float32 if cpu_kernels.int8_gemv_available() else torch.bfloat16
    if dtype == torch.bfloat16 and cpu_kernels.variant() in ("avx512", "vnni"):
        return torch.float32
    return dtype


def quantize_int8(w: torch.Tensor, out: Int8Weight | None = None, rows: int = 1024) -> Int8Weight:
    """Symmetric per-output-channel int8 (round to nearest): the largest |w| of each row maps to 127,
    q = round(w * (1 / scale)).

    Block by block of rows, so the fp32 temporaries stay in cache (one pass over the whole weight per op costs
    ~18x more here: 0.6 s for an 80M-parameter model every rollout); written into `out` when given (no fresh
    allocations, whose page faults cost more than the arithmetic). Where the scales are fp32 (opd's int8 kernel),
    one C pass per row writes the same bits (cpu_kernels.quantize_int8_into): the half-depth student's 81M
    weights 92 -> 28 ms a rollout (bench/NOTES.md, session 12)."""
    N, scale_dtype = w.shape[0], int8_kernel_dtype(w.dtype)
    if out is None or out.q.shape != w.shape or out.scale.dtype != scale_dtype:
        out = Int8Weight(torch.empty(w.shape, dtype=torch.int8, device=w.device),
                         torch.empty(N, dtype=scale_dtype, device=w.device))
    w = w.detach()
    if cpu_kernels.quantize_int8_into(w, out.q, out.scale):  # fp32 scales (opd's kernel) only
        return out
    for r in range(0, N, rows):
        block = w[r : r + rows].to(torch.float32, copy=True)  # a copy even for fp32: the product below is in place
        out.scale[r : r + rows] = block.abs().amax(dim=1).div_(127.0).clamp_(min=1e-12)
        # Times the reciprocal of the scale as stored (rounded to the activations' dtype): q * scale is then the
        # nearest step (csrc/quantize.h: a product, not a division per value, with the same bits there).
        inv = out.scale[r : r + rows].float().reciprocal()
        out.q[r : r + rows] = block.mul_(inv[:, None]).round_().clamp_(-127, 127)
    return out


def int8_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x @ (q * scale).T without materialising the weight: a GEMV-style loop that reads each int8 weight once
    (opd's kernel for fp32 scales, else torch's weight-only int8 kernel; for a few rows of x ~3x faster than a
    bf16 matmul streaming from memory, slower than bf16 / fp32 GEMMs for many rows, so only decode steps use it)."""
    rows = x.reshape(-1, x.shape[-1])
    if w.scale.dtype == torch.float32 and cpu_kernels.int8_gemv_available():  # opd's own kernel (int8_kernel_dtype)
        return cpu_kernels.int8_gemv(rows.float(), w.q, w.scale).to(x.dtype).view(*x.shape[:-1], w.q.shape[0])
    scale = w.scale if w.scale.dtype != torch.float32 else w.scale.bfloat16()  # torch's kernel has no fast fp32 path
    if rows.shape[-1] % 16:  # torch's kernel reads 16 (AVX2: 8) inputs at a time: other widths gave wrong sums or a crash
        dequantised = w.q.float() * scale.float()[:, None]
        return torch.nn.functional.linear(rows.float(), dequantised).to(x.dtype).view(*x.shape[:-1], w.q.shape[0])
    out = torch._weight_int8pack_mm(rows.to(scale.dtype), w.q, scale)
    return out.to(x.dtype).view(*x.shape[:-1], w.q.shape[0])


def int8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """The int8 kernels run on CPU, for bf16 models (torch's) and fp32 ones (opd's, or torch's in bf16)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and hasattr(torch, "_weight_int8pack_mm")


_INT8: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INT8_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # int8_rows' last answer per model


def int8_weights(model, weights: list[torch.Tensor], sources: list[torch.Tensor] | None = None) -> list[Int8Weight]:
    """quantize_int8 of each weight, reusing the model's previous result while none of `sources` (the tensors the
    weights are made of, e.g. the parameters behind a fused weight; the weights by default) changed (as `fused`)."""

    def build(previous):
        outs = previous if previous is not None and len(previous) == len(weights) else [None] * len(weights)
        return [quantize_int8(w, out) for w, out in zip(weights, outs)]

    return _rebuilt_when_changed(_INT8, model, weights, build, sources)


def int8_rows(model, tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
    """Where `model`'s int8 decode weights (int8_weights) are current and have fp32 scales (opd's kernel): for each
    of `tensors` (weights of the model, e.g. the Q part of a fused QKV weight), the int8 rows and scales it was
    quantised into, or None for one they do not cover. None where there are no such weights, or where one of
    `tensors` is a source of them without rows of its own (e.g. quantised from a concatenated copy): writing it
    would leave them stale. An optimizer that writes a weight and those rows in one pass then calls int8_written
    (opd.update.bf16)."""
    entry = _INT8.get(model)
    if entry is None or entry[0] != _weights_key(entry[3]):
        return None
    _, result, weights, sources = entry
    where = [(t.data_ptr(), t.shape, t.dtype) for t in tensors]
    memo = _INT8_ROWS.get(model)
    if memo is not None and memo[0] is result and memo[1] == where:  # else the search below: ~3 ms for 137 tensors
        return memo[2]
    found = []
    for t in tensors:
        hit = None
        for w, out in zip(weights, result):
            if (t.dim() == 2 and w.dim() == 2 and t.is_contiguous() and w.is_contiguous() and t.dtype == w.dtype
                    and t.shape[1] == w.shape[1] and out.scale.dtype == torch.float32
                    and t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()):
                offset, rest = divmod(t.data_ptr() - w.data_ptr(), w.stride(0) * w.element_size())
                if rest == 0 and 0 <= offset and offset + t.shape[0] <= w.shape[0]:
                    hit = (out.q[offset : offset + t.shape[0]], out.scale[offset : offset + t.shape[0]])
                    break
        found.append(hit)
    made_of = {id(t) for t in sources}
    if any(hit is None and id(t) in made_of for t, hit in zip(tensors, found)):
        found = None
    _INT8_ROWS[model] = (result, where, found)
    return found


def int8_written(model) -> None:
    """`model`'s int8 decode weights hold its weights as they are now (their writer says so): the next
    int8_weights call reuses them although the weights' version counters moved."""
    key, result, weights, sources = _INT8[model]
    _INT8[model] = (_weights_key(sources), result, weights, sources)


# ------------------------------------------------------------------------------------- whole sequences
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_folded(w: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """W diag(g) in bf16: rms_norm(x, g) @ W^T = inv_rms(x) * (x @ (W diag(g))^T), so a product can take the residual
    stream x itself and scale each output row (cpu_kernels.amx_linear's row_scale) instead of a normed copy of x."""
    return (w.float() * norm_weight.float()).to(w.dtype)


def frozen_layer_weights(model, layers, rows: int) -> list[LayerWeights]:
    """layer_weights for a forward of `rows` positions, packed once the layers' weights were the same in two calls
    in a row (a teacher's, a reference model's: a model whose weights change every step, the student's, never
    packs): all four products as cpu_kernels.AmxWeight where opd's AMX kernel runs (the gate/up one returning
    silu(gate) x up; QKV and gate/up with their RMSNorm weights folded in, see causal_hidden), else the fused QKV and
    gate/up weights as matmul.PackedWeight for oneDNN. The packed weights replace the fused copies (dropped from the
    cache): a frozen model holds its layers' weights twice, not three times."""
    sources = layer_sources(layers) + [n for layer in layers for n in (layer.input_layernorm.weight,
                                                                       layer.post_attention_layernorm.weight)]
    key = _weights_key(sources)
    cached = _PACKED.get(model)
    if cached is not None and cached[0] == key and cached[1] is not None:
        return cached[1]
    weights = layer_weights(model, layers)
    amx = all(cpu_kernels.AmxWeight.fits(t) for w in weights[:1] for t in (w.qkv, w.o, w.gate_up, w.down))
    if not amx and (not matmul.packs(weights[0].qkv) or not matmul.packs(weights[0].gate_up)):
        return weights
    if cached is None or cached[0] != key:
        _PACKED[model] = (key, None)  # seen once: pack if the next call finds the same weights
        return weights
    if amx:
        cfg = model.config
        D = head_dim(cfg)  # RoPE in the QKV product's epilogue where a head is whole pairs of tiles
        rope = dict(rope_heads=cfg.num_attention_heads + cfg.num_key_value_heads, head_dim=D) if D % 32 == 0 else {}
        packed = [replace(w, qkv=cpu_kernels.AmxWeight(_norm_folded(w.qkv, w.input_norm), **rope),
                          o=cpu_kernels.AmxWeight(w.o), down=cpu_kernels.AmxWeight(w.down),
                          gate_up=cpu_kernels.AmxWeight(_norm_folded(w.gate_up, w.post_norm), silu_mul=True))
                  for w in weights]
    else:
        packed = [replace(w, qkv=matmul.PackedWeight(w.qkv, rows), gate_up=matmul.PackedWeight(w.gate_up, rows))
                  for w in weights]
    _FUSED.pop(model, None)
    _PACKED[model] = (key, packed)
    return packed


_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def frozen_head(model) -> cpu_kernels.AmxWeight | None:
    """The model's LM head packed for opd's AMX kernel (cpu_kernels.amx_head_terms), once its weight was the same in
    two calls in a row, as frozen_layer_weights packs; None before then, for a head with a bias, or where the kernel
    does not run here. The packed copy is the head's size again (SmolLM2-135M: 57 MB)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or not cpu_kernels.AmxWeight.fits(head.weight):
        return None
    key = _weights_key([head.weight])
    cached = _HEAD.get(model)
    if cached is None or cached[0] != key:
        _HEAD[model] = (key, None)  # seen once: pack if the next call finds the same weight
        return None
    if cached[1] is None:
        _HEAD[model] = cached = (key, cpu_kernels.AmxWeight(head.weight))
    return cached[1]


def _product(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T: matmul.linear (oneDNN's packed weights, BLAS)."""
    return matmul.linear(x, w)


# An fp32 MLP of more rows than this runs in chunks of it: gate/up's output is 12.6 MB a chunk where it was 25 MB
# at 8 x 256 and 50 MB at 8 x 512, written and read back through memory (the fp32 teacher's forward 5-8% faster at
# 8 x 256, 8 x 512 and 16 x 256; chunks of 2,048 rows were as fast at 8 x 512, of 512 slower; oneDNN's bf16 path was
# 15% slower in chunks, so it keeps whole products; bench/NOTES.md, session 30)
MLP_CHUNK_ROWS = 1024


def _mlp(h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    """silu(h W_gate) * (h W_up) W_down; in fp32 MLP_CHUNK_ROWS rows at a time"""
    rows = h.reshape(-1, h.shape[-1])
    if h.dtype != torch.float32 or rows.shape[0] <= MLP_CHUNK_ROWS:
        return _product(silu_mul(_product(h, w.gate_up)), w.down)
    return torch.cat([_product(silu_mul(_product(rows[r : r + MLP_CHUNK_ROWS], w.gate_up)), w.down)
                      for r in range(0, rows.shape[0], MLP_CHUNK_ROWS)]).view(*h.shape[:-1], -1)


@torch.no_grad()
def causal_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, L, hidden] after the last decoder layer (before the final norm) of rows that start at
    position 0, under plain causal attention. No grad: the fused weights are detached copies."""
    cfg = model.config
    B, L = ids.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    p = next(model.parameters())
    cos, sin = rope_table(model, L, p.dtype, p.device)
    layers = frozen_layer_weights(model, model.model.layers[: cfg.num_hidden_layers], B * L)
    embed = model.model.embed_tokens.weight.detach()
    if layers and isinstance(layers[0].o, cpu_kernels.AmxWeight):
        return _amx_causal_hidden(ids, embed, layers, cos, sin, cfg)
    x = F.embedding(ids, embed)
    positions = torch.arange(L, device=p.device).expand(B, L).contiguous()
    gathered = cos[:, None], sin[:, None]  # [L, 1, D]: broadcast over the heads of a [B, L, heads, D] tensor
    gqa = {"enable_gqa": True} if H != KV else {}
    eps = cfg.rms_norm_eps
    h = rms_norm(x, layers[0].input_norm, eps) if layers else None
    att_out = None  # one buffer for every layer's attention output (its lines still in the caches)
    for i, w in enumerate(layers):
        qkv = _product(h, w.qkv).view(B, L, H + 2 * KV, D)
        # RoPE in the [B, L, heads, D] layout the matmul wrote (contiguous); SDPA takes the transposed views.
        qk = rope_(qkv, H + KV, (cos, sin), positions, gathered)
        # on the CPU (fp32 with AVX-512F, bf16 on the AMX tile unit): [B, L, H, D] in one C pass, which reads qkv:
        # only where RoPE rotated it in place (the torch ops' RoPE returns a rotated copy and leaves qkv as it was)
        att = cpu_kernels.causal_attention(qkv, H, KV, D**-0.5, out=att_out) if qk.data_ptr() == qkv.data_ptr() else None
        att_out = att
        if att is None:
            qk = qk.transpose(1, 2)
            att = F.scaled_dot_product_attention(qk[:, :H], qk[:, H:], qkv[:, :, H + KV :].transpose(1, 2),
                                                 is_causal=True, scale=D**-0.5, **gqa).transpose(1, 2)
        h = add_rms_norm_(x, _product(att.reshape(B, L, H * D), w.o), w.post_norm, eps)
        h = _mlp(h, w)
        h = add_rms_norm_(x, h, layers[i + 1].input_norm, eps) if i + 1 < len(layers) else x.add_(h)
    return x


def _amx_causal_hidden(ids: torch.Tensor, embed: torch.Tensor, layers: list[LayerWeights], cos: torch.Tensor,
                       sin: torch.Tensor, cfg) -> torch.Tensor:
    """causal_hidden on opd's AMX kernels (frozen_layer_weights packed them, the norms folded into QKV and gate/up):
    every product takes the residual stream x itself and scales its rows by x's 1 / rms, which the product that last
    added into x wrote on the way (a norm pass over x and a normed copy of it cost more: o + add + norm 0.71 -> 0.48
    ms at 2,048 rows, down + add + norm 1.54 -> 1.39; bench/NOTES.md, session 29)."""
    B, L = ids.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    rows = (B * L + 15) // 16 * 16  # in whole tiles of 16, as the kernels take them
    x = torch.zeros(rows, embed.shape[1], dtype=embed.dtype)
    torch.index_select(embed, 0, ids.reshape(-1), out=x[: B * L])
    scale = torch.empty(rows)  # x's 1 / rms (each product that adds into x writes the next one's)
    scale_out = (scale, cfg.rms_norm_eps)
    rope = cpu_kernels.amx_rope_table(cos, sin)
    # One buffer each for QKV's output and attention's, written layer after layer: each layer writes the lines the
    # one before wrote, still in the caches, where a new tensor each layer had its lines come from L3 or memory (the
    # 8 x 512 forward 601 -> 569 ms, QKV 82 -> 68, attention 93 -> 83; bench/NOTES.md, session 28). Each is read
    # before the next layer writes it again. The MLP keeps SiLU x up in a buffer of each thread (cpu_kernels.amx_mlp:
    # as two products it went through L3 or memory, session 29).
    qkv_out = torch.empty(rows, (H + 2 * KV) * D, dtype=x.dtype)
    att = torch.zeros(rows, H * D, dtype=x.dtype)  # (its padding rows stay 0: their products are added to x's)
    if rows == B * L and cpu_kernels.amx_layers(x, B, layers, H, KV, rope, cfg.rms_norm_eps, scale, qkv_out, att):
        return x.view(B, L, -1)  # every layer in one call, each thread on its own sequences
    cpu_kernels.row_inv_rms(x, cfg.rms_norm_eps, out=scale)
    positions = None if layers and layers[0].qkv.rope_heads else torch.arange(L).expand(B, L).contiguous()
    for i, w in enumerate(layers):
        if w.qkv.rope_heads:  # rotated by the product itself
            qkv = cpu_kernels.amx_linear(x, w.qkv, rope=rope, row_scale=scale, out=qkv_out)[: B * L]
        else:
            qkv = cpu_kernels.amx_linear(x, w.qkv, row_scale=scale, out=qkv_out)[: B * L]
            rope_(qkv.view(B, L, H + 2 * KV, D), H + KV, (cos, sin), positions, (cos[:, None], sin[:, None]))
        done = cpu_kernels.causal_attention(qkv.view(B, L, H + 2 * KV, D), H, KV, D**-0.5,
                                            out=att[: B * L].view(B, L, H, D))
        if done is None:
            q, k, v = qkv.view(B, L, H + 2 * KV, D).transpose(1, 2).split([H, KV, KV], dim=1)
            gqa = {"enable_gqa": True} if H != KV else {}
            att[: B * L] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5, **gqa) \
                .transpose(1, 2).reshape(B * L, H * D)
        cpu_kernels.amx_linear(att, w.o, add_to=x, scale_out=scale_out)
        cpu_kernels.amx_mlp(x, w.gate_up, w.down, scale, scale_out if i + 1 < len(layers) else None)
    return x[: B * L].view(B, L, -1)
