import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from opd import cpu_kernels
from opd.update.layer_ops import RMSNormBF16, RopeBF16, SiluMulBF16, layer_ops

needs_build = pytest.mark.skipif(not cpu_kernels.bf16_training_ops(),
                                 reason="csrc/layer_ops.c's bf16 training steps need AVX-512 BF16 and a C compiler")


def grads_of(fn, *inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def close(got, want, rel):
    """bf16 results: within `rel` of the reference's largest value (one bf16 rounding either way, ~0.4%)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * float(want.float().abs().max()))


@needs_build
@pytest.mark.parametrize("n", [48, 37])  # a whole number of 16-lane blocks, and a scalar tail
def test_rms_norm_forward_and_backward_are_autograds_on_bf16(n):
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(n, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(3, 5, n, generator=g) * 2).to(torch.bfloat16)
    dy = torch.randn(3, 5, n, generator=g).to(torch.bfloat16)
    want_y, (want_dx, want_dw) = grads_of(lambda x, w: w * LlamaRMSNorm.forward(_unit(n), x), x, norm.weight, dy=dy)
    got_y, (got_dx, got_dw) = grads_of(lambda x, w: RMSNormBF16.apply(x, w, 1e-5), x, norm.weight, dy=dy)
    assert got_y.dtype == got_dx.dtype == got_dw.dtype == torch.bfloat16
    close(got_y, want_y, 1e-2)
    close(got_dx, want_dx, 2e-2)
    close(got_dw, want_dw, 2e-2)
    assert (got_y == want_y).float().mean() > 0.99  # the forward replays the module's roundings


def _unit(n):
    """LlamaRMSNorm with eps 1e-5 and a weight applied outside it (so autograd sees the weight as a leaf)."""
    norm = LlamaRMSNorm(n, eps=1e-5).to(torch.bfloat16)
    norm.forward = lambda x: x.float().mul(torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    return norm


@needs_build
@pytest.mark.parametrize("n", [64, 37])
def test_silu_mul_forward_and_backward_are_autograds_on_bf16(n):
    g = torch.Generator().manual_seed(1)
    gate, up = ((torch.randn(4, 3, n, generator=g) * 3).to(torch.bfloat16) for _ in range(2))
    dy = torch.randn(4, 3, n, generator=g).to(torch.bfloat16)
    want_y, want_grads = grads_of(lambda a, b: F.silu(a) * b, gate, up, dy=dy)
    got_y, got_grads = grads_of(SiluMulBF16.apply, gate, up, dy=dy)
    close(got_y, want_y, 1e-2)
    for got, want in zip(got_grads, want_grads):
        assert got.dtype == torch.bfloat16
        close(got, want, 2e-2)


@needs_build
@pytest.mark.parametrize("D", [64, 40])  # 16-lane blocks only, and a tail
@pytest.mark.parametrize("own_positions", [True, False])  # cos / sin per sequence, or one [1, L, D] for all
def test_rope_forward_and_backward_are_hfs_on_bf16(D, own_positions):
    g = torch.Generator().manual_seed(0)
    B, H, KV, L = 3, 6, 2, 13
    # the projections' layout: [B, L, heads, D] seen as [B, heads, L, D]
    q = torch.randn(B, L, H, D, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(B, L, KV, D, generator=g).bfloat16().transpose(1, 2)
    positions = torch.arange(L)[None] + (torch.tensor([[0], [3], [7]]) if own_positions else 0)
    freqs = positions[..., None].float() / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.cat([freqs, freqs], dim=-1)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    dq, dk = torch.randn(B, H, L, D, generator=g).bfloat16(), torch.randn(B, KV, L, D, generator=g).bfloat16()

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
        outs = fn(*leaves, cos, sin)
        torch.autograd.backward(outs, [dq, dk])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    got, want = run(RopeBF16.apply), run(modeling_llama.apply_rotary_pos_emb)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        close(a, b, 2**-8)
    assert got[0].is_contiguous() and got[1].is_contiguous()  # as HF's ops return them


@needs_build
def test_the_models_norms_and_mlps_take_the_c_steps_and_give_the_same_gradient(student):
    model = copy.deepcopy(student).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    norms = sum(type(m) is LlamaRMSNorm for m in model.modules())
    mlps = sum(type(m) is LlamaMLP for m in model.modules())
    results = []
    for use in (False, True):
        model.zero_grad(set_to_none=True)
        calls = []
        with layer_ops(model) if use else _none() as swapped:
            if use:
                assert swapped == norms + mlps and norms and mlps
                real_norm, real_mlp, real_rope = RMSNormBF16.apply, SiluMulBF16.apply, RopeBF16.apply
                RMSNormBF16.apply = lambda *a: calls.append("norm") or real_norm(*a)
                SiluMulBF16.apply = lambda *a: calls.append("mlp") or real_mlp(*a)
                RopeBF16.apply = lambda *a: calls.append("rope") or real_rope(*a)
            try:
                loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
                loss.backward()
            finally:
                if use:
                    RMSNormBF16.apply, SiluMulBF16.apply, RopeBF16.apply = real_norm, real_mlp, real_rope
        results.append((loss.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
        if use:
            assert calls.count("norm") == norms and calls.count("mlp") == mlps
            assert calls.count("rope") == model.config.num_hidden_layers
    assert not any("forward" in vars(m) for m in model.modules())  # restored
    assert modeling_llama.apply_rotary_pos_emb.__module__ == modeling_llama.__name__
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-2, atol=1e-2)
    assert F.cosine_similarity(g0, g1, dim=0) > 0.999


def _none():
    import contextlib

    return contextlib.nullcontext(0)


def test_fp32_models_keep_their_modules_forward(student):
    model = copy.deepcopy(student)  # fp32: every swapped forward falls back to the module's own
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    want = model(input_ids=x).logits
    with layer_ops(model):
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_build
def test_a_frozen_norm_weight_gets_no_gradient():
    norm = LlamaRMSNorm(32).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 3, 32).to(torch.bfloat16).requires_grad_()
    RMSNormBF16.apply(x, norm.weight, 1e-6).float().sum().backward()
    assert x.grad is not None and norm.weight.grad is None
