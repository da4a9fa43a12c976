import copy

import pytest
import torch

from opd import cpu_kernels
from opd.config import FeedbackConfig, ObjectiveConfig, TrainConfig
from opd.feedback import compute_feedback
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.update import make_optimizer, make_scheduler, update_student
from opd.update.step import EmbeddingRowsGrad, embedding_rows_grad

OBJECTIVES = ["pg", "reverse_kl", "gkd", "topk_kl", "hybrid"]


@pytest.fixture
def batch(student, teacher_model, tokenizer, prompts):
    prompts = [p for p in prompts for _ in range(2)]  # groups of 2 for hybrid
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10), generator=torch.Generator().manual_seed(4))
    scores = LocalTeacher(teacher_model, topk=4).score(roll, full=True)
    return roll, scores


def run_update(model, roll, scores, objective="pg", sgd=False, lr=1e-2, feedback=None, **train_kw):
    obj = ObjectiveConfig(name=objective, beta=0.5)
    train = TrainConfig(lr=lr, **train_kw)
    rewards = torch.arange(len(roll.texts)).remainder(2).float() if objective == "hybrid" else None
    fb = compute_feedback(roll, scores, feedback or FeedbackConfig(), rewards=rewards, group_size=2)
    # Plain SGD(lr=1) makes the parameter change equal minus the gradient (AdamW would amplify rounding).
    opt = torch.optim.SGD(model.parameters(), lr=1.0) if sgd else make_optimizer(model, train)
    sched = make_scheduler(opt, train, 10)
    return update_student(model, opt, sched, roll, scores, fb, objective=obj, train=train, version=0, chunk_size=7)


def params_of(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_no_padding_or_prompt_token_reaches_the_loss(student, batch, objective):
    roll, scores = batch
    assert (roll.completion_mask == 0).any() and (roll.prompt_mask == 0).any()
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    run_update(a, roll, scores, objective, sgd=True)
    # Garbage everywhere a mask says "not a token": ids, behaviour logprobs, teacher outputs.
    r2, s2 = copy.deepcopy(roll), copy.deepcopy(scores)
    pad_c, pad_p = r2.completion_mask == 0, r2.prompt_mask == 0
    g = torch.Generator().manual_seed(0)
    r2.completion_ids[pad_c] = torch.randint(4, 90, (int(pad_c.sum()),), generator=g)
    r2.prompt_ids[pad_p] = torch.randint(4, 90, (int(pad_p.sum()),), generator=g)
    r2.behaviour_logprobs[pad_c] = -123.0
    s2.token_logprobs[pad_c] = 1e6
    s2.full_logprobs[pad_c] = -1e3
    s2.topk_logprobs[pad_c] = 5.0
    s2.topk_ids[pad_c] = 7
    run_update(b, r2, s2, objective, sgd=True)
    assert not torch.equal(params_of(a), params_of(student))  # the update did something
    torch.testing.assert_close(params_of(a), params_of(b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective", ["pg", "reverse_kl"])
def test_gradient_accumulation_equals_one_big_batch(student, batch, objective):
    roll, scores = batch
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    ma, _ = run_update(a, roll, scores, objective, sgd=True, grad_clip=0)
    mb, _ = run_update(b, roll, scores, objective, sgd=True, grad_clip=0, micro_batch_size=3)
    delta = params_of(a) - params_of(student)
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(params_of(a), params_of(b), rtol=0, atol=1e-6)
    assert ma["update/loss"] == pytest.approx(mb["update/loss"], rel=1e-5)


def test_first_step_is_on_policy(student, batch):
    roll, scores = batch
    m, version = run_update(student, roll, scores)
    assert version == 1
    assert m["freshness/policy_lag"] == 0 and m["freshness/policy_lag_max"] == 0
    assert m["freshness/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and m["stability/clip_frac"] == 0
    assert m["freshness/logprob_drift"] < 1e-4
    assert m["stability/grad_norm"] > 0 and m["stability/entropy"] > 0


@pytest.mark.parametrize("objective", ["pg", "reverse_kl"])
def test_a_top_p_rollout_is_on_policy_at_its_first_step(student, teacher_model, tokenizer, prompts, objective):
    # The behaviour logprob of a top-p rollout is the nucleus's (renormalised: larger than the softmax's). The
    # ratio, PPO's clip and the drift compared it with the update's untruncated softmax: at top_p = 0.5 the ratio
    # was ~0.5 on a fresh batch and 77% of the tokens were clipped. They compare with the student's own softmax now,
    # and A_t is the teacher's logprob minus that one (the teacher's is untruncated too).
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10, top_p=0.5),
                  generator=torch.Generator().manual_seed(4))
    mask = roll.completion_mask.bool()
    assert roll.student_logprobs is not None and roll.teacher_share is None
    assert bool((roll.behaviour_logprobs[mask] > roll.student_logprobs[mask] + 1e-3).any())  # the nucleus renormalises
    scores = LocalTeacher(teacher_model, topk=4).score(roll, full=True)
    fb = compute_feedback(roll, scores, FeedbackConfig())
    torch.testing.assert_close(fb.advantages[mask], (scores.token_logprobs - roll.student_logprobs)[mask])
    m, _ = run_update(copy.deepcopy(student), roll, scores, objective)
    assert m["freshness/ratio_min"] == pytest.approx(1.0, abs=1e-4) and m["stability/clip_frac"] == 0
    assert m["freshness/logprob_drift"] < 1e-4


def importance_weighted_pg_step(model, roll, scores):
    """One SGD(lr=1) step on -(pi_own / q) A log pi_theta, token-normalised: what the pg objective's gradient is on
    a fresh batch (the ratio to the old student is 1, so PPO's clip takes nothing out)."""
    fb = compute_feedback(roll, scores, FeedbackConfig())
    mask = roll.completion_mask.bool()
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    attn = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, roll.prompt_ids.shape[1] - 1:-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, roll.completion_ids[..., None]).squeeze(-1)
    w = torch.exp(roll.student_logprobs - roll.behaviour_logprobs)
    loss = -(w * fb.advantages * lp)[mask].sum() / fb.loss_mask[mask].sum()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad


def test_the_pg_step_on_a_top_p_rollout_weights_tokens_by_pi_over_q(student, teacher_model, tokenizer, prompts):
    # pi_theta / q, split as (pi_theta / pi_own) x (pi_own / q): on a fresh batch the gradient is that of
    # -(pi_own / q) A log pi_theta, the importance-weighted policy gradient, with nothing clipped.
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=8, top_p=0.6),
                  generator=torch.Generator().manual_seed(1))
    scores = LocalTeacher(teacher_model, topk=4).score(roll)
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    run_update(a, roll, scores, "pg", sgd=True, grad_clip=0, warmup_steps=0, updates_per_batch=1)
    importance_weighted_pg_step(b, roll, scores)
    torch.testing.assert_close(params_of(a), params_of(b), rtol=0, atol=2e-5)


def test_train_lr_is_the_rate_the_step_used(student, batch):
    # it read the scheduler after its step: the next step's rate (1e-4 for a step that used 5e-5 in warmup)
    roll, scores = batch
    m, _ = run_update(copy.deepcopy(student), roll, scores, lr=1e-2, warmup_steps=20, updates_per_batch=1)
    assert m["train/lr"] == pytest.approx(1e-2 / 20)
    m, _ = run_update(copy.deepcopy(student), roll, scores, lr=1e-2, warmup_steps=20, updates_per_batch=2)
    assert m["train/lr"] == pytest.approx(2e-2 / 20)  # the second optimizer step's


def test_several_updates_per_batch_count_policy_lag(student, batch):
    roll, scores = batch
    m, version = run_update(student, roll, scores, updates_per_batch=2)
    assert version == 2
    assert m["freshness/policy_lag_max"] == 1
    second_half = roll.completion_mask[len(roll.texts) // 2 :].sum() / roll.completion_mask.sum()
    assert m["freshness/policy_lag"] == pytest.approx(float(second_half), rel=1e-5)
    assert m["freshness/ratio_max"] != 1.0  # the second mini-batch is evaluated under updated weights


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_reduces_its_divergence_on_a_fixed_batch(student, batch, objective):
    roll, scores = batch
    first = None
    for _ in range(5):
        m, _ = run_update(student, roll, scores, objective, lr=1e-3)
        first = first if first is not None else m
    key = "update/distribution_loss" if objective in ("reverse_kl", "gkd", "topk_kl") else "update/new_logprob_mean"
    if objective in ("reverse_kl", "gkd", "topk_kl"):
        assert m[key] < first[key]
    else:
        # pg pushes up tokens the teacher prefers: the student's logprob of the batch's
        # teacher-preferred tokens rises, so the sampled estimate of reverse KL falls.
        assert m["update/loss"] < first["update/loss"]


def test_kl_to_reference_is_zero_at_the_start_and_counted(student, batch):
    roll, scores = batch
    ref = copy.deepcopy(student).requires_grad_(False)
    obj = ObjectiveConfig(kl_ref_coef=0.5)
    train = TrainConfig(lr=1e-2)
    fb = compute_feedback(roll, scores, FeedbackConfig())
    opt = make_optimizer(student, train)
    m, _ = update_student(student, opt, make_scheduler(opt, train, 5), roll, scores, fb, objective=obj, train=train,
                          version=0, ref_model=ref)
    assert m["stability/kl_ref"] == pytest.approx(0.0, abs=1e-6)
    m, _ = update_student(student, opt, make_scheduler(opt, train, 5), roll, scores, fb, objective=obj, train=train,
                          version=1, ref_model=ref)
    assert m["stability/kl_ref"] > 0


def test_non_finite_batch_is_skipped_not_applied(student, batch):
    roll, scores = batch
    scores.token_logprobs[0, 0] = float("nan")
    before = params_of(student)
    m, version = run_update(student, roll, scores)
    assert m["stability/skipped_batches"] == 1 and version == 0
    assert torch.equal(params_of(student), before)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_truncation_never_lets_a_token_past_the_cut_reach_the_loss(student, batch, objective):
    roll, scores = copy.deepcopy(batch[0]), copy.deepcopy(batch[1])
    # A known break in every sequence: the teacher likes tokens 0-1 and rules out everything from token 2.
    real = roll.completion_mask.bool()
    scores.token_logprobs[:, :2] = -0.1
    scores.token_logprobs[:, 2:] = -20.0
    truncate = FeedbackConfig(break_window=1, broken_prefix="truncate", keep_after_break=1)  # cut after token 3
    past = (torch.arange(real.shape[1])[None, :] > 3) & real
    assert past.any()
    a, b, c, d = (copy.deepcopy(student) for _ in range(4))
    run_update(a, roll, scores, objective, sgd=True, feedback=truncate)
    # NaN, inf and junk in every teacher number past the cut: the update must not change at all.
    s2 = copy.deepcopy(scores)
    s2.token_logprobs[past] = float("nan")
    s2.full_logprobs[past] = float("nan")
    s2.topk_logprobs[past] = float("inf")
    s2.topk_ids[past] = 7
    m, version = run_update(b, roll, s2, objective, sgd=True, feedback=truncate)
    assert version == 1 and m["stability/skipped_batches"] == 0
    assert not torch.equal(params_of(a), params_of(student))
    torch.testing.assert_close(params_of(a), params_of(b), rtol=0, atol=1e-6)
    # The same tokens do matter when they are kept: the check above can fail.
    run_update(c, roll, scores, objective, sgd=True, feedback=FeedbackConfig(break_window=1))
    assert (params_of(c) - params_of(a)).abs().max() > 1e-6
    run_update(d, roll, s2, objective, sgd=True, feedback=FeedbackConfig(break_window=1))
    assert torch.equal(params_of(d), params_of(student))  # kept garbage: the step is skipped, never applied


def test_guided_rollouts_weight_by_pi_over_q_and_read_fresh(student, teacher_model, tokenizer, prompts):
    from opd.rollout import TeacherGuide

    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10),
                  generator=torch.Generator().manual_seed(4), guide=TeacherGuide(teacher_model, mix=0.5))
    scores = LocalTeacher(teacher_model).score(roll)
    mask = roll.completion_mask.bool()
    w = torch.exp(roll.student_logprobs - roll.behaviour_logprobs)[mask]
    assert float(w.max() - w.min()) > 0.05  # q mixes in the teacher: pi_own / q is not 1
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    m, _ = run_update(a, roll, scores, "pg", sgd=True, grad_clip=0, warmup_steps=0, updates_per_batch=1)
    # Freshness reads the student against the student that sampled: a fresh batch, ratio 1, nothing clipped (the
    # ratio to q, reported before, is not 1 even on a fresh batch) ...
    assert m["freshness/logprob_drift"] < 1e-4 and m["stability/clip_frac"] == 0
    assert m["freshness/ratio_min"] == pytest.approx(1.0, abs=1e-4) == m["freshness/ratio_max"]
    # ... and the gradient weights every token, replaced or not, by pi_theta / q
    importance_weighted_pg_step(b, roll, scores)
    torch.testing.assert_close(params_of(a), params_of(b), rtol=0, atol=2e-5)


@pytest.mark.parametrize("objective", ["reverse_kl", "pg"])
def test_bf16_autocast_update_is_close_to_fp32(student, batch, objective):
    # train.autocast = "bfloat16": the student's forward in bf16, parameters / gradients / loss in fp32.
    roll, scores = batch
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    ma, _ = run_update(a, roll, scores, objective, sgd=True, grad_clip=0)
    mb, _ = run_update(b, roll, scores, objective, sgd=True, grad_clip=0, autocast="bfloat16")
    assert all(p.dtype == torch.float32 for p in b.parameters())
    step_a, step_b = params_of(a) - params_of(student), params_of(b) - params_of(student)  # = -gradient (SGD, lr 1)
    assert not torch.equal(step_a, step_b)  # autocast did change the arithmetic
    cos = torch.nn.functional.cosine_similarity(step_a, step_b, dim=0)
    assert cos > 0.99 and (step_b.norm() / step_a.norm() - 1).abs() < 0.05
    assert mb["update/loss"] == pytest.approx(ma["update/loss"], rel=0.02, abs=1e-3)
    assert mb["update/new_logprob_mean"] == pytest.approx(ma["update/new_logprob_mean"], rel=0.02)


def test_autocast_keeps_the_log_softmax_in_fp32(student, batch):
    from opd.update.step import student_token_terms, update_autocast

    roll, scores = batch
    with update_autocast(student, "bfloat16"):
        terms = student_token_terms(student, roll, scores, ObjectiveConfig(name="reverse_kl"), 7)
    assert terms.new_logprobs.dtype == torch.float32 and terms.distribution_loss.dtype == torch.float32
    assert (terms.new_logprobs <= 0).all()


def test_the_next_rollout_samples_with_the_updated_weights(student, batch, tokenizer, prompts):
    # The fast decoder caches fused weights until a weight's version moves; the fused AdamW step writes the
    # weights without moving it, so update_student has to mark them (a stale cache samples with old weights).
    roll, scores = batch
    params = SamplingParams(max_new_tokens=8)
    sample(student, tokenizer, prompts, params, generator=torch.Generator().manual_seed(1))  # fills the cache
    opt = make_optimizer(student, TrainConfig(lr=1e-2))
    assert opt.defaults["fused"]  # the CPU fused kernel is in use
    run_update(student, roll, scores, "pg", lr=1e-2)
    fast = sample(student, tokenizer, prompts, params, generator=torch.Generator().manual_seed(1))
    hf = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=8, decoder="hf"),
                generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.completion_ids, hf.completion_ids)
    torch.testing.assert_close(fast.behaviour_logprobs, hf.behaviour_logprobs, rtol=0, atol=1e-5)


@pytest.mark.skipif(not __import__("opd.matmul").matmul.onednn_available(), reason="torch built without oneDNN")
def test_fp32_update_through_onednn_matches_the_default_kernel(student, batch, monkeypatch):
    # opd.matmul routes the fp32 update's products (forward and backward) to oneDNN where that is faster: the same
    # step as torch's default BLAS up to summation order.
    from opd import matmul

    roll, scores = batch
    seen = []
    real = matmul._onednn_linear
    monkeypatch.setattr(matmul, "_onednn_linear", lambda *a: seen.append(1) or real(*a))
    monkeypatch.setattr(matmul, "MIN_DIM", 1)  # the test's tiny student: reroute every product anyway
    steps, metrics = {}, {}
    for kernel in ("blas", "onednn"):
        monkeypatch.setenv("OPD_FP32_MATMUL", kernel)
        matmul.fp32_kernel.cache_clear()
        model = copy.deepcopy(student)
        metrics[kernel], _ = run_update(model, roll, scores, "reverse_kl", sgd=True, grad_clip=0)
        steps[kernel] = params_of(model) - params_of(student)
    matmul.fp32_kernel.cache_clear()
    assert seen  # the oneDNN run did go through oneDNN
    assert torch.allclose(steps["onednn"], steps["blas"], atol=1e-5, rtol=1e-3)
    assert metrics["onednn"]["update/loss"] == pytest.approx(metrics["blas"]["update/loss"], rel=1e-5)


def test_bf16_cpu_update_trains_through_eager_attention_and_restores_the_model(student, batch, monkeypatch):
    from opd.update import step

    roll, scores = batch
    assert student.config._attn_implementation == "sdpa"
    used = []
    real = step.student_token_terms
    monkeypatch.setattr(step, "student_token_terms", lambda m, *a: used.append(m.config._attn_implementation) or real(m, *a))
    steps = {}
    for limit in (0, step.EAGER_ATTENTION_MAX_BYTES):  # 0: too big for eager -> the model's own SDPA
        monkeypatch.setattr(step, "EAGER_ATTENTION_MAX_BYTES", limit)
        model = copy.deepcopy(student)
        run_update(model, roll, scores, "reverse_kl", sgd=True, grad_clip=0, autocast="bfloat16")
        assert model.config._attn_implementation == "sdpa"  # restored after the update
        steps[limit] = params_of(model) - params_of(student)
    run_update(copy.deepcopy(student), roll, scores, "reverse_kl", sgd=True, grad_clip=0)  # fp32: SDPA
    assert used == ["sdpa", step.GROUPED_EAGER, "sdpa"]
    a, b = steps.values()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99  # the same step up to bf16 rounding


@pytest.mark.parametrize("heads, kv_heads, head_dim, mask_kind",
                         [(6, 2, 16, "additive"), (4, 4, 16, "boolean"), (6, 3, 12, "none, causal"),
                          (6, 2, 16, "none, not causal")])
def test_grouped_eager_attention_is_hfs_eager_attention(heads, kv_heads, head_dim, mask_kind):
    """The same outputs and gradients as transformers' eager_attention_forward (which copies each key/value head for
    its query heads): grouped query heads, plain heads, a scale that is not a power of two (head size 12), and the
    masks of HF's SDPA interface: additive, boolean, and none (causal for a causal module, as SDPA's is_causal)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from opd.update.step import grouped_eager_attention

    class Module:
        num_key_value_groups, training = heads // kv_heads, True
        is_causal = mask_kind != "none, not causal"

    B, L = 3, 11
    g = torch.Generator().manual_seed(heads + head_dim)
    base = torch.randn(B, L, heads + 2 * kv_heads, head_dim, generator=g)
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
    additive = torch.zeros(B, 1, L, L).masked_fill(~causal, float("-inf"))
    masks = {"additive": (additive, additive), "boolean": (causal, additive), "none, causal": (None, additive),
             "none, not causal": (None, None)}
    ours, hfs = masks[mask_kind]
    results = []
    for fn, mask in ((eager_attention_forward, hfs), (grouped_eager_attention, ours)):
        x = base.clone().requires_grad_()
        q, k, v = x[:, :, :heads].transpose(1, 2), x[:, :, heads:heads + kv_heads].transpose(1, 2), x[:, :, heads + kv_heads:].transpose(1, 2)
        out, _ = fn(Module(), q, k, v, mask, head_dim**-0.5)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad))
    (want, want_grad), (got, got_grad) = results
    assert got.shape == want.shape == (B, L, heads, head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_kernels.bf16_training_ops(), reason="the C causal softmax needs AVX-512 BF16 and a C compiler")
@pytest.mark.parametrize("L, Lk, scale", [(37, 37, 1.0), (5, 21, 0.125)])  # queries that follow cached keys; a scale
def test_the_c_causal_softmax_is_the_masked_fp32_softmax_cast_to_bf16(L, Lk, scale):
    from opd.update.layer_ops import CausalSoftmaxBF16

    g = torch.Generator().manual_seed(L)
    scores = (torch.randn(2, 3, 2 * L, Lk, generator=g) * 4).bfloat16()  # two query heads a key head, stacked
    dprobs = torch.randn(2, 3, 2 * L, Lk, generator=g).bfloat16()
    seen = torch.ones(L, Lk, dtype=torch.bool).tril(Lk - L).repeat(2, 1)  # row r: the query at r % L
    results = []
    for c in (True, False):
        s = scores.clone().requires_grad_()
        if c:
            probs = CausalSoftmaxBF16.apply(s, L, scale)
        else:
            probs = torch.softmax((s * scale).masked_fill(~seen, float("-inf")), dim=-1,
                                  dtype=torch.float32).to(torch.bfloat16)
        probs.backward(dprobs)
        results.append((probs.detach(), s.grad))
    (got, got_grad), (want, want_grad) = results
    assert (got[..., ~seen] == 0).all() and (got_grad[..., ~seen] == 0).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2**-8)  # a bf16 step of a probability
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0,
                               atol=2**-7 * float(want_grad.float().abs().max()))


@pytest.mark.skipif(not cpu_kernels.bf16_training_ops(), reason="the C causal softmax needs AVX-512 BF16 and a C compiler")
def test_grouped_eager_attention_in_bf16_takes_the_c_pass_and_is_hfs_eager_attention(monkeypatch):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from opd.update import layer_ops
    from opd.update.step import grouped_eager_attention

    class Module:
        num_key_value_groups, training, is_causal = 3, True, True

    B, L, heads, kv_heads, head_dim = 2, 19, 6, 2, 64
    base = torch.randn(B, L, heads + 2 * kv_heads, head_dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    additive = torch.zeros(B, 1, L, L, dtype=torch.bfloat16).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(),
                                                                         torch.finfo(torch.bfloat16).min)
    calls = []
    real = layer_ops.CausalSoftmaxBF16.apply
    monkeypatch.setattr(layer_ops.CausalSoftmaxBF16, "apply", lambda *a: calls.append(a[1:]) or real(*a))
    results = []
    for fn, mask in ((eager_attention_forward, additive), (grouped_eager_attention, None)):
        x = base.clone().requires_grad_()
        q, k, v = x[:, :, :heads].transpose(1, 2), x[:, :, heads:heads + kv_heads].transpose(1, 2), x[:, :, heads + kv_heads:].transpose(1, 2)
        out, _ = fn(Module(), q, k, v, mask, head_dim**-0.5)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach().float(), x.grad.float()))
    assert calls == [(L, 0.125)]
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=0, atol=2**-6 * float(want.abs().max()))
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=2**-6 * float(want_grad.abs().max()))


@pytest.mark.parametrize("micro, padding_idx", [(0, None), (2, None), (0, "a prompt token")])
def test_embedding_rows_gradient_of_a_tied_head_gives_the_dense_step(student, batch, monkeypatch, micro, padding_idx):
    import contextlib

    from opd.update import step

    roll, scores = batch
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight  # tied in the built-in student
    student = copy.deepcopy(student)
    if padding_idx is not None:  # a token the batch looks up: its row gets no gradient from the lookup, either way
        student.get_input_embeddings().padding_idx = int(roll.prompt_ids[roll.prompt_mask.bool()][0])
    seen = []
    real = step.student_token_terms
    monkeypatch.setattr(step, "student_token_terms",
                        lambda m, *a: seen.append("forward" in vars(m.get_input_embeddings())) or real(m, *a))
    steps = {}
    for rows in (False, True):
        if not rows:
            monkeypatch.setattr(step, "embedding_rows_grad", lambda m: contextlib.nullcontext(EmbeddingRowsGrad(None)))
        else:
            monkeypatch.setattr(step, "embedding_rows_grad", embedding_rows_grad)
            monkeypatch.setattr(step, "EMBEDDING_ROWS_MIN_WEIGHTS", 0)  # the built-in student's is below the size
        model = copy.deepcopy(student)
        run_update(model, roll, scores, "reverse_kl", sgd=True, grad_clip=0, micro_batch_size=micro)
        assert "forward" not in vars(model.get_input_embeddings())  # restored after the update
        steps[rows] = params_of(model) - params_of(student)
    assert seen[0] is False and seen[-1] is True  # the second run's forward did take the rows' backward
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-5, atol=1e-6)
    assert steps[True].abs().max() > 0


def test_embedding_rows_are_added_into_the_heads_dense_gradient():
    emb = torch.nn.Embedding(10, 3, padding_idx=1)
    rows = EmbeddingRowsGrad(emb)
    ids = torch.tensor([[2, 1, 2], [5, 0, 1]])
    out = rows.look_up(ids)
    assert emb.weight.grad is None and out.requires_grad
    g = torch.arange(18.0).reshape(2, 3, 3)
    out.backward(g)
    assert emb.weight.grad is None and len(rows.pending) == 1  # nothing reached the weight through autograd
    rows.add_to_grad()
    want = torch.zeros(10, 3)
    want[2] = g[0, 0] + g[0, 2]  # a repeated id sums its rows
    want[5], want[0] = g[1, 0], g[1, 1]  # id 1 is padding_idx: no gradient
    torch.testing.assert_close(emb.weight.grad, want)
    rows.add_to_grad()  # nothing pending: unchanged
    torch.testing.assert_close(emb.weight.grad, want)


def test_a_small_embedding_keeps_its_dense_backward(student):
    from opd.update import step

    emb = student.get_input_embeddings()
    assert emb.weight.numel() < step.EMBEDDING_ROWS_MIN_WEIGHTS
    with step.embedding_rows_grad(student) as rows:
        assert rows.emb is None and "forward" not in vars(emb)


def test_sequence_norm_averages_over_the_rows_with_tokens_in_the_loss(student, batch):
    # A row the teacher dropped (scored_mask 0) adds nothing to the loss; counting it shrank the step by
    # scored rows / rows, and a mini-batch of dropped rows only stepped AdamW on a zero gradient.
    roll, scores = batch
    B = roll.completion_ids.shape[0]
    dropped, kept = list(range(1, B, 2)), list(range(0, B, 2))
    with_drops = copy.deepcopy(scores)
    with_drops.scored_mask[dropped] = 0
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    for model, (r, s) in ((a, (roll, with_drops)), (b, (roll.select(kept), scores.select(kept)))):
        fb = compute_feedback(r, s, FeedbackConfig())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train = TrainConfig(grad_clip=0.0)
        update_student(model, opt, make_scheduler(opt, train, 10), r, s, fb, version=0, chunk_size=7, train=train,
                       objective=ObjectiveConfig(name="reverse_kl", loss_norm="sequence"))
    step_a, step_b = params_of(a) - params_of(student), params_of(b) - params_of(student)
    assert step_b.abs().max() > 0
    torch.testing.assert_close(step_a, step_b, rtol=1e-4, atol=1e-7)
    # all rows dropped: nothing to train on, so no step (as with token norm)
    none = copy.deepcopy(scores)
    none.scored_mask[:] = 0
    c = copy.deepcopy(student)
    fb = compute_feedback(roll, none, FeedbackConfig())
    opt = make_optimizer(c, TrainConfig())
    _, version = update_student(c, opt, make_scheduler(opt, TrainConfig(), 10), roll, none, fb, version=3, chunk_size=7,
                                train=TrainConfig(), objective=ObjectiveConfig(name="reverse_kl", loss_norm="sequence"))
    assert version == 3 and torch.equal(params_of(c), params_of(student))


@pytest.mark.parametrize("loss_norm", ["token", "sequence"])
@pytest.mark.parametrize("handling", ["keep", "truncate", "downweight"])
def test_update_metrics_are_over_the_tokens_in_the_loss(student, batch, loss_norm, handling):
    # update/loss is the objective as minimised; distribution_loss and clip_frac are means over the tokens that
    # train, not over the truncated ones (whose teacher distribution is zeroed: a reverse KL of -H there).
    roll, scores = copy.deepcopy(batch[0]), copy.deepcopy(batch[1])
    scores.token_logprobs[:, :2] = -0.1
    scores.token_logprobs[:, 2:] = -20.0
    fcfg = FeedbackConfig(break_window=1, broken_prefix=handling, keep_after_break=1)
    fb = compute_feedback(roll, scores, fcfg)
    model = copy.deepcopy(student)
    obj = ObjectiveConfig(name="reverse_kl", loss_norm=loss_norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the metrics of the weights as they are
    m, _ = update_student(model, opt, make_scheduler(opt, TrainConfig(), 10), roll, scores, fb, objective=obj,
                          train=TrainConfig(), version=0, chunk_size=7)
    with torch.no_grad():  # the reference: the full-distribution reverse KL of every completion token, by hand
        ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
        attn = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
        logits = student(input_ids=ids, attention_mask=attn).logits[:, roll.prompt_ids.shape[1] - 1 : -1].float()
        logp = torch.log_softmax(logits / roll.temperature, -1)
        kl = (logp.exp() * (logp - scores.full_logprobs)).sum(-1)
    w = fb.loss_mask
    if loss_norm == "token":
        expected = float((kl * w).sum() / w.sum())
    else:
        rows = w.sum(1) > 0
        expected = float(((kl * w).sum(1)[rows] / w.sum(1)[rows]).mean())  # weighted means (downweight: w < 1)
    assert m["update/loss"] == pytest.approx(expected, rel=1e-3)
    in_loss = w > 0
    assert m["update/distribution_loss"] == pytest.approx(float(kl[in_loss].mean()), rel=1e-3)
    assert m["update/distribution_loss"] >= 0


def test_clip_fraction_is_over_the_tokens_in_the_loss(student, batch, monkeypatch):
    # Truncated tokens have A_t = 0 and cannot be clipped; counting them diluted the Stability signal by their share.
    import opd.update.step as step

    real_pg_loss = step.pg_loss

    def every_ratio_clipped(new_lp, old_lp, adv, clip_eps):  # as if every token with a signal had been clipped
        loss, ratio, clipped = real_pg_loss(new_lp, old_lp, adv, clip_eps)
        return loss, ratio, adv != 0  # a truncated token has A_t = 0 and cannot be clipped

    monkeypatch.setattr(step, "pg_loss", every_ratio_clipped)
    roll, scores = copy.deepcopy(batch[0]), copy.deepcopy(batch[1])
    scores.token_logprobs[:, 2:] = -20.0
    truncate = FeedbackConfig(break_window=1, broken_prefix="truncate", keep_after_break=1)
    assert (compute_feedback(roll, scores, truncate).loss_mask == 0)[roll.completion_mask.bool()].any()
    m, _ = run_update(copy.deepcopy(student), roll, scores, "pg", feedback=truncate)
    assert m["stability/clip_frac"] == 1.0
