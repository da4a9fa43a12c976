import copy
import math

import pytest
import torch
import torch.nn.functional as F

from opd.config import ObjectiveConfig
from opd.objectives import fused
from opd.objectives.losses import reverse_kl
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.update.step import student_token_terms, update_autocast


def unfused(logits, teacher, targets, T):
    """The same terms as the update computed them before: log_softmax, gather, entropy, reverse_kl."""
    logp = F.log_softmax(logits.float() / T, dim=-1)
    tok = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp.detach().exp() * logp.detach()).sum(-1)
    kl = reverse_kl(logp, teacher) if teacher is not None else torch.zeros_like(tok)
    return tok, ent, kl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("native", [True, False])  # csrc/vocab_terms.c, or the torch ops of fused.TokenTerms
def test_fused_terms_and_their_gradients_equal_the_unfused_ops(dtype, T, with_teacher, native, monkeypatch):
    from opd import cpu_kernels

    if native and cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    fit = cpu_kernels.vocab_terms_fit
    used = []
    monkeypatch.setattr(cpu_kernels, "vocab_terms_fit", lambda *a: used.append(native and fit(*a)) or used[-1])
    g = torch.Generator().manual_seed(0)
    n, V = 2 * fused.BLOCK_ROWS + 3, 301  # a last block of 3 rows
    base = (torch.randn(n, V, generator=g) * 3).to(dtype)
    teacher = F.log_softmax(torch.randn(n, V, generator=g) * 2, -1) if with_teacher else None
    targets = torch.randint(0, V, (n,), generator=g)
    g_tok, g_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)
    results = []
    for fn in (unfused, fused.token_terms):
        logits = base.clone().requires_grad_()
        tok, ent, kl = fn(logits, teacher, targets, T)
        ((tok * g_tok).sum() + (kl * g_kl).sum()).backward()
        results.append((tok, ent, kl, logits.grad))
    assert not results[1][1].requires_grad  # the entropy is reported, never trained on
    for want, got in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        # bf16 gradients: one rounding of each element either way
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.detach().abs().max()))
    if not with_teacher:
        assert (results[1][2] == 0).all()
    assert used == [native]  # the path under test is the one that ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_terms_without_a_teacher_hold_for_peaked_and_flat_rows(dtype):
    # the two-pass path (entropy = log s - u / s from the shifted sums): a row dominated by one logit, a flat row, and
    # logits far from 0, against log_softmax in float64
    from opd import cpu_kernels

    if cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    V = 16 * 40 + 7
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    logits[0, 5] = 60.0  # peaked: p ~ 1 on one token
    logits[1] = 0.0  # flat: entropy log V
    logits[2] = logits[2] * 30 + 400.0  # large and spread
    logits = logits.to(dtype)
    targets = torch.tensor([5, 7, 11, 13])
    with torch.no_grad():
        tok, ent, kl = fused.token_terms(logits, None, targets, 1.0)
    logp = F.log_softmax(logits.double(), -1)
    torch.testing.assert_close(tok.double(), logp.gather(1, targets[:, None]).squeeze(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-4)
    assert float(ent[1]) == pytest.approx(math.log(V), rel=1e-5) and (kl == 0).all()


def test_the_native_vocabulary_terms_take_only_what_they_can_index():
    from opd import cpu_kernels

    if cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    logits, teacher, targets = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 3, 9, 2])
    assert cpu_kernels.vocab_terms_fit(logits, teacher, targets) and cpu_kernels.vocab_terms_fit(logits, None, targets)
    assert not cpu_kernels.vocab_terms_fit(logits, teacher, torch.tensor([0, 3, 10, 2]))  # past the vocabulary
    assert not cpu_kernels.vocab_terms_fit(logits, teacher, torch.tensor([0, -1, 1, 2]))
    assert not cpu_kernels.vocab_terms_fit(logits.t().contiguous().t(), teacher, targets)  # strided rows
    assert not cpu_kernels.vocab_terms_fit(logits, teacher.double(), targets)
    assert not cpu_kernels.vocab_terms_fit(logits.half(), None, targets)


@pytest.mark.parametrize("native", [True, False])
def test_teacher_rows_read_in_place_equal_the_gathered_rows(native, monkeypatch):
    """token_terms with the teacher's whole [R, V] block and each row's index in it: the values and gradients of
    passing the gathered rows themselves (what the update did before)."""
    from opd import cpu_kernels

    if native and cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    if not native:
        monkeypatch.setattr(cpu_kernels, "vocab_terms_fit", lambda *a: False)
    g = torch.Generator().manual_seed(3)
    n, R, V = 2 * fused.BLOCK_ROWS + 3, 40, 301
    block = F.log_softmax(torch.randn(R, V, generator=g) * 2, -1)
    rows = torch.randperm(R, generator=g)[:n]
    base = (torch.randn(n, V, generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (n,), generator=g)
    g_tok, g_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)
    results = []
    for teacher, teacher_rows in ((block[rows].contiguous(), None), (block, rows)):
        logits = base.clone().requires_grad_()
        tok, ent, kl = fused.token_terms(logits, teacher, targets, 0.7, teacher_rows)
        ((tok * g_tok).sum() + (kl * g_kl).sum()).backward()
        results.append((tok, ent, kl, logits.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same arithmetic on the same rows
    assert results[0][2].abs().max() > 0


def test_the_native_terms_follow_only_row_indices_inside_the_block():
    from opd import cpu_kernels

    if cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    logits, targets, block = torch.randn(3, 10), torch.tensor([0, 3, 9]), torch.randn(8, 10)
    assert cpu_kernels.vocab_terms_fit(logits, block, targets, torch.tensor([7, 0, 2]))
    assert not cpu_kernels.vocab_terms_fit(logits, block, targets, torch.tensor([8, 0, 2]))  # past the block
    assert not cpu_kernels.vocab_terms_fit(logits, block, targets, torch.tensor([-1, 0, 2]))
    assert not cpu_kernels.vocab_terms_fit(logits, block, targets, torch.tensor([1, 0]))  # one index a row
    assert not cpu_kernels.vocab_terms_fit(logits, block, targets, torch.tensor([1, 0, 2], dtype=torch.int32))
    assert not cpu_kernels.vocab_terms_fit(logits, block[:, :9].contiguous(), targets, torch.tensor([1, 0, 2]))
    assert not cpu_kernels.vocab_terms_fit(logits, block, targets)  # a block of another shape needs its rows


@pytest.mark.parametrize("native", [True, False])
def test_the_teachers_log_probs_go_to_the_rows_they_are_given(native, monkeypatch):
    from opd import cpu_kernels

    if native and cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    if not native:
        monkeypatch.setattr(cpu_kernels, "log_softmax_rows", lambda *a: None)
    g = torch.Generator().manual_seed(5)
    logits, targets = torch.randn(5, 301, generator=g) * 3, torch.randint(0, 301, (5,), generator=g)
    out, rows = torch.full((9, 301), 7.0), torch.tensor([8, 1, 4, 0, 6])
    tok, ent, got = fused.log_softmax_terms(logits, targets, 0.7, out, rows)
    assert got is out
    want_tok, want_ent, want_logp = fused.log_softmax_terms(logits, targets, 0.7)
    torch.testing.assert_close(out[rows], want_logp, rtol=1e-6, atol=1e-6)
    assert (out[[2, 3, 5, 7]] == 7.0).all()  # rows not named are left as they were
    torch.testing.assert_close(tok, want_tok, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=1e-6, atol=1e-6)
    if native:  # a block the rows do not fit is refused (the caller then takes the gathered path)
        assert cpu_kernels.log_softmax_rows(logits, targets, 0.7, out, torch.tensor([9, 1, 4, 0, 6])) is None
        assert cpu_kernels.log_softmax_rows(logits, targets, 0.7, out.double(), rows) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_wide_and_narrow_loops_give_the_same_terms(dtype):
    """csrc/vocab_terms.c's AVX-512F loops (16 lanes) and its AVX2 ones (8): the same values and gradients up to the
    order of the sums, for the update's terms and the teacher's log-probs; V with a tail past both widths."""
    from opd import cpu_kernels

    if cpu_kernels._vocab_library() is None or "avx512f" not in cpu_kernels.matmul.cpu_flags():
        pytest.skip("needs csrc/vocab_terms.c and an AVX-512F CPU")
    g = torch.Generator().manual_seed(7)
    n, V = 11, 16 * 20 + 5
    base = (torch.randn(n, V, generator=g) * 3).to(dtype)
    teacher = F.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    targets = torch.randint(0, V, (n,), generator=g)
    g_tok, g_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)
    before = cpu_kernels.vocab_terms_wide()
    results = []
    try:
        for wide in (False, True):
            assert cpu_kernels.vocab_terms_wide(wide) is wide
            outs = []
            for t in (teacher, None):
                logits = base.clone().requires_grad_()
                tok, ent, kl = fused.token_terms(logits, t, targets, 0.7)
                ((tok * g_tok).sum() + (kl * g_kl).sum()).backward()
                outs += [tok, ent, kl, logits.grad.float()]
            outs += list(fused.log_softmax_terms(base, targets, 0.7))
            results.append(outs)
    finally:
        cpu_kernels.vocab_terms_wide(before)
    for narrow, wide in zip(*results):
        torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.fixture
def batch(student, teacher_model, tokenizer, prompts):
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=10, temperature=0.9),
                  generator=torch.Generator().manual_seed(4))
    return roll, LocalTeacher(teacher_model).score(roll, full=True)


@pytest.mark.parametrize("objective", ["reverse_kl", "pg"])
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_the_update_terms_and_gradients_are_those_of_the_unfused_path(student, batch, objective, autocast):
    roll, scores = batch
    assert (roll.completion_mask == 0).any()  # padding in the batch: only real tokens reach the terms
    grads = []
    for use_fused in (False, True):
        model = copy.deepcopy(student)
        with update_autocast(model, autocast):
            terms = student_token_terms(model, roll, scores, ObjectiveConfig(name=objective), 5, fused=use_fused)
        loss = terms.distribution_loss.sum() if objective == "reverse_kl" else -terms.new_logprobs.sum()
        loss.backward()
        grads.append((terms, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (want, g_want), (got, g_got) = grads
    tol = 1e-5 if autocast == "none" else 2e-2
    torch.testing.assert_close(got.new_logprobs, want.new_logprobs, rtol=tol, atol=tol)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=tol, atol=tol)
    if objective == "reverse_kl":
        torch.testing.assert_close(got.distribution_loss, want.distribution_loss, rtol=tol, atol=tol)
    else:
        assert got.distribution_loss is None
    cos = F.cosine_similarity(g_got, g_want, dim=0)
    assert cos > (1 - 1e-6 if autocast == "none" else 0.999)
    torch.testing.assert_close(g_got.norm(), g_want.norm(), rtol=tol, atol=0)


def test_models_with_soft_capped_logits_keep_the_unfused_path(student):
    assert fused.supports(student)
    capped = copy.deepcopy(student)
    capped.config.final_logit_softcapping = 30.0
    assert not fused.supports(capped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_the_teachers_log_softmax_terms_are_the_torch_ops(dtype, T, monkeypatch):
    from opd import cpu_kernels

    if cpu_kernels._vocab_library() is None:
        pytest.skip("csrc/vocab_terms.c needs x86 AVX2 + a C compiler")
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(19, 301, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 301, (19,), generator=g)
    tok, ent, logp = fused.log_softmax_terms(logits, targets, T)  # the C pass
    want_logp = F.log_softmax(logits.float() / T, -1)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok, want_logp.gather(1, targets[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, -(want_logp.exp() * want_logp).sum(-1), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_kernels, "log_softmax_rows", lambda *a: None)  # the torch fallback gives the same
    for got, want in zip(fused.log_softmax_terms(logits, targets, T), (tok, ent, logp)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
