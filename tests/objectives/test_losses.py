"""Each objective's gradient against a hand-derived value on a tiny case (gradients w.r.t. student logits z)."""

import math

import pytest
import torch

from opd.objectives import forward_kl, generalized_jsd, kl_to_reference, pg_loss, reverse_kl, topk_kl

Z = torch.tensor([0.3, -1.2, 2.0, 0.5, -0.1])
ZT = torch.tensor([1.0, 0.2, -0.5, 0.0, 1.5])


def grad_of(loss_fn):
    z = Z.clone().requires_grad_(True)
    loss_fn(torch.log_softmax(z, -1)).backward()
    return z.grad


def test_pg_gradient_is_minus_advantage_times_score_function():
    a, A = 2, 1.7
    g = grad_of(lambda lp: pg_loss(lp[a], lp[a].detach(), torch.tensor(A), 0.2)[0])
    p = torch.softmax(Z, -1)
    onehot = torch.nn.functional.one_hot(torch.tensor(a), 5).float()
    torch.testing.assert_close(g, -A * (onehot - p))


def test_pg_clipping_stops_the_gradient_outside_the_trust_region():
    a = 2
    for A, old_shift, expect_zero in [(1.0, -0.5, True), (-1.0, 0.5, True), (1.0, 0.5, False), (-1.0, -0.5, False)]:
        # old_shift < 0: ratio = exp(0.5) > 1.2 -> clipped for A > 0; old_shift > 0: ratio < 0.8 -> clipped for A < 0.
        holder = {}

        def f(lp):
            loss, ratio, clipped = pg_loss(lp[a], lp[a].detach() + old_shift, torch.tensor(A), 0.2)
            holder["clipped"] = bool(clipped)
            return loss

        g = grad_of(f)
        assert (g.abs().max() == 0) == expect_zero
        assert holder["clipped"] == expect_zero


def test_reverse_kl_value_and_gradient():
    q = torch.log_softmax(ZT, -1)
    p = torch.softmax(Z, -1)
    kl = float((p * (p.log() - q)).sum())
    assert math.isclose(float(reverse_kl(torch.log_softmax(Z, -1), q)), kl, rel_tol=1e-6)
    g = grad_of(lambda lp: reverse_kl(lp, q))
    torch.testing.assert_close(g, p * (p.log() - q - kl))


def test_forward_kl_gradient_and_gkd_limits():
    q = torch.log_softmax(ZT, -1)
    g = grad_of(lambda lp: forward_kl(lp, q))
    torch.testing.assert_close(g, torch.softmax(Z, -1) - q.exp())
    lp = torch.log_softmax(Z, -1)
    assert torch.equal(generalized_jsd(lp, q, 0.0), forward_kl(lp, q))
    assert torch.equal(generalized_jsd(lp, q, 1.0), reverse_kl(lp, q))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_value_and_gradient(beta):
    q = torch.log_softmax(ZT, -1)
    s, t = torch.softmax(Z, -1), q.exp()
    m = beta * t + (1 - beta) * s
    value = beta * (t * (t / m).log()).sum() + (1 - beta) * (s * (s / m).log()).sum()
    assert math.isclose(float(generalized_jsd(torch.log_softmax(Z, -1), q, beta)), float(value), rel_tol=1e-5)
    # dJSD/ds_i = (1 - beta) log(s_i / m_i); chain through the softmax.
    gs = (1 - beta) * (s / m).log()
    want = s * (gs - (s * gs).sum())
    torch.testing.assert_close(grad_of(lambda lp: generalized_jsd(lp, q, beta)), want, rtol=1e-5, atol=1e-6)
    if beta == 0.5:  # the symmetric Jensen-Shannon divergence
        js = 0.5 * (t * (t / m).log()).sum() + 0.5 * (s * (s / m).log()).sum()
        assert math.isclose(float(value), float(js), rel_tol=1e-6)


def test_topk_kl_value_and_gradient():
    q = torch.log_softmax(ZT, -1)
    ids = torch.tensor([4, 0])  # teacher's top-2
    s, t = torch.softmax(Z, -1), q.exp()
    bins_t = torch.stack([t[4], t[0], 1 - t[4] - t[0]])
    bins_s = torch.stack([s[4], s[0], 1 - s[4] - s[0]])
    value = (bins_t * (bins_t / bins_s).log()).sum()
    got = topk_kl(torch.log_softmax(Z, -1), ids, q[ids], "forward")
    assert math.isclose(float(got), float(value), rel_tol=1e-5)
    # dL/dz_j = s_j (1 - t_b(j) / s_b(j)), b(j) the bin of token j.
    bin_of = torch.tensor([1, 2, 2, 2, 0])
    want = s * (1 - bins_t[bin_of] / bins_s[bin_of])
    torch.testing.assert_close(grad_of(lambda lp: topk_kl(lp, ids, q[ids], "forward")), want, rtol=1e-4, atol=1e-6)
    rev = topk_kl(torch.log_softmax(Z, -1), ids, q[ids], "reverse")
    assert math.isclose(float(rev), float((bins_s * (bins_s / bins_t).log()).sum()), rel_tol=1e-5)


def test_topk_kl_with_full_topk_equals_forward_kl():
    q = torch.log_softmax(ZT, -1)
    ids = torch.argsort(q, descending=True)
    lp = torch.log_softmax(Z, -1)
    torch.testing.assert_close(topk_kl(lp, ids, q[ids]), forward_kl(lp, q), rtol=1e-3, atol=1e-5)


def test_kl_to_reference_k3():
    new = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0])
    k3 = kl_to_reference(new, ref)
    assert k3[1] == 0 and k3[0] > 0
    k3.sum().backward()
    torch.testing.assert_close(new.grad, 1 - torch.exp(ref - new.detach()))
