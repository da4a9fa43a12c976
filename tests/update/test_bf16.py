"""train.bf16_weights: the update on a bf16 copy, fp32 master weights, one fused optimizer pass (opd.update.bf16)."""

import copy

import pytest
import torch

from opd import cpu_kernels
from opd.config import FeedbackConfig, ObjectiveConfig, TrainConfig
from opd.feedback import compute_feedback
from opd.rollout import SamplingParams, sample
from opd.rollout.sampler import SamplingCopy
from opd.teacher import LocalTeacher
from opd.update import make_optimizer, make_scheduler, update_student
from opd.update.bf16 import Bf16Weights, grad_norm

needs_kernel = pytest.mark.skipif(not cpu_kernels.adamw_available(), reason="opd's AdamW kernel needs x86 AVX2 + a C compiler")


@pytest.fixture
def batch(student, teacher_model, tokenizer, prompts):
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10), generator=torch.Generator().manual_seed(4))
    return roll, LocalTeacher(teacher_model, topk=4).score(roll, full=True)


def params_of(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@needs_kernel
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_steps_as_torch_adamw_and_writes_the_rounded_copy(grad_dtype):
    g = torch.Generator().manual_seed(0)
    n = 4099  # not a multiple of 8 or of a chunk: the scalar tail runs too
    param = torch.randn(n, generator=g)
    ref = param.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, fused=True)
    m, v, out = torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    for step in range(1, 5):
        grad = (torch.randn(n, generator=g) * step).to(grad_dtype)
        ref.grad = grad.float() * 0.3
        opt.step()
        cpu_kernels.adamw_step(param, grad, m, v, out, grad_mul=0.3, lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6,
                               weight_decay=0.1, step=step)
    torch.testing.assert_close(param, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-7)
    assert torch.equal(out, param.bfloat16())  # round to nearest even, as torch's cast


@needs_kernel
def test_the_kernels_bf16_rounding_matches_torch_on_ties_and_specials():
    # fp32 values whose bf16 rounding is a tie (both ways), large, tiny, signed zero, inf and NaN
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x00000001, 0x80000000, 0x7F800000,
                         0xFF800000, 0x7FC00001, 0x7F800001], dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32).repeat(3)  # 30 values: vector lanes and the scalar tail
    param, out = values.clone(), torch.empty_like(values, dtype=torch.bfloat16)
    zeros = torch.zeros_like(values)
    # lr 0 and a zero gradient: the weights stay as they are and are only rounded into the copy
    cpu_kernels.adamw_step(param, zeros, zeros.clone(), zeros.clone(), out, grad_mul=1.0, lr=0.0, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    want = values.bfloat16()
    finite = ~values.isnan()
    assert torch.equal(out[finite].view(torch.int16), want[finite].view(torch.int16))
    assert out[~finite].isnan().all()


@needs_kernel
def test_sum_squares_is_the_fp64_sum():
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(1))
    for t in (x, x.bfloat16()):
        assert cpu_kernels.sum_squares_all([t]) == pytest.approx(float(t.double().square().sum()), rel=1e-5)


def test_the_sum_over_many_tensors_is_the_fp64_sum_of_each():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(n, generator=g) for n in (1, 7, 8193, 100_003, 0)] + [torch.randn(30, 20, generator=g)]
    tensors += [t.bfloat16() for t in tensors] + [torch.randn(9, 4, generator=g).t()]  # bf16; one not contiguous
    want = sum(float(t.double().square().sum()) for t in tensors)
    assert cpu_kernels.sum_squares_all(tensors) == pytest.approx(want, rel=1e-6)
    assert cpu_kernels.sum_squares_all([]) == 0.0


def test_master_adamw_state_is_torch_adamws_and_loads_either_way(student):
    w = Bf16Weights(student)
    opt = w.optimizer(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    ids = torch.randint(4, 60, (2, 12))
    model = w.model()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = opt.state_dict()
    plain = make_optimizer(copy.deepcopy(student), TrainConfig(lr=1e-3))
    plain.load_state_dict(state)  # a bf16-weights checkpoint resumes as a plain fp32 run
    assert set(plain.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    again = Bf16Weights(copy.deepcopy(student)).optimizer(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    again.load_state_dict(plain.state_dict())  # and back
    for k, s in state["state"].items():
        torch.testing.assert_close(again.state_dict()["state"][k]["exp_avg"], s["exp_avg"])


@pytest.mark.parametrize("kernel", [True, False])
def test_master_adamw_is_adamw_on_the_bf16_gradients(student, monkeypatch, kernel):
    if kernel and not cpu_kernels.adamw_available():
        pytest.skip("opd's AdamW kernel needs x86 AVX2 + a C compiler")
    monkeypatch.setattr(cpu_kernels, "adamw_available", lambda: kernel)  # False: torch's ops
    ref = copy.deepcopy(student)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    w = Bf16Weights(student)
    opt = w.optimizer(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    ids = torch.randint(4, 60, (3, 16), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        model = w.model()
        model(input_ids=ids, labels=ids).loss.backward()
        for p, c in zip(ref.parameters(), model.parameters()):
            p.grad = c.grad.float()  # the same gradients, upcast
        ref_opt.step()
        opt.step()
        opt.zero_grad()
        assert all(c.grad is None for c in model.parameters())  # zero_grad clears the copy, where they are
    torch.testing.assert_close(params_of(student), params_of(ref), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(c, s.detach().bfloat16()) for c, s in zip(w.copy.model.parameters(), student.parameters()))
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_the_clip_is_a_coefficient_on_the_next_step(student):
    from opd.update.step import clip_gradients

    w = Bf16Weights(student)
    opt = w.optimizer(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    model = w.model()
    ids = torch.randint(4, 60, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in params]
    norm = clip_gradients(params, 0.01, opt)
    want = torch.cat([g.float().flatten() for g in before]).norm()
    assert float(norm) == pytest.approx(float(want), rel=1e-4)
    assert opt.grad_mul == pytest.approx(0.01 / (float(want) + 1e-6), rel=1e-4)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))  # no pass over the gradients
    # the same step as AdamW on gradients clipped beforehand (eps = 1 makes Adam's step depend on their scale)
    ref = copy.deepcopy(student)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1.0, weight_decay=0.0)
    for p, g in zip(ref.parameters(), before):
        p.grad = g.float() * opt.grad_mul
    opt.param_groups[0]["eps"] = 1.0
    ref_opt.step()
    opt.step()
    assert opt.grad_mul == 1.0  # used once
    torch.testing.assert_close(params_of(student), params_of(ref), rtol=1e-5, atol=1e-7)
    assert grad_norm(params) == pytest.approx(float(want), rel=1e-4)


def run_update(model, optimizer, roll, scores, objective="reverse_kl", **train_kw):
    train = TrainConfig(lr=1e-2, **train_kw)
    fb = compute_feedback(roll, scores, FeedbackConfig())
    return update_student(model, optimizer, make_scheduler(optimizer, train, 10), roll, scores, fb,
                          objective=ObjectiveConfig(name=objective), train=train, version=0, chunk_size=7)


@pytest.mark.parametrize("objective", ["reverse_kl", "pg"])
def test_an_update_on_bf16_weights_is_close_to_the_fp32_update(student, batch, objective):
    roll, scores = batch
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    ma, _ = run_update(a, make_optimizer(a, TrainConfig(lr=1e-2)), roll, scores, objective)
    w = Bf16Weights(b)
    mb, version = run_update(w.model(), w.optimizer(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0), roll, scores,
                             objective)
    assert version == 1
    step_a, step_b = params_of(a) - params_of(student), params_of(b) - params_of(student)
    assert not torch.equal(step_a, step_b) and step_b.abs().max() > 0
    # Adam's steps are ~lr a weight whatever the gradient's size: the signs must agree almost everywhere
    assert torch.nn.functional.cosine_similarity(step_a, step_b, dim=0) > 0.95
    assert mb["stability/grad_norm"] == pytest.approx(ma["stability/grad_norm"], rel=0.05)
    assert mb["update/loss"] == pytest.approx(ma["update/loss"], rel=0.03, abs=1e-3)


def test_a_shared_sampling_copy_is_not_copied_again_and_samples_the_new_weights(student, batch, tokenizer, prompts):
    roll, scores = batch
    shared = SamplingCopy(student, torch.bfloat16)
    w = Bf16Weights(student, shared)
    assert w.copy is shared
    params = SamplingParams(max_new_tokens=8)
    sample(shared.refresh(student), tokenizer, prompts, params, generator=torch.Generator().manual_seed(1))  # caches
    run_update(w.model(), w.optimizer(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0), roll, scores)
    copies = []
    real = torch.Tensor.copy_
    torch.Tensor.copy_ = lambda self, src, *a, **k: copies.append(1) or real(self, src, *a, **k)
    try:
        policy = shared.refresh(student)
    finally:
        torch.Tensor.copy_ = real
    assert not copies  # the optimizer wrote the copy: nothing to refresh
    assert all(torch.equal(c, s.detach().bfloat16()) for c, s in zip(policy.parameters(), student.parameters()))
    fast = sample(policy, tokenizer, prompts, params, generator=torch.Generator().manual_seed(1))
    hf = sample(policy, tokenizer, prompts, SamplingParams(max_new_tokens=8, decoder="hf"),
                generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.completion_ids, hf.completion_ids)  # the fast decoder's caches saw the new weights
    # a write into the student afterwards (a resume, a rollback) is seen by its version counter: copied again
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    policy = shared.refresh(student)
    assert torch.equal(next(policy.parameters()), next(student.parameters()).detach().bfloat16())


def test_a_first_refresh_always_copies(student):
    shared = SamplingCopy(student, torch.bfloat16)
    with torch.no_grad():
        next(student.parameters()).data.add_(1.0)  # .data: no version counter moves
    assert torch.equal(next(shared.refresh(student).parameters()), next(student.parameters()).detach().bfloat16())


def test_bf16_weights_needs_an_fp32_student(student):
    with pytest.raises(ValueError, match="float32"):
        Bf16Weights(copy.deepcopy(student).to(torch.bfloat16))


def test_the_config_rejects_bf16_weights_with_autocast_or_a_bf16_student():
    from opd.config import Config

    with pytest.raises(ValueError, match="autocast = 'none'"):
        Config.model_validate({"train": {"bf16_weights": True, "autocast": "bfloat16"}})
    with pytest.raises(ValueError, match="student.dtype = 'float32'"):
        Config.model_validate({"train": {"bf16_weights": True}, "student": {"dtype": "bfloat16"}})
    assert Config.model_validate({"train": {"bf16_weights": True}}).train.bf16_weights



@needs_kernel
def test_the_kernel_writes_the_copys_int8_rows_in_the_same_pass():
    from opd.llama import quantize_int8

    g = torch.Generator().manual_seed(3)
    rows, K = 37, 75  # K not a multiple of 8 or 16: the tails of both loops run
    args = dict(grad_mul=0.5, lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, step=2)
    param = torch.randn(rows, K, generator=g)
    param[5] = 0.0  # an all-zero row: the smallest scale, zeros
    grad = torch.randn(rows, K, generator=g).bfloat16()
    grad[5] = 0.0
    m, v = torch.randn(rows, K, generator=g).abs() * 1e-3, torch.rand(rows, K, generator=g) * 1e-4
    m[5], v[5] = 0.0, 0.0  # row 5 stays all zero
    plain = [t.clone() for t in (param, m, v)] + [torch.empty(rows, K, dtype=torch.bfloat16)]
    cpu_kernels.adamw_step(plain[0], grad, plain[1], plain[2], plain[3], **args)
    copy_ = torch.empty(rows, K, dtype=torch.bfloat16)
    q, scale = torch.empty(rows, K, dtype=torch.int8), torch.empty(rows)
    cpu_kernels.adamw_step(param, grad, m, v, copy_, int8=(q, scale), **args)
    assert all(torch.equal(a, b) for a, b in zip((param, m, v, copy_), plain))  # the same step, bit for bit
    fresh = quantize_int8(copy_)  # what a rollout's requantisation of the copy would write
    assert torch.equal(q, fresh.q) and torch.equal(scale, fresh.scale) and scale[5] == 1e-12
    with pytest.raises(ValueError, match="int8"):
        cpu_kernels.adamw_step(param, grad, m, v, copy_, int8=(q[:, :4], scale), **args)


@needs_kernel
def test_the_optimizer_keeps_the_int8_decode_weights_current_without_requantising(student, batch, tokenizer, prompts,
                                                                                  monkeypatch):
    from opd import llama
    from opd.rollout.fast_llama import build_decoder

    roll, scores = batch
    shared = SamplingCopy(student, torch.bfloat16)
    w = Bf16Weights(student, shared)
    opt = w.optimizer(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    policy = w.model()
    first = build_decoder(policy, 2, 16, int8=True)
    if first is None or first.int8 is None or first.int8[0][0].scale.dtype != torch.float32:
        pytest.skip("opd's int8 kernel (fp32 scales) does not build here")
    run_update(policy, opt, roll, scores)
    quantised = []
    real = llama.quantize_int8
    monkeypatch.setattr(llama, "quantize_int8", lambda *a, **k: quantised.append(1) or real(*a, **k))
    again = build_decoder(w.model(), 2, 16, int8=True)
    assert not quantised  # the optimizer's pass wrote them
    monkeypatch.setattr(llama, "quantize_int8", real)
    layers = policy.model.layers
    for i, layer in enumerate(layers):  # and they are what a requantisation of the new weights gives
        att, mlp = layer.self_attn, layer.mlp
        fresh = [real(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])), real(att.o_proj.weight),
                 real(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), real(mlp.down_proj.weight)]
        for got, want in zip(again.int8[i], fresh):
            assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    head = real(policy.lm_head.weight)
    assert torch.equal(again.int8[-1][0].q, head.q) and torch.equal(again.int8[-1][0].scale, head.scale)
    # a write the optimizer did not make (a refresh from the student) leaves them stale: int8_rows says so
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    w.model()
    assert llama.int8_rows(policy, list(policy.parameters())) is None
