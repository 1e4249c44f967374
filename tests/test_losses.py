"""omniret.losses against the executable spec (omniret_kernels.reference) in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from omniret import losses
from omniret_kernels import reference


def _inputs(Q, C, D, dtype=torch.float64, scale=3.0):
    q = (torch.randn(Q, D, dtype=dtype) * scale).requires_grad_()
    c = (torch.randn(C, D, dtype=dtype) * scale).requires_grad_()
    return q, c


def _random_positives(Q, C, p=0.2):
    m = torch.rand(Q, C) < p
    return m


def _grads(fn, *tensors):
    out = fn()
    g = torch.autograd.grad(out, tensors)
    return out.detach(), g


@pytest.mark.parametrize("Q,C", [(1, 1), (2, 2), (7, 7), (9, 13)])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("with_positives", [False, True])
def test_hn_infonce_matches_reference(Q, C, chunk, beta, detach, with_positives):
    q, c = _inputs(Q, C, 5)
    pos = _random_positives(Q, C) if with_positives else None
    ref, ref_g = _grads(lambda: reference.hn_infonce_loss(q, c, 0.07, beta, detach, pos), q, c)
    out, out_g = _grads(lambda: losses.hn_infonce_loss(q, c, 0.07, beta, detach, pos, chunk_size=chunk), q, c)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("Q,C", [(1, 1), (7, 7), (9, 13)])
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("with_positives", [False, True])
def test_triplet_matches_reference(Q, C, chunk, with_positives):
    # tau = 1 keeps many hinges near the margin so both active and inactive pairs occur
    q, c = _inputs(Q, C, 5)
    pos = _random_positives(Q, C) if with_positives else None
    ref, ref_g = _grads(lambda: reference.triplet_loss(q, c, 1.0, 0.3, pos), q, c)
    out, out_g = _grads(lambda: losses.triplet_loss(q, c, 1.0, 0.3, pos, chunk_size=chunk), q, c)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_extreme_logits_stay_finite():
    # cos ~ 1 with tau = 0.01: exp(phi) overflows float64's literal formula range only far beyond; check that the
    # log-space form matches the literal one where both are finite and stays finite with a tiny tau
    q, c = _inputs(6, 6, 4)
    ref = reference.hn_infonce_loss(q, c, 0.05, 0.5)
    out = losses.hn_infonce_loss(q, c, 0.05, 0.5, chunk_size=2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    qf, cf = q.detach().float().requires_grad_(), c.detach().float().requires_grad_()
    tiny = losses.hn_infonce_loss(qf, cf, 1e-3, 0.5, chunk_size=4)
    tiny.backward()
    assert torch.isfinite(tiny) and torch.isfinite(qf.grad).all() and torch.isfinite(cf.grad).all()


def test_total_loss_combines_terms():
    q, c = _inputs(8, 10, 6)
    div = torch.rand((), dtype=torch.float64, requires_grad=True)
    pos = _random_positives(8, 10)
    terms = losses.total_loss(q, c, div, tau=0.07, beta=0.5, margin=0.1, mu1=0.7, mu2=0.3, positives=pos,
                              chunk_size=3)
    want = (reference.hn_infonce_loss(q, c, 0.07, 0.5, True, pos)
            + 0.7 * reference.triplet_loss(q, c, 0.07, 0.1, pos) + 0.3 * div)
    torch.testing.assert_close(terms.total, want, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad(terms.total, (q, c, div))
    gw = torch.autograd.grad(want, (q, c, div))
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    no_div = losses.total_loss(q, c, None, mu1=0.0)
    torch.testing.assert_close(no_div.total, reference.hn_infonce_loss(q, c), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("detach,beta", [(False, 0.5), (True, 0.0)])
def test_gradcheck_with_learnable_temperature(detach, beta):
    """True gradients: detached weights are only a true gradient when beta = 0 (constant weights)."""
    q, c = _inputs(4, 6, 3, scale=1.0)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    pos = torch.zeros(4, 6, dtype=torch.bool)
    pos[0, 3] = True

    def fn(q, c, tau):
        cont, trip = losses.pair_losses(q, c, tau, beta, 0.2, detach, pos, chunk_size=2)
        return cont, trip

    assert torch.autograd.gradcheck(fn, (q, c, tau), eps=1e-6, atol=1e-6)


def test_learnable_temperature_gradient_matches_reference():
    module = losses.LearnableTemperature(0.1).double()
    q, c = _inputs(5, 7, 4, scale=1.0)
    out = losses.hn_infonce_loss(q, c, module(), chunk_size=2) + losses.triplet_loss(q, c, module(), 0.1)
    g = torch.autograd.grad(out, module.log_scale)[0]
    tau = 1.0 / module.log_scale.exp()
    ref = reference.hn_infonce_loss(q, c, tau) + reference.triplet_loss(q, c, tau, 0.1)
    gr = torch.autograd.grad(ref, module.log_scale)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-10)
    assert math.isclose(float(module().detach()), 0.1, rel_tol=1e-6)


def test_bfloat16_inputs_are_computed_in_float32():
    q, c = _inputs(6, 6, 8, dtype=torch.float32)
    qb, cb = q.detach().bfloat16(), c.detach().bfloat16()
    out = losses.hn_infonce_loss(qb, cb)
    assert out.dtype == torch.float32
    ref = reference.hn_infonce_loss(qb.double(), cb.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_autograd_saves_no_quadratic_tensor():
    """The chunked kernel keeps O(Q + C) tensors for backward, not the Q x C similarity matrix."""
    Q, D = 384, 8
    q, c = _inputs(Q, Q, D, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = losses.total_loss(q, c, chunk_size=64).total
    out.backward()
    assert max(saved) < Q * Q // 8, f"largest saved tensor has {max(saved)} elements"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        reference.triplet_loss(q, c)
    assert max(saved) >= Q * Q  # the check above can fail: the literal formula does save Q x C


def test_bad_inputs_raise_value_errors():
    q, c = _inputs(3, 3, 4)
    with pytest.raises(ValueError, match="q"):
        losses.hn_infonce_loss(q[:, :2], c)
    with pytest.raises(ValueError, match="c must hold"):
        losses.hn_infonce_loss(q, c[:2])
    with pytest.raises(ValueError, match="q contains NaN"):
        losses.hn_infonce_loss(q.detach().clone().fill_(float("nan")), c)
    with pytest.raises(ValueError, match="positives"):
        losses.triplet_loss(q, c, positives=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau"):
        losses.hn_infonce_loss(q, c, tau=0.0)
    with pytest.raises(ValueError, match="empty"):
        losses.hn_infonce_loss(q[:0], c)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.pair_losses(q, c, chunk_size=0)


def _symmetric_infonce_literal(q, c, tau, positives=None):
    """CLIP's symmetric InfoNCE written out: row-wise softmax over candidates for each query, column-wise over
    the queries for each of the first Q candidates; masked pairs (positives, other than the diagonal) drop
    out of the denominators."""
    Q = q.shape[0]
    logits = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).t() / tau
    keep = torch.ones_like(logits, dtype=torch.bool) if positives is None else ~positives
    keep[torch.arange(Q), torch.arange(Q)] = True  # the positive pair itself is always in its denominator
    masked = logits.masked_fill(~keep, -math.inf)
    diag = logits.diagonal()
    q2c = torch.logsumexp(masked, dim=1) - diag
    c2q = torch.logsumexp(masked[:, :Q], dim=0) - diag
    return 0.5 * (q2c.mean() + c2q.mean())


@pytest.mark.parametrize("Q,C", [(1, 1), (5, 5), (6, 9)])
@pytest.mark.parametrize("chunk", [2, 64])
@pytest.mark.parametrize("with_positives", [False, True])
def test_symmetric_infonce_matches_literal_float64(Q, C, chunk, with_positives):
    q, c = _inputs(Q, C, 5)
    pos = _random_positives(Q, C, p=0.3) if with_positives else None
    ref, ref_g = _grads(lambda: _symmetric_infonce_literal(q, c, 0.07, pos), q, c)
    out, out_g = _grads(lambda: losses.total_loss(q, c, tau=0.07, beta=0.0, mu1=0.0, mu2=0.0, positives=pos,
                                                  chunk_size=chunk, symmetric=True).total, q, c)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_symmetric_infonce_is_clip_cross_entropy_and_keeps_the_other_terms():
    q, c = _inputs(7, 7, 4)
    logits = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).t() / 0.1
    target = torch.arange(7)
    clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    got = losses.total_loss(q, c, tau=0.1, beta=0.0, mu1=0.0, symmetric=True)
    torch.testing.assert_close(got.total, clip, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got.total, losses.total_loss(q, c, tau=0.1, beta=0.0, mu1=0.0).total)
    # hard-negative weights (beta) apply to the candidate->query side too; the triplet term stays one-sided
    q, c = _inputs(6, 9, 4)
    pos = _random_positives(6, 9, p=0.3)
    div = torch.tensor(0.4, dtype=torch.float64)
    terms = losses.total_loss(q, c, div, tau=0.07, beta=0.5, margin=0.1, mu1=0.7, mu2=0.3, positives=pos,
                              chunk_size=4, symmetric=True)
    reverse = reference.hn_infonce_loss(c[:6], q, 0.07, 0.5, True, pos[:, :6].t().contiguous())
    cont = 0.5 * (reference.hn_infonce_loss(q, c, 0.07, 0.5, True, pos) + reverse)
    want = cont + 0.7 * reference.triplet_loss(q, c, 0.07, 0.1, pos) + 0.3 * div
    torch.testing.assert_close(terms.contrastive, cont, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.total, want, rtol=1e-10, atol=1e-10)
    g, gw = torch.autograd.grad(terms.total, (q, c)), torch.autograd.grad(want, (q, c))
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
