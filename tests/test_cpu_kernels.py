import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd import cpu_kernels, matmul
from opd.llama import int8_kernel_dtype, int8_linear, quantize_int8

needs_kernel = pytest.mark.skipif(not cpu_kernels.int8_gemv_available(),
                                  reason="opd's int8 kernel needs an x86 CPU with AVX2 + FMA and a C compiler")


# Every build of opd's kernel this CPU runs: "auto" is the VNNI one on CPUs with AVX-512 VNNI.
FLAGS = matmul.cpu_flags()
BUILDS = ["avx2"] + (["avx512"] if "avx512f" in FLAGS else []) + (["auto"] if cpu_kernels.VNNI_FLAGS <= FLAGS else [])


@needs_kernel
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("B, N, K", [(1, 64, 576), (4, 1536, 576), (3, 67, 37), (5, 130, 1536), (16, 33, 8), (9, 1, 12),
                                     (4, 5, 16), (6, 131, 47), (8, 960, 576), (16, 576, 1536)])
def test_int8_gemv_equals_the_dequantised_product(B, N, K, build, fresh_kernel):
    fresh_kernel.setenv("OPD_INT8_KERNEL", build)
    assert cpu_kernels.variant() == ("vnni" if build == "auto" else build)
    g = torch.Generator().manual_seed(B * N + K)
    x = torch.randn(B, K, generator=g)
    x[0, K // 2] *= 30  # an outlier: the VNNI build's rounding step of that row is 30x coarser
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.01
    y = cpu_kernels.int8_gemv(x, q, scale)
    assert y.shape == (B, N) and y.dtype == torch.float32
    # fp32 builds: the fp64 product up to fp32 rounding of the sums; VNNI: also within its int16 rounding's bound
    want = (x.double() @ q.double().T) * scale.double()
    bound = cpu_kernels.rounding_bound(x, q, scale, cpu_kernels.variant())
    err = (y.double() - want).abs()
    assert (err <= bound + 1e-5 * float(want.abs().max())).all(), float((err - bound).max())
    if cpu_kernels.variant() == "vnni" and K >= 16:  # and it does round: not an fp32 loop under another name
        assert float(err.max()) > 1e-3 * float(bound.max())


@needs_kernel
@pytest.mark.skipif(not cpu_kernels.AMX_FLAGS <= FLAGS, reason="no AMX int8 on this CPU")
@pytest.mark.parametrize("loop", ["vnni_loop", "amx"])
@pytest.mark.parametrize("B, N, K", [(1, 16, 64), (4, 960, 576), (7, 48, 128), (8, 576, 1536), (9, 3072, 576),
                                     (16, 64, 192), (3, 20, 64), (8, 32, 100)])
def test_the_vnni_builds_two_loops_each_within_the_bound(B, N, K, loop):
    """The VNNI build runs 8+ rows on AMX tiles where the shapes fit (N % 16, K % 64), else its vector loop: each
    loop on its own here, at every row count (the last two shapes send the tile loop to the vector one)."""
    fn = getattr(cpu_kernels._library().lib, f"opd_int8_gemv_{loop}")
    g = torch.Generator().manual_seed(B * N + K)
    x = torch.randn(B, K, generator=g)
    x[-1, 0] = 40.0  # an outlier row
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.01
    y = torch.full((B, N), float("nan"))
    fn(x.data_ptr(), B, q.data_ptr(), scale.data_ptr(), y.data_ptr(), N, K, torch.get_num_threads())
    want = (x.double() @ q.double().T) * scale.double()
    err = (y.double() - want).abs()
    bound = cpu_kernels.rounding_bound(x, q, scale, "vnni")
    assert (err <= bound + 1e-5 * float(want.abs().max())).all(), float((err - bound).max())
    assert float(err.max()) > 1e-4 * float(bound.max())  # it rounds: not an fp32 loop


@needs_kernel
@pytest.mark.skipif(not cpu_kernels.AMX_FLAGS <= FLAGS, reason="no AMX int8 on this CPU")
def test_the_tile_units_crossover_is_timed_or_set(fresh_kernel):
    """From how many rows the products run on the tile unit: timed at load (1-8), or OPD_AMX_MIN_ROWS; and the
    entry point follows it (a product of 4 rows gives the tile loop's bits at a crossover of 1, the vector loop's
    at 8)."""
    timed = cpu_kernels.amx_min_rows()
    assert timed is not None and 1 <= timed <= cpu_kernels.AMX_MAX_TIMED_ROWS
    g = torch.Generator().manual_seed(5)
    x, q = torch.randn(4, 576, generator=g), torch.randint(-127, 128, (960, 576), generator=g, dtype=torch.int8)
    scale = torch.rand(960, generator=g)
    lib = cpu_kernels._library().lib
    loops = {}
    for name in ("amx", "vnni_loop"):
        loops[name] = torch.empty(4, 960)
        getattr(lib, f"opd_int8_gemv_{name}")(x.data_ptr(), 4, q.data_ptr(), scale.data_ptr(), loops[name].data_ptr(),
                                              960, 576, 1)
    assert not torch.equal(loops["amx"], loops["vnni_loop"])  # the two loops round differently
    for rows, loop in ((1, "amx"), (8, "vnni_loop")):
        cpu_kernels._library.cache_clear()
        fresh_kernel.setenv("OPD_AMX_MIN_ROWS", str(rows))
        assert cpu_kernels.amx_min_rows() == rows
        assert torch.equal(cpu_kernels.int8_gemv(x, q, scale), loops[loop])
    cpu_kernels._library.cache_clear()
    fresh_kernel.setenv("OPD_AMX_MIN_ROWS", "four")
    with pytest.raises(ValueError, match="OPD_AMX_MIN_ROWS='four': expected a whole number of rows, at least 1"):
        cpu_kernels.variant()


@needs_kernel
@pytest.mark.parametrize("K", [8192, 9000])
@pytest.mark.parametrize("B", [2, 8])
def test_long_rows_of_extreme_values_do_not_overflow(B, K):
    """The VNNI loop's int32 sums hold K / 16 products of up to 32767 * 127 per lane: up to K = 8192 they fit,
    longer rows take the fp32 loop; 8 rows take the AMX tiles where there are some. Every activation and weight at
    its extreme: the worst case for the sums."""
    x = torch.full((B, K), 3.0)
    x[1::2] *= -1
    q = torch.full((16, K), 127, dtype=torch.int8)
    y = cpu_kernels.int8_gemv(x, q, torch.full((16,), 0.5))
    torch.testing.assert_close(y, (x[:, :1] * 127 * K * 0.5).expand(B, 16), rtol=1e-6, atol=0)


@needs_kernel
@pytest.mark.skipif(not cpu_kernels.VNNI_FLAGS <= FLAGS, reason="no AVX-512 VNNI on this CPU")
def test_vnni_rounding_bound_is_tight_enough_to_catch_a_coarser_rounding(fresh_kernel):
    """int8-rounded activations (the next coarser choice) would be ~250x past the bound: the test above would see it."""
    g = torch.Generator().manual_seed(3)
    x, q, scale = torch.randn(4, 576, generator=g), torch.randint(-127, 128, (64, 576), generator=g, dtype=torch.int8), torch.rand(64, generator=g)
    top = x.abs().amax(1, keepdim=True)
    x8 = (x / top * 127).round() * top / 127
    want = (x.double() @ q.double().T) * scale.double()
    err8 = ((x8.double() @ q.double().T) * scale.double() - want).abs()
    assert (err8 > cpu_kernels.rounding_bound(x, q, scale, "vnni")).any()


def test_the_build_follows_the_cpu_and_the_setting(fresh_kernel):
    fresh_kernel.setattr(matmul, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cpu_kernels.variant() in ("avx2", None)  # None: no compiler here
    cpu_kernels._library.cache_clear()
    fresh_kernel.setenv("OPD_INT8_KERNEL", "AVX-512")
    with pytest.raises(ValueError, match="OPD_INT8_KERNEL='avx-512': expected one of auto, avx512, avx2, torch"):
        cpu_kernels.variant()
    cpu_kernels._library.cache_clear()
    fresh_kernel.setenv("OPD_INT8_KERNEL", "")  # set but empty: the default, as unset (was a ValueError mid-run)
    assert cpu_kernels.variant() in ("avx2", None)


@needs_kernel
def test_bf16_models_take_opds_kernel_only_in_its_avx512_builds(fresh_kernel):
    want = torch.float32 if cpu_kernels.variant() in ("avx512", "vnni") else torch.bfloat16
    assert int8_kernel_dtype(torch.bfloat16) == want
    fresh_kernel.setenv("OPD_INT8_KERNEL", "avx2")
    cpu_kernels._library.cache_clear()
    assert int8_kernel_dtype(torch.bfloat16) == torch.bfloat16  # torch's kernel (its bf16 path is its fast one)
    assert int8_kernel_dtype(torch.float32) == torch.float32


@needs_kernel
def test_int8_gemv_takes_strided_inputs_and_refuses_wrong_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, generator=g)[::2, :64]  # neither row nor column contiguous
    q = torch.randint(-127, 128, (64, 40), generator=g, dtype=torch.int8).T  # [40, 64] transposed view
    scale = torch.rand(40, generator=g)
    err = (cpu_kernels.int8_gemv(x, q, scale).double() - (x.double() @ q.double().T) * scale.double()).abs()
    assert (err <= cpu_kernels.rounding_bound(x, q, scale, cpu_kernels.variant()) + 1e-4).all()
    with pytest.raises(TypeError, match="fp32 x"):
        cpu_kernels.int8_gemv(x.bfloat16(), q, scale)
    with pytest.raises(ValueError, match="int8_gemv"):
        cpu_kernels.int8_gemv(x[:, :10], q, scale)


@needs_kernel
def test_fp32_int8_products_use_opds_kernel_in_fp32():
    w = torch.randn(300, 64) * 0.05
    q = quantize_int8(w)
    assert int8_kernel_dtype(torch.float32) == torch.float32 and q.scale.dtype == torch.float32
    x = torch.randn(2, 3, 64)
    y = int8_linear(x, q)
    assert y.shape == (2, 3, 300) and y.dtype == torch.float32
    err = (y.double() - x.double() @ (q.q.double() * q.scale.double()[:, None]).T).abs()
    assert (err <= cpu_kernels.rounding_bound(x.reshape(6, 64), q.q, q.scale, cpu_kernels.variant()).view(2, 3, 300) + 1e-5).all()


def test_torch_kernel_when_asked_or_when_opds_cannot_be_built(fresh_kernel, tmp_path):
    fresh_kernel.setenv("OPD_INT8_KERNEL", "torch")
    assert not cpu_kernels.int8_gemv_available()
    assert int8_kernel_dtype(torch.float32) == torch.bfloat16  # torch's kernel takes bf16 activations
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.int8_gemv(torch.ones(1, 8), torch.ones(2, 8, dtype=torch.int8), torch.ones(2))
    # A broken compiler and an empty cache: no kernel, and int8 products still run (torch's kernel, bf16 rounding).
    fresh_kernel.delenv("OPD_INT8_KERNEL")
    fresh_kernel.setenv("OPD_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh_kernel.setenv("CC", "false")
    cpu_kernels._library.cache_clear()
    assert not cpu_kernels.int8_gemv_available()
    g = torch.Generator().manual_seed(0)  # seeded: bf16-rounded activations exceed 2e-2 for ~3% of random draws
    w = torch.randn(16, 32, generator=g)
    q = quantize_int8(w)
    assert q.scale.dtype == torch.bfloat16
    x = torch.randn(3, 32, generator=g)
    torch.testing.assert_close(int8_linear(x, q), x @ (q.q.float() * q.scale.float()[:, None]).T, rtol=2e-2, atol=2e-2)
    # Weights quantised for opd's kernel (fp32 scales) still multiply where it is gone (torch's, bf16 activations).
    fp32_scaled = type(q)(q.q, q.scale.float())
    torch.testing.assert_close(int8_linear(x, fp32_scaled), x @ (q.q.float() * q.scale.float()[:, None]).T,
                               rtol=2e-2, atol=2e-2)
    # A CPU without AVX2: not even tried.
    cpu_kernels._library.cache_clear()
    fresh_kernel.setattr(matmul, "cpu_flags", lambda: frozenset({"fp", "asimd"}))
    fresh_kernel.delenv("CC")
    assert not cpu_kernels.int8_gemv_available()


@needs_kernel
def test_the_kernel_is_built_once_per_source(tmp_path, monkeypatch):
    from importlib import resources

    source = tmp_path / "int8_gemv.c"
    for name in ("int8_gemv.c", "simd.h", "quantize.h", "amx.h"):  # the source and the headers it includes
        (tmp_path / name).write_bytes((resources.files("opd") / "csrc" / name).read_bytes())
    built = cpu_kernels.build(source, tmp_path / "cache")
    assert built.exists() and built.parent == tmp_path / "cache"
    monkeypatch.setenv("CC", "false")  # a second build would fail: the cached library is reused
    assert cpu_kernels.build(source, tmp_path / "cache") == built
    source.write_text(source.read_text() + "\n/* changed */\n")
    with pytest.raises(RuntimeError, match="failed"):  # a changed source is a new build
        cpu_kernels.build(source, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [built]  # no half-written file left behind
    source.write_text(source.read_text().replace("\n/* changed */\n", ""))
    assert cpu_kernels.build(source, tmp_path / "cache") == built
    (tmp_path / "included.c").write_text("/* a file the source may #include */\n")
    with pytest.raises(RuntimeError, match="failed"):  # so a change beside the source is a new build too
        cpu_kernels.build(source, tmp_path / "cache")


def torch_quantised(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """opd.llama.quantize_int8's torch ops, written out: the reference for the C pass."""
    block = w.to(torch.float32, copy=True)
    scale = block.abs().amax(dim=1).div_(127.0).clamp_(min=1e-12)
    return block.mul_(scale.reciprocal()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


@pytest.fixture(params=["avx2", "avx512"])
def quantiser_loop(request):
    """Each loop of the C quantiser this CPU runs (AVX-512 where it has AVX-512BW / VL, the default there)."""
    if not cpu_kernels.int8_gemv_available():
        pytest.skip("opd's int8 kernel does not build here")
    wide = {"avx512bw", "avx512vl"} <= FLAGS
    if request.param == "avx512" and not wide:
        pytest.skip("no AVX-512BW / VL on this CPU")
    cpu_kernels.quantize_int8_wide(request.param == "avx512")
    yield request.param
    cpu_kernels.quantize_int8_wide(wide)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(67, 37), (130, 576)])
def test_c_quantiser_writes_the_bits_of_the_torch_ops(dtype, shape, quantiser_loop):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)).to(dtype)
    w[3] = 0  # an all-zero row: the scale's 1e-12 floor
    w[5, :8] = torch.tensor([0.5, -0.5, 1.5, -2.5, 127, -127, 63.5, 0]).to(dtype)  # ties round half to even
    q, scale = torch.empty(shape, dtype=torch.int8), torch.empty(shape[0])
    assert cpu_kernels.quantize_int8_into(w, q, scale)
    want_q, want_scale = torch_quantised(w)
    assert torch.equal(scale, want_scale) and torch.equal(q, want_q)
    # quantize_int8 takes the C pass for fp32 scales and gives the same Int8Weight either way
    if int8_kernel_dtype(dtype) == torch.float32:
        got = quantize_int8(w)
        assert torch.equal(got.q, want_q) and torch.equal(got.scale, want_scale)
    # what it cannot take, it leaves to the torch ops
    assert not cpu_kernels.quantize_int8_into(w.t(), torch.empty(shape[::-1], dtype=torch.int8), torch.empty(shape[1]))
    assert not cpu_kernels.quantize_int8_into(w, q, torch.empty(shape[0], dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------- a no-grad layer's elementwise steps
def layer_builds():
    lib = cpu_kernels._plain_library("layer_ops.c")
    if lib is None:
        return []
    variants = ["avx2"] + (["avx512_bf16"] if cpu_kernels.BF16_FLAGS <= matmul.cpu_flags() else [])
    return [cpu_kernels._layer_ops(lib, v) for v in variants]


def assert_bf16_equal(got, want):
    # the torch ops' roundings, replayed: equal but for a rare last-bit difference of the fp32 arithmetic in between
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    same = (got.view(torch.int16) == want.view(torch.int16)).float().mean()
    assert same > 0.999, float(same)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-6)  # a flip before a product: 2 ulps


@pytest.mark.parametrize("n", [576, 67])  # 67: the tails after 8 / 16 lanes
def test_layer_ops_equal_the_torch_ops_in_every_build(n, monkeypatch):
    import torch.nn.functional as F

    from opd.llama import apply_rope

    builds = layer_builds()
    if not builds:
        pytest.skip("csrc/layer_ops.c needs x86 AVX2 + a C compiler")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, n, generator=g) * 4).bfloat16()
    w = torch.rand(n, generator=g).bfloat16()
    D, heads, all_heads = (64 if n == 576 else 38), 5, 7  # D even; 38: a tail in each half after 8 and 16 lanes
    qkv = torch.randn(3, 5, all_heads, D, generator=g).bfloat16()
    cos, sin = torch.randn(40, D, generator=g).bfloat16(), torch.randn(40, D, generator=g).bfloat16()
    positions = torch.randint(0, 40, (3, 5), generator=g)  # any position per row (left padding)
    gate_up = (torch.randn(3, 5, 2 * n, generator=g) * 3).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    for ops in builds:
        monkeypatch.setattr(cpu_kernels, "_layer_library", lambda ops=ops: ops)
        with torch.no_grad():
            assert_bf16_equal(cpu_kernels.rms_norm(x, w, 1e-5), w * F.rms_norm(x.float(), (n,), None, 1e-5).to(x.dtype))
            rotated = qkv.clone()
            assert cpu_kernels.rope_(rotated, heads, cos, sin, positions)
            want = apply_rope(qkv[:, :, :heads], cos[positions][:, :, None], sin[positions][:, :, None])
            assert_bf16_equal(rotated[:, :, :heads], want)
            assert torch.equal(rotated[:, :, heads:], qkv[:, :, heads:])  # the value heads are left alone
            delta = (torch.randn(3, 5, n, generator=g) * 4).bfloat16()
            stream = x.clone()
            if ops.variant == "avx2":  # torch's own op there
                assert ops.silu_mul is None and cpu_kernels.silu_mul(gate_up) is None
                assert ops.add_rms_norm is None and cpu_kernels.add_rms_norm_(stream, delta, w, 1e-5) is None
                assert torch.equal(stream, x)  # declined: untouched
            else:
                assert_bf16_equal(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up)
                # the residual add (in place) and the next norm in one pass: the add's bits, then the norm's
                normed = cpu_kernels.add_rms_norm_(stream, delta, w, 1e-5)
                assert torch.equal(stream, x + delta)
                assert_bf16_equal(normed, cpu_kernels.rms_norm(x + delta, w, 1e-5))


def test_bf16_silu_mul_stays_finite_at_the_ends_of_the_exponential():
    # sigmoid's exp(-g) through 2^t is capped before it overflows: 1 + exp(-g) = inf would make its Newton step
    # 0 x inf = NaN
    import torch.nn.functional as F

    builds = [ops for ops in layer_builds() if ops.silu_mul is not None]
    if not builds:
        pytest.skip("needs csrc/layer_ops.c's AVX-512 BF16 build")
    g = torch.tensor([-1e4, -300.0, -200.0, -120.0, -90.0, -88.0, -50.0, -1.0, 0.0, 1.0, 50.0, 90.0, 200.0, 1e4] + [0.5] * 18)
    gate_up = torch.cat([g, torch.full_like(g, 1.5)]).bfloat16()[None]
    with torch.no_grad():
        got = cpu_kernels.silu_mul(gate_up)
    want = F.silu(gate_up[:, :32].float()) * gate_up[:, 32:].float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-30)


@pytest.mark.parametrize("n", [576, 67])
def test_fp32_layer_ops_equal_the_torch_ops(n):
    import torch.nn.functional as F

    from opd.llama import apply_rope

    if not layer_builds():
        pytest.skip("csrc/layer_ops.c needs x86 AVX2 + a C compiler")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, n, generator=g) * 4, torch.rand(n, generator=g)
    D, heads, all_heads = (64 if n == 576 else 38), 5, 7
    qkv = torch.randn(3, 5, all_heads, D, generator=g)
    cos, sin = torch.randn(40, D, generator=g), torch.randn(40, D, generator=g)
    positions = torch.randint(0, 40, (3, 5), generator=g)
    gate_up = torch.randn(3, 5, 2 * n, generator=g) * 6  # exp of -18 .. 18: both ends of SiLU
    gate, up = gate_up.chunk(2, dim=-1)
    close = dict(rtol=3e-6, atol=1e-6)  # the reduction order of the norm and the exp in SiLU, not the formula
    with torch.no_grad():
        torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (n,), w, 1e-5), **close)
        rotated = qkv.clone()
        assert cpu_kernels.rope_(rotated, heads, cos, sin, positions)
        want = apply_rope(qkv[:, :, :heads], cos[positions][:, :, None], sin[positions][:, :, None])
        torch.testing.assert_close(rotated[:, :, :heads], want, **close)
        assert torch.equal(rotated[:, :, heads:], qkv[:, :, heads:])
        torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, **close)


def test_layer_ops_decline_what_they_do_not_take():
    if not layer_builds():
        pytest.skip("csrc/layer_ops.c needs x86 AVX2 + a C compiler")
    x, w = torch.randn(4, 8).bfloat16(), torch.rand(8).bfloat16()
    with torch.no_grad():
        assert cpu_kernels.rms_norm(x.float(), w, 1e-5) is None  # mixed dtypes
        assert cpu_kernels.rms_norm(x.double(), w.double(), 1e-5) is None  # neither bf16 nor fp32
        assert cpu_kernels.rms_norm(x.t().contiguous().t(), w, 1e-5) is None  # strided
        qkv, table = torch.randn(1, 2, 3, 8).bfloat16(), torch.randn(4, 8).bfloat16()
        assert not cpu_kernels.rope_(qkv, 2, table, table, torch.tensor([[0, 4]]))  # past the table
        assert not cpu_kernels.rope_(qkv, 4, table, table, torch.tensor([[0, 1]]))  # more heads than there are
    assert cpu_kernels.rms_norm(x, w, 1e-5) is None  # grad enabled: autograd needs torch's ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_teachers_forward_takes_the_layer_ops_and_matches_the_torch_ops(tokenizer, monkeypatch, dtype):
    from opd.llama import causal_hidden
    from tests.conftest import tiny_model

    if not layer_builds():
        pytest.skip("csrc/layer_ops.c needs x86 AVX2 + a C compiler")
    model = tiny_model(tokenizer, 3).to(dtype)
    ids = torch.randint(4, 60, (2, 23), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu_kernels._layer_cpu
    monkeypatch.setattr(cpu_kernels, "_layer_cpu", lambda *t: calls.append(real(*t)) or calls[-1])
    native = causal_hidden(model, ids)
    assert calls and all(calls)  # the C ops applied, every layer
    monkeypatch.setattr(cpu_kernels, "_layer_cpu", lambda *t: False)
    plain = causal_hidden(model, ids)
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(native.float(), plain.float(), rtol=tol, atol=tol * float(plain.float().abs().max()))


# ------------------------------------------------------------------------------------- causal attention (fp32; bf16 on AMX below)
@pytest.mark.parametrize("B,L,H,KV", [(2, 37, 9, 3), (1, 1, 4, 4), (3, 70, 6, 1), (1, 130, 2, 2)])
def test_causal_attention_equals_torch_sdpa(B, L, H, KV):
    # L: below and across the 4-row, 16-key and 64-key blocks; H / KV: grouped and plain heads
    import torch.nn.functional as F

    if cpu_kernels._attention_library() is None:
        pytest.skip("csrc/attention.c needs x86 AVX-512F + a C compiler")
    D = cpu_kernels.ATTENTION_HEAD_DIM
    qkv = torch.randn(B, L, H + 2 * KV, D, generator=torch.Generator().manual_seed(L)) * 3
    t = qkv.transpose(1, 2)
    with torch.no_grad():
        got = cpu_kernels.causal_attention(qkv, H, KV, D**-0.5)
        want = F.scaled_dot_product_attention(t[:, :H], t[:, H : H + KV], t[:, H + KV :], is_causal=True, scale=D**-0.5,
                                              enable_gqa=H != KV).transpose(1, 2)
    assert got.shape == (B, L, H, D)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)  # fp32 sums over up to 130 keys in another order


def test_causal_attention_declines_what_it_does_not_take():
    if cpu_kernels._attention_library() is None:
        pytest.skip("csrc/attention.c needs x86 AVX-512F + a C compiler")
    qkv = torch.randn(1, 8, 6, 64)
    with torch.no_grad():
        if not cpu_kernels.attention_amx():  # bf16 only on the AMX tile unit, torch's SDPA elsewhere
            assert cpu_kernels.causal_attention(qkv.bfloat16(), 4, 1, 0.125) is None
        assert cpu_kernels.causal_attention(torch.randn(1, 8, 6, 32), 4, 1, 0.125) is None  # another head size
        assert cpu_kernels.causal_attention(qkv, 3, 1, 0.125) is None  # heads do not add up
        assert cpu_kernels.causal_attention(torch.randn(1, 8, 5, 64), 3, 2, 0.125) is None  # 3 heads over 2 kv heads
        assert cpu_kernels.causal_attention(qkv.transpose(1, 2), 4, 1, 0.125) is None  # strided
    assert cpu_kernels.causal_attention(qkv, 4, 1, 0.125) is None  # grad enabled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_writes_into_a_given_buffer(dtype):
    if cpu_kernels._attention_library() is None or (dtype == torch.bfloat16 and not cpu_kernels.attention_amx()):
        pytest.skip("csrc/attention.c needs x86 AVX-512F + a C compiler (bf16: the AMX tile unit)")
    qkv = (torch.randn(2, 37, 15, 64, generator=torch.Generator().manual_seed(4)) * 2).to(dtype)
    out = torch.full((2, 37, 9, 64), float("nan"), dtype=dtype)
    with torch.no_grad():
        want = cpu_kernels.causal_attention(qkv, 9, 3, 0.125)
        got = cpu_kernels.causal_attention(qkv, 9, 3, 0.125, out=out)
        assert got is out and torch.equal(got, want)
        with pytest.raises(AssertionError, match="out: a contiguous"):
            cpu_kernels.causal_attention(qkv, 9, 3, 0.125, out=torch.empty(2, 37, 8, 64, dtype=dtype))


def exact_attention(qkv: torch.Tensor, H: int, KV: int, scale: float) -> torch.Tensor:
    """Causal grouped-query attention of qkv's values in float64, nothing rounded on the way."""
    L = qkv.shape[1]
    t = qkv.transpose(1, 2).double()
    q, k, v = t[:, :H], t[:, H : H + KV].repeat_interleave(H // KV, 1), t[:, H + KV :].repeat_interleave(H // KV, 1)
    scores = ((q @ k.transpose(2, 3)) * scale).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


# L: below, at and across the 32-row (two row tiles) and 32-key blocks; H / KV: grouped and plain heads
@pytest.mark.parametrize("B,L,H,KV", [(2, 37, 9, 3), (1, 1, 4, 4), (1, 16, 2, 1), (1, 32, 3, 3), (3, 70, 6, 1),
                                      (1, 130, 2, 2), (2, 256, 9, 3)])
def test_bf16_causal_attention_on_the_tile_unit_is_as_close_as_torchs(B, L, H, KV):
    import torch.nn.functional as F

    if not cpu_kernels.attention_amx():
        pytest.skip("the bf16 attention needs a CPU with AMX (amx_bf16), Linux's grant of its state, a C compiler")
    D = cpu_kernels.ATTENTION_HEAD_DIM
    qkv = (torch.randn(B, L, H + 2 * KV, D, generator=torch.Generator().manual_seed(L)) * 2).bfloat16()
    t = qkv.transpose(1, 2)
    with torch.no_grad():
        got = cpu_kernels.causal_attention(qkv, H, KV, D**-0.5)
        sdpa = F.scaled_dot_product_attention(t[:, :H], t[:, H : H + KV], t[:, H + KV :], is_causal=True, scale=D**-0.5,
                                              enable_gqa=H != KV).transpose(1, 2)
    exact = exact_attention(qkv, H, KV, D**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (B, L, H, D)
    # bf16 probabilities and a bf16 output: each within a bf16 rounding of the values' scale of the exact output
    torch.testing.assert_close(got.double(), exact, rtol=2**-7, atol=2**-8 * float(qkv.abs().max()))
    # and as close on the whole as torch's flash kernel (the same roundings: unnormalised bf16 probabilities)
    err, torch_err = (got.double() - exact).abs().mean(), (sdpa.double() - exact).abs().mean()
    assert err <= 1.1 * torch_err, (float(err), float(torch_err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_scores_far_above_key_0s_is_exact(dtype):
    # both kernels' softmaxes shift each row by its score of key 0, not by its max: a row whose max lies more than
    # ~69 / scale above key 0's score would overflow, and the rows are redone with their max (bf16: the block's 32
    # rows; fp32: the online softmax's 4). Here every row from 40 on has a key (40) whose score lies ~128 above the
    # others: without the redo those rows come out inf/NaN
    if dtype == torch.bfloat16 and not cpu_kernels.attention_amx():
        pytest.skip("the bf16 attention needs a CPU with AMX (amx_bf16), Linux's grant of its state, a C compiler")
    if dtype == torch.float32 and cpu_kernels._attention_library() is None:
        pytest.skip("csrc/attention.c needs x86 AVX-512F + a C compiler")
    B, L, H, KV, D = 1, 100, 2, 1, cpu_kernels.ATTENTION_HEAD_DIM
    qkv = torch.randn(B, L, H + 2 * KV, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    qkv[:, :, :H] = 4.0  # every query the same: q . k = 256 sum(k)
    qkv[:, 40, H] = 4.0  # key 40: q . k = 1024, x 0.125 = 128 where the others' scores are within ~+-10
    with torch.no_grad():
        got = cpu_kernels.causal_attention(qkv, H, KV, D**-0.5)
    exact = exact_attention(qkv, H, KV, D**-0.5)
    assert got is not None and torch.isfinite(got).all()
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol / 2 * float(qkv.abs().max()))
    # rows 40 on attend to key 40 alone
    torch.testing.assert_close(got[0, 40:, 0].double(), qkv[0, 40, H + KV].double().expand(L - 40, D), rtol=0, atol=0)


def test_a_bf16_forward_attends_on_the_tile_unit_and_matches_torchs_sdpa(tokenizer, monkeypatch):
    from opd.llama import causal_hidden
    from tests.conftest import tiny_model

    if not cpu_kernels.attention_amx():
        pytest.skip("the bf16 attention needs a CPU with AMX (amx_bf16), Linux's grant of its state, a C compiler")
    model = tiny_model(tokenizer, 3, hidden_size=128, num_attention_heads=2).bfloat16()  # head size 64
    ids = torch.randint(4, 60, (2, 45), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu_kernels.causal_attention_bf16
    monkeypatch.setattr(cpu_kernels, "causal_attention_bf16", lambda *a, **k: calls.append(1) or real(*a, **k))
    tile = causal_hidden(model, ids)
    assert len(calls) == model.config.num_hidden_layers  # every layer attended on the tile unit
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda *a, **k: None)  # torch's SDPA
    sdpa = causal_hidden(model, ids)
    torch.testing.assert_close(tile.float(), sdpa.float(), rtol=0.02, atol=0.02 * float(sdpa.float().abs().max()))


def test_every_c_source_and_header_ships_with_the_package():
    # the kernels are compiled from the installed package's csrc folder: a header left out of the package data
    # fails every build that includes it there (and opd falls back to torch's ops without a word)
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["opd"]
    csrc = root / "src" / "opd" / "csrc"
    files = [p.relative_to(csrc.parent).as_posix() for p in csrc.iterdir() if p.suffix in (".c", ".h")]
    assert any(f.endswith(".h") for f in files)
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_an_fp32_teachers_forward_attends_with_rotated_keys_whichever_ops_run(tokenizer, monkeypatch):
    # csrc/attention.c reads q and k from the fused projection, where only the C RoPE rotates them in place: with
    # torch's RoPE (a rotated copy) the forward must not hand it the unrotated projection
    from opd.llama import causal_hidden
    from tests.conftest import tiny_model

    if cpu_kernels._attention_library() is None or not layer_builds():
        pytest.skip("csrc/attention.c needs x86 AVX-512F + a C compiler")
    model = tiny_model(tokenizer, 3, hidden_size=128, num_attention_heads=2)  # head size 64
    ids = torch.randint(4, 60, (2, 23), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cpu_kernels.causal_attention
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    native = causal_hidden(model, ids)
    assert calls  # the C attention ran
    monkeypatch.setattr(cpu_kernels, "_layer_cpu", lambda *t: False)  # torch's RoPE, norms and SiLU
    torch_rope = causal_hidden(model, ids)
    monkeypatch.setattr(cpu_kernels, "causal_attention", lambda *a, **k: None)  # and torch's SDPA
    plain = causal_hidden(model, ids)
    scale = float(plain.abs().max())
    torch.testing.assert_close(native, plain, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(torch_rope, plain, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("width", [16, 72, 40, 8])
def test_torch_int8_products_of_any_input_width(width):
    # torch's weight-only int8 kernel (bf16 models where opd's kernel is its AVX2 build, OPD_INT8_KERNEL=torch, no
    # compiler) sums 16 inputs at a time: at widths off that step it gave wrong products (5.9 relative at 72) or
    # crashed the process (100).
    g = torch.Generator().manual_seed(width)
    w = torch.randn(24, width, generator=g)
    q = quantize_int8(w)
    bf16_scaled = type(q)(q.q, q.scale.bfloat16())  # torch's kernel, whatever this machine builds
    x = torch.randn(3, width, generator=g).bfloat16()
    want = x.float() @ (q.q.float() * bf16_scaled.scale.float()[:, None]).T
    torch.testing.assert_close(int8_linear(x, bf16_scaled).float(), want, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------------------- bf16 products on AMX
def needs_amx_gemm():
    if not cpu_kernels.gemm_amx():
        pytest.skip("opd's AMX products need a CPU with AMX (amx_bf16), Linux's grant of its state, a C compiler")


# rows: a multiple of 32, an odd count of 16-row tiles, and rows the wrapper pads; K and N: one tile, several; K
# 1,536 and 1,312: in parts of 512 k (the last one shorter), the sums kept between parts
@pytest.mark.parametrize("M,K,N", [(64, 64, 32), (48, 576, 960), (37, 192, 384), (1, 32, 64), (300, 1536, 576),
                                   (48, 1312, 64)])
def test_amx_products_equal_torchs_bf16_linear(M, K, N):
    needs_amx_gemm()
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    ref = torch.nn.functional.linear(x, w)
    got = cpu_kernels.amx_linear(x.view(1, M, K), cpu_kernels.AmxWeight(w))
    assert got.shape == (1, M, N) and got.dtype == torch.bfloat16
    # fp32 sums rounded once to bf16 as oneDNN's: the same bits but where the summation order tips a rounding
    assert (got[0] == ref).float().mean() > 0.999
    torch.testing.assert_close(got[0].float(), ref.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("M,K,inter", [(64, 64, 192), (21, 576, 1536)])
def test_amx_gate_up_product_returns_silu_of_gate_times_up(M, K, inter):
    import torch.nn.functional as F

    needs_amx_gemm()
    g = torch.Generator().manual_seed(inter)
    x = torch.randn(M, K, generator=g).bfloat16()
    gate_up = (torch.randn(2 * inter, K, generator=g) * 0.1).bfloat16()
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # bf16 products, as the unfused forward rounds them
    ref = F.silu(gate) * up
    got = cpu_kernels.amx_linear(x, cpu_kernels.AmxWeight(gate_up, silu_mul=True))
    assert got.shape == (M, inter)
    assert (got == ref).float().mean() > 0.999
    # where the sums' order tips gate's or up's rounding, the three roundings after it may move by two steps
    torch.testing.assert_close(got.float(), ref.float(), rtol=2**-6, atol=1e-3)


# inter 192 and 1536: pairs of column pairs fill whole lines; 208: an odd count of pairs (ordinary stores); 1500 rows
# at K 576: two chunks of rows a thread (the staged half lines of each chunk's rows)
@pytest.mark.parametrize("M,K,inter", [(64, 64, 192), (21, 576, 1536), (48, 64, 208), (1500, 576, 192)])
def test_amx_gate_up_product_streamed_equals_stored(M, K, inter, monkeypatch):
    needs_amx_gemm()
    g = torch.Generator().manual_seed(M + inter)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = cpu_kernels.AmxWeight((torch.randn(2 * inter, K, generator=g) * 0.1).bfloat16(), silu_mul=True)
    monkeypatch.setattr(cpu_kernels, "AMX_STREAM_BYTES", 1 << 40)
    stored = cpu_kernels.amx_linear(x, w)
    monkeypatch.setattr(cpu_kernels, "AMX_STREAM_BYTES", 0)
    assert torch.equal(cpu_kernels.amx_linear(x, w), stored)


# B x L rows: a multiple of 16, and 3 x 7 (padded by the wrapper); D 64 and 128; grouped and plain heads
@pytest.mark.parametrize("B,L,H,KV,D", [(2, 48, 9, 3, 64), (3, 7, 2, 2, 128)])
def test_amx_qkv_product_rotates_queries_and_keys_rounding_once(B, L, H, KV, D):
    from opd.llama import apply_rope

    needs_amx_gemm()
    g = torch.Generator().manual_seed(L)
    K = 96
    x = torch.randn(B, L, K, generator=g).bfloat16()
    w = (torch.randn((H + 2 * KV) * D, K, generator=g) * 0.1).bfloat16()
    freqs = torch.arange(L)[:, None] * (1e4 ** (-torch.arange(0, D, 2) / D))[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos().bfloat16(), torch.cat([freqs, freqs], -1).sin().bfloat16()
    w_amx = cpu_kernels.AmxWeight(w, rope_heads=H + KV, head_dim=D)
    got = cpu_kernels.amx_linear(x, w_amx, rope=(cos, sin)).view(B, L, H + 2 * KV, D)
    ref = torch.nn.functional.linear(x, w).view(B, L, H + 2 * KV, D)  # q, k, v rounded to bf16, as HF's
    # the rotation of those bf16 q and k by the bf16 tables, exact, then rounded once (the kernel's bf16 dot products)
    exact = apply_rope(ref[:, :, : H + KV].double(), cos[:, None].double(), sin[:, None].double())
    assert (got[:, :, : H + KV] == exact.bfloat16()).float().mean() > 0.995  # but where the sums' order tips one
    torch.testing.assert_close(got[:, :, : H + KV].double(), exact, rtol=2**-7, atol=1e-3)
    # closer to the exact rotation than the rope pass's bf16 ops (HF's, three roundings), never farther by a step
    hf = apply_rope(ref[:, :, : H + KV], cos[:, None], sin[:, None])
    err_got, err_hf = (got[:, :, : H + KV].double() - exact).abs(), (hf.double() - exact).abs()
    assert err_got.mean() < err_hf.mean()
    assert (got[:, :, H + KV :] == ref[:, :, H + KV :]).float().mean() > 0.999  # the values: not rotated
    # the table made once a forward: the same output
    table = cpu_kernels.amx_rope_table(cos, sin)
    assert torch.equal(cpu_kernels.amx_linear(x, w_amx, rope=table).view_as(got), got)


# the last: more rows a thread than one chunk of rows holds at that K (chunks of equal size, the lane sums reset)
@pytest.mark.parametrize("n,K,V,temperature", [(48, 64, 64, 1.0), (37, 576, 4096, 0.7), (300, 192, 1024, 2.0),
                                               (1000, 1536, 512, 1.0)])
def test_amx_head_terms_equal_the_log_softmax_of_the_bf16_logits(n, K, V, temperature):
    needs_amx_gemm()
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, K, generator=g).bfloat16()
    head = (torch.randn(V, K, generator=g) * 0.1).bfloat16()
    head[5] *= 30  # a token far above the rest: the running max moves, the sums rescale
    targets = torch.randint(0, V, (n,), generator=g)
    targets[:3] = 5
    logp = (torch.nn.functional.linear(h, head).double() / temperature).log_softmax(-1)  # bf16 logits, exact after
    lp, ent = cpu_kernels.amx_head_terms(h, cpu_kernels.AmxWeight(head), targets, temperature)
    torch.testing.assert_close(lp, logp.gather(1, targets[:, None])[:, 0].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1).float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(IndexError, match="outside the LM head"):
        cpu_kernels.amx_head_terms(h, cpu_kernels.AmxWeight(head), targets + V, temperature)


@pytest.fixture
def two_threads():
    """torch's (and so the kernels') threads at 2 for the test: the split of rows and sequences between threads"""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# heads of 64: the layers in one call (6 sequences, 3 a thread), or step by step (5: not a multiple of the threads);
# heads of 48: step by step, RoPE as a pass and torch's attention
@pytest.mark.parametrize("hidden,heads,n_prompts,one_call", [(128, 2, 6, True), (128, 2, 5, False), (96, 2, 6, False)])
def test_a_frozen_bf16_teacher_scores_through_the_amx_kernels_as_through_onednn(student, tokenizer, prompts,
                                                                                 monkeypatch, two_threads, hidden,
                                                                                 heads, n_prompts, one_call):
    from transformers import LlamaForCausalLM

    from opd.rollout import SamplingParams, sample
    from opd.teacher import LocalTeacher
    from opd.teacher.builtin import STUDENT_SHAPE, llama_config

    needs_amx_gemm()
    config = llama_config(tokenizer, {**STUDENT_SHAPE, "hidden_size": hidden, "num_attention_heads": heads})
    config.vocab_size = 128  # whole tiles of the head's outputs
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval().bfloat16()
    roll = sample(student, tokenizer, prompts[:n_prompts], SamplingParams(temperature=0.9, max_new_tokens=12),
                  generator=torch.Generator().manual_seed(3))
    calls = {"layers": 0, "products": 0, "mlp": 0, "head": 0}

    def counted(name, fn):
        def call(*a, **k):
            result = fn(*a, **k)
            calls[name] += 1 if name != "layers" else int(result)  # (amx_layers: False where it does not apply)
            return result
        return call

    for name, fn in (("layers", "amx_layers"), ("products", "amx_linear"), ("mlp", "amx_mlp"), ("head", "amx_head_terms")):
        monkeypatch.setattr(cpu_kernels, fn, counted(name, getattr(cpu_kernels, fn)))
    teacher = LocalTeacher(model)
    first = teacher.score(roll)
    assert calls == {"layers": 0, "products": 0, "mlp": 0, "head": 0}  # seen once: not packed yet (a student's change every step)
    packed = teacher.score(roll)
    n = config.num_hidden_layers
    # every layer in one call, or QKV and o as products and gate/up and down as one MLP pass each layer
    assert calls == ({"layers": 1, "products": 0, "mlp": 0, "head": 1} if one_call
                     else {"layers": 0, "products": 2 * n, "mlp": n, "head": 1})
    torch.testing.assert_close(packed.token_logprobs, first.token_logprobs, rtol=0.02, atol=0.05)
    torch.testing.assert_close(packed.entropy, first.entropy, rtol=0.02, atol=0.05)
    model.lm_head.weight.data.mul_(1.5)  # a changed weight is packed again (after being seen twice), never reused
    assert teacher.score(roll).token_logprobs.sub(packed.token_logprobs).abs().max() > 0.01


# 4 x 48: two sequences a thread; 2 x 40: a thread's 40 rows are not whole tiles, so step by step
@pytest.mark.parametrize("B,L,one_call", [(4, 48, True), (2, 40, False)])
def test_amx_layers_in_one_call_equal_the_step_by_step_forward(tokenizer, monkeypatch, two_threads, B, L, one_call):
    from transformers import LlamaForCausalLM

    from opd import llama
    from opd.teacher.builtin import STUDENT_SHAPE, llama_config

    needs_amx_gemm()
    config = llama_config(tokenizer, {**STUDENT_SHAPE, "hidden_size": 192, "num_attention_heads": 3, "num_hidden_layers": 3})
    config.num_key_value_heads = 1  # grouped-query attention: three query heads a key head
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval().bfloat16()
    ids = torch.randint(0, config.vocab_size, (B, L))
    for _ in range(2):
        llama.causal_hidden(model, ids)  # seen twice: packed
    ran, layers = [], cpu_kernels.amx_layers
    monkeypatch.setattr(cpu_kernels, "amx_layers", lambda *a, **k: ran.append(layers(*a, **k)) or ran[-1])
    got = llama.causal_hidden(model, ids)
    assert ran == [one_call]
    monkeypatch.setattr(cpu_kernels, "amx_layers", lambda *a, **k: False)
    steps = llama.causal_hidden(model, ids)
    assert torch.equal(got, steps)  # each row's arithmetic in the same order: only who runs it differs
    assert torch.isfinite(got).all() and got.abs().max() > 0


def test_opd_amx_gemm_setting_is_checked(monkeypatch):
    monkeypatch.setenv("OPD_AMX_GEMM", "fast")
    cpu_kernels._gemm_library.cache_clear()
    try:
        with pytest.raises(ValueError, match="OPD_AMX_GEMM='fast'"):
            cpu_kernels.gemm_amx()
        monkeypatch.setenv("OPD_AMX_GEMM", "off")
        cpu_kernels._gemm_library.cache_clear()
        assert not cpu_kernels.gemm_amx()
    finally:
        monkeypatch.delenv("OPD_AMX_GEMM")
        cpu_kernels._gemm_library.cache_clear()


def test_amx_products_write_into_a_given_buffer():
    needs_amx_gemm()
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(37, 64, generator=g).bfloat16(), cpu_kernels.AmxWeight((torch.randn(96, 64, generator=g) * 0.1).bfloat16())
    want = cpu_kernels.amx_linear(x, w)
    out = torch.full((48, 96), float("nan"), dtype=torch.bfloat16)  # 37 rows in whole tiles of 16: 48
    got = cpu_kernels.amx_linear(x, w, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    with pytest.raises(AssertionError, match=r"out: a contiguous bf16 tensor of shape \(48, 96\)"):
        cpu_kernels.amx_linear(x, w, out=torch.empty(37, 96, dtype=torch.bfloat16))
    # with the residual add the output is the residual itself; the rows' scales go into a checked buffer
    x, residual = torch.randn(32, 64, generator=g).bfloat16(), torch.randn(32, 96, generator=g).bfloat16()
    with pytest.raises(AssertionError, match="the output is add_to"):
        cpu_kernels.amx_linear(x, w, add_to=residual, out=torch.empty(32, 96, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match=r"out: a contiguous torch.float32 tensor of shape \(32,\)"):
        cpu_kernels.amx_linear(x, w, add_to=residual, scale_out=(torch.empty(32, dtype=torch.bfloat16), 1e-5))
    with pytest.raises(AssertionError, match="scale_out: with add_to only"):
        cpu_kernels.amx_linear(x, w, scale_out=(torch.empty(32), 1e-5))
    with pytest.raises(AssertionError, match=r"row_scale: contiguous fp32 \[32\]"):
        cpu_kernels.amx_linear(x, w, row_scale=torch.ones(32, dtype=torch.bfloat16))


def test_amx_product_added_to_the_residual_stream_rounds_as_the_add_after_it():
    needs_amx_gemm()
    g = torch.Generator().manual_seed(7)
    x, residual = torch.randn(48, 192, generator=g).bfloat16(), torch.randn(48, 64, generator=g).bfloat16()
    w = (torch.randn(64, 192, generator=g) * 0.1).bfloat16()
    expect = residual + torch.nn.functional.linear(x, w)  # the product rounded to bf16, then the bf16 add
    got = residual.clone()
    assert cpu_kernels.amx_linear(x, cpu_kernels.AmxWeight(w), add_to=got) is got
    assert (got == expect).float().mean() > 0.999
    torch.testing.assert_close(got.float(), expect.float(), rtol=2**-7, atol=2e-2)


def test_amx_residual_add_writes_the_inverse_rms_of_each_row_after_it():
    needs_amx_gemm()
    g = torch.Generator().manual_seed(8)
    # 2208 rows: more than one chunk of rows per thread (the scales are made chunk by chunk); K 1536: in parts
    x, residual = torch.randn(2208, 1536, generator=g).bfloat16(), torch.randn(2208, 64, generator=g).bfloat16()
    w = (torch.randn(64, 1536, generator=g) * 0.03).bfloat16()
    got_x, scales = residual.clone(), torch.full((2208,), float("nan"))
    assert cpu_kernels.amx_linear(x, cpu_kernels.AmxWeight(w), add_to=got_x, scale_out=(scales, 1e-5)) is got_x
    expect_x = residual.clone()
    cpu_kernels.amx_linear(x, cpu_kernels.AmxWeight(w), add_to=expect_x)
    assert torch.equal(got_x, expect_x)  # the add as without the scales
    want = expect_x.double().pow(2).mean(-1).add(1e-5).rsqrt().float()
    torch.testing.assert_close(scales, want, rtol=1e-5, atol=0)  # every row, every chunk (the sums' order differs)
    torch.testing.assert_close(cpu_kernels.row_inv_rms(expect_x, 1e-5), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["plain", "silu_mul", "rope"])
def test_amx_product_of_the_residual_with_the_norm_folded_in_equals_the_norm_then_the_product(kind):
    """rms_norm(x, g) @ W^T as the folded forward runs it: x itself, W diag(g), each row scaled by 1 / rms(x)."""
    from opd.llama import _norm_folded, apply_rope, rms_norm

    needs_amx_gemm()
    g = torch.Generator().manual_seed(11)
    B, L, K, H, D = 2, 40, 192, 3, 64
    x = (torch.randn(B * L, K, generator=g) * 3).bfloat16()
    gain = (1 + 0.3 * torch.randn(K, generator=g)).bfloat16()
    w = (torch.randn(2 * H * D, K, generator=g) * 0.1).bfloat16()
    opts, rope = {"silu_mul": dict(silu_mul=True), "rope": dict(rope_heads=H, head_dim=D)}.get(kind, {}), None
    if kind == "rope":
        freqs = torch.arange(L)[:, None] * (1e4 ** (-torch.arange(0, D, 2) / D))[None, :]
        rope = torch.cat([freqs, freqs], -1).cos().bfloat16(), torch.cat([freqs, freqs], -1).sin().bfloat16()
    got = cpu_kernels.amx_linear(x, cpu_kernels.AmxWeight(_norm_folded(w, gain), **opts), rope=rope,
                                 row_scale=cpu_kernels.row_inv_rms(x, 1e-5))
    unfolded = cpu_kernels.amx_linear(rms_norm(x, gain, 1e-5), cpu_kernels.AmxWeight(w, **opts), rope=rope)
    # the exact product of the exact norm (fp64), as each kind ends
    h = x.double() * x.double().pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt() * gain.double()
    exact = h @ w.double().T
    if kind == "silu_mul":
        gate, up = exact.chunk(2, -1)
        exact = torch.nn.functional.silu(gate) * up
    elif kind == "rope":
        q = exact.view(B, L, 2 * H, D)
        exact = torch.cat([apply_rope(q[:, :, :H], rope[0][:, None].double(), rope[1][:, None].double()), q[:, :, H:]], 2)
        exact = exact.view(B * L, -1)
    scale = exact.abs().mean()
    err_folded, err_unfolded = (got.double() - exact).abs().mean(), (unfolded.double() - exact).abs().mean()
    assert err_folded < 1.3 * err_unfolded, (err_folded / scale, err_unfolded / scale)  # bf16's noise, not more
    torch.testing.assert_close(got.double(), exact, rtol=2**-6, atol=float(0.03 * scale))

# 2208 rows: several chunks of AMX_MLP_ROWS a thread, the last of them shorter; 48: one block of 32 and one of 16
@pytest.mark.parametrize("M", [2208, 48])
def test_amx_mlp_equals_its_two_products_in_turn(M):
    needs_amx_gemm()
    g = torch.Generator().manual_seed(M)
    hidden, inter = 192, 512
    x = torch.randn(M, hidden, generator=g).bfloat16()
    gate_up = cpu_kernels.AmxWeight((torch.randn(2 * inter, hidden, generator=g) * 0.1).bfloat16(), silu_mul=True)
    down = cpu_kernels.AmxWeight((torch.randn(hidden, inter, generator=g) * 0.05).bfloat16())
    scale = cpu_kernels.row_inv_rms(x, 1e-5)
    want_x, want_scale = x.clone(), torch.empty(M)
    up = cpu_kernels.amx_linear(want_x, gate_up, row_scale=scale)
    cpu_kernels.amx_linear(up, down, add_to=want_x, scale_out=(want_scale, 1e-5))
    got_x, got_scale = x.clone(), torch.full((M,), float("nan"))
    assert cpu_kernels.amx_mlp(got_x, gate_up, down, scale, (got_scale, 1e-5)) is got_x
    assert torch.equal(got_x, want_x) and torch.equal(got_scale, want_scale)  # the same sums in the same order
    plain = x.clone()
    cpu_kernels.amx_mlp(plain, gate_up, down, scale)  # without the scales after it
    assert torch.equal(plain, want_x)
    with pytest.raises(AssertionError, match="rows a multiple of 16"):
        cpu_kernels.amx_mlp(x[:-1].contiguous(), gate_up, down, scale[:-1].contiguous())


SHORT_TEAM = """
import torch
from opd import cpu_kernels, llama
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(2)
cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval().bfloat16()
ids = torch.randint(0, 256, (4, 32))
for _ in range(2):
    llama.causal_hidden(model, ids)
ran, layers = [], cpu_kernels.amx_layers
cpu_kernels.amx_layers = lambda *a, **k: ran.append(layers(*a, **k)) or ran[-1]
got = llama.causal_hidden(model, ids)
cpu_kernels.amx_layers = lambda *a, **k: False
print(ran, torch.equal(got, llama.causal_hidden(model, ids)))
"""


def test_amx_layers_step_aside_when_openmp_hands_out_fewer_threads():
    """Under OMP_THREAD_LIMIT=1 torch still says 2 threads, but the kernels' team has 1: the one-call layers would
    leave the second thread's sequences out, so they do nothing and the step-by-step path runs (the same result)."""
    needs_amx_gemm()
    env = {**os.environ, "OMP_THREAD_LIMIT": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SHORT_TEAM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[False] True"
