"""opd.matmul: fp32 products through oneDNN (forced here, whatever `auto` would pick on this CPU) match torch's
default kernel, in the forward and the backward pass, and only fp32 CPU products are rerouted."""

import pytest
import torch
import torch.nn.functional as F

from opd import matmul

pytestmark = pytest.mark.skipif(not matmul.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture
def kernel(monkeypatch):
    def use(name: str, min_dim: int = 1):
        monkeypatch.setenv("OPD_FP32_MATMUL", name)
        monkeypatch.setattr(matmul, "MIN_DIM", min_dim)  # small shapes below: reroute them unless a test says
        matmul.fp32_kernel.cache_clear()
        matmul.onednn_rows_below.cache_clear()

    yield use
    matmul.fp32_kernel.cache_clear()
    matmul.onednn_rows_below.cache_clear()


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = matmul._onednn_linear

    def counting(x, w, bias=None):
        seen.append((tuple(x.shape), tuple(w.shape), bias is not None))
        return real(x, w, bias)

    monkeypatch.setattr(matmul, "_onednn_linear", counting)
    return seen


def test_linear_matches_f_linear(kernel, calls):
    kernel("onednn")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 7, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    for bias in (None, b):
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        out = matmul.linear(x, w, bias)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert (out.double() - ref).abs().max() < 1e-4
    assert len(calls) == 2


def test_linear_leaves_bf16_and_tracked_inputs_to_torch(kernel, calls):
    kernel("onednn")
    x, w = torch.randn(5, 16), torch.randn(8, 16, requires_grad=True)
    matmul.linear(x, w).sum().backward()  # autograd needs F.linear's graph
    assert w.grad is not None  # the sum of 5 rows: fp32 rounding, in whatever order the BLAS sums them
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 16))
    matmul.linear(x.bfloat16(), w.detach().bfloat16())
    assert calls == []
    with torch.no_grad():
        matmul.linear(x, w)
    assert len(calls) == 1


def test_blas_choice_never_reroutes(kernel, calls):
    kernel("blas")
    model = torch.nn.Linear(16, 8)
    with matmul.onednn_fp32(model):
        model(torch.randn(4, 16)).sum().backward()
    with torch.no_grad():
        matmul.linear(torch.randn(4, 16), torch.randn(8, 16))
    assert calls == []


def test_unknown_choice_is_a_clear_error(kernel):
    kernel("fast")
    with pytest.raises(ValueError, match="OPD_FP32_MATMUL='fast'.*auto, onednn, blas"):
        matmul.fp32_kernel()
    kernel("fast", min_dim=256)  # a product too small to reroute still says so (it ran, the setting unread)
    with pytest.raises(ValueError, match="OPD_FP32_MATMUL='fast'"):
        matmul.linear(torch.randn(4, 16), torch.randn(8, 16))
    kernel("")  # set but empty: the default, as unset
    assert matmul.fp32_kernel() in ("onednn", "blas")


@pytest.mark.parametrize("vendor, works, want", [("AuthenticAMD", True, "onednn"), ("AuthenticAMD", False, "blas"),
                                                 ("GenuineIntel", True, "blas"), ("", True, "blas")])
def test_auto_decides_by_the_cpu_and_falls_back_where_onednn_cannot_run(kernel, monkeypatch, vendor, works, want):
    # by the CPU, not by a timing: every process of one run (a teacher server, a resumed run) picks the same kernel
    monkeypatch.setattr(matmul, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(matmul, "_onednn_runs_fp32", lambda: works)
    kernel("auto")
    assert matmul.fp32_kernel() == want


@pytest.mark.parametrize("flags, limit", [({"avx2", "fma"}, matmul.FEW_ROWS), ({"avx2", "avx512f"}, None)])
def test_auto_on_amd_without_avx512_reroutes_only_products_of_few_rows(kernel, calls, monkeypatch, flags, limit):
    # Zen 2/3: MKL's AVX2 code beats oneDNN's on many rows, oneDNN wins at decode shapes; Zen 4/5: oneDNN always
    monkeypatch.setattr(matmul, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(matmul, "cpu_flags", lambda: frozenset(flags))
    kernel("auto")
    assert matmul.fp32_kernel() == "onednn" and matmul.onednn_rows_below() == limit
    calls.clear()  # the probe's product
    w = torch.randn(16, 8)
    with torch.no_grad():
        matmul.linear(torch.randn(2, 4, 8), w)  # 8 rows
        matmul.linear(torch.randn(2, matmul.FEW_ROWS // 2, 8), w)  # FEW_ROWS rows
    with matmul.onednn_fp32():
        a = torch.randn(matmul.FEW_ROWS, 8, requires_grad=True)
        (a @ torch.randn(8, 16)).sum().backward()  # forward FEW_ROWS rows; a's gradient FEW_ROWS rows
    rows = [x[0] * (x[1] if len(x) == 3 else 1) for x, _, _ in calls]
    assert rows == ([8] if limit else [8, matmul.FEW_ROWS, matmul.FEW_ROWS, matmul.FEW_ROWS])


def test_the_probe_runs_onednn_here():
    assert matmul._onednn_runs_fp32()  # fp32 oneDNN products run on every x86-64 CPU torch supports


def test_small_products_and_small_models_stay_with_blas(kernel, calls):
    # oneDNN costs more per call and the mode a Python call per op: only products whose inner and output
    # dimensions reach MIN_DIM are rerouted, and a model without such a weight never enters the mode
    kernel("onednn", min_dim=matmul.MIN_DIM)
    d = matmul.MIN_DIM
    with torch.no_grad():
        matmul.linear(torch.randn(4, d - 1), torch.randn(d, d - 1))
        matmul.linear(torch.randn(4, d), torch.randn(d - 1, d))
    assert calls == []
    matmul.linear(torch.randn(4, d), torch.randn(d, d))
    assert len(calls) == 1
    small = mlp()
    with matmul.onednn_fp32(small):
        assert not getattr(matmul._ACTIVE, "on", False)  # the mode was not entered
        small(torch.randn(4, 32)).sum().backward()
    assert len(calls) == 1
    large = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Linear(d, 8))
    with matmul.onednn_fp32(large):
        large(torch.randn(d + 44, d)).sum().backward()
    # rerouted: the first layer's forward and both weight gradients (inner dimension = the d + 44 rows); not: the
    # second layer's forward (8 outputs) and the gradient into the first layer's output (inner dimension 8)
    assert len(calls) == 4


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16, bias=False))


def test_mode_reroutes_forward_and_backward_with_the_same_results(kernel, calls):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    kernel("blas")
    ref_model = mlp()
    ref_out = ref_model(x)
    ref_out.square().sum().backward()
    kernel("onednn")
    model = mlp()
    with matmul.onednn_fp32(model):
        out = model(x)
        out.square().sum().backward()
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4)
    # forward: addmm (bias) and mm; backward: grad @ W and grad.T @ x of each layer (the first input needs no grad)
    assert any(bias for _, _, bias in calls) and len(calls) >= 5


def test_mode_is_inactive_for_bf16_models_and_reentrant(kernel, calls):
    kernel("onednn")
    model = mlp().bfloat16()
    with matmul.onednn_fp32(model):
        model(torch.randn(4, 32, dtype=torch.bfloat16))
    assert calls == []
    fp32 = mlp()
    with matmul.onednn_fp32(fp32), matmul.onednn_fp32(fp32):
        assert len(torch.utils._python_dispatch._get_current_dispatch_mode_stack()) == 1
        fp32(torch.randn(4, 32))
    assert len(calls) == 2


needs_packing = pytest.mark.skipif(not matmul.packs(torch.zeros(8, 4, dtype=torch.bfloat16)),
                                   reason="oneDNN's packed bf16 weights are used on CPUs with AMX only")


@needs_packing
def test_a_packed_weight_gives_the_products_of_the_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(160, 48, generator=g).bfloat16()
    packed = matmul.PackedWeight(w, 64)
    for rows in (1, 37, 64, 200):  # packed for 64 rows, right for any number
        x = torch.randn(2, rows, 48, generator=g).bfloat16()
        torch.testing.assert_close(matmul.linear(x, packed), F.linear(x, w), rtol=1e-2, atol=1e-2)
    assert not matmul.packs(w.float()) and not matmul.packs(w[:40])  # fp32; fewer outputs than inputs


@needs_packing
def test_a_frozen_models_layers_pack_on_the_second_call_and_unpack_when_a_weight_changes(tokenizer):
    from opd import llama
    from tests.rollout.test_fast_llama import gqa_model

    model = gqa_model(tokenizer).to(torch.bfloat16)
    ids = torch.randint(4, 60, (2, 24), generator=torch.Generator().manual_seed(1))
    layers = model.model.layers
    first = llama.frozen_layer_weights(model, layers, 48)
    assert not isinstance(first[0].qkv, matmul.PackedWeight)  # seen once: the fused weights as they are
    packed_layers = llama.frozen_layer_weights(model, layers, 48)  # the same weights again: packed
    assert all(isinstance(w.qkv, matmul.PackedWeight) and isinstance(w.gate_up, matmul.PackedWeight)
               for w in packed_layers)
    assert model not in llama._FUSED  # the packed weights replace the fused copies
    packed = llama.causal_hidden(model, ids)
    llama._PACKED.pop(model)
    plain = llama.causal_hidden(model, ids)  # seen once again: unpacked
    assert not isinstance(llama._PACKED[model][1], list)
    torch.testing.assert_close(packed, plain, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        layers[1].mlp.up_proj.weight.add_(0.5)  # a write: the packed weights are stale
    changed = llama.frozen_layer_weights(model, layers, 48)
    assert not isinstance(changed[1].gate_up, matmul.PackedWeight)
    assert torch.equal(changed[1].gate_up[-layers[1].mlp.up_proj.weight.shape[0]:], layers[1].mlp.up_proj.weight)
    assert isinstance(llama.frozen_layer_weights(model, layers, 48)[1].gate_up, matmul.PackedWeight)  # frozen again
