"""diversity_loss CPU kernel paths that tests/test_diversity.py does not reach on its own: the AVX2 Philox row
generator at every tail length, the fused forward + gradient op autograd uses (and its hand-over of the gradient:
scaling, retained graphs, accumulation), the gradient writer's streamed (aligned) and unaligned column paths."""
import pytest
import torch

from omniret_kernels import _ext, reference
from omniret_kernels._counter_rng import keep_mask
from omniret_kernels.diversity_loss import diversity_loss

pytestmark = pytest.mark.skipif(not _ext.cpu_extension_built(), reason="omniret_kernels._C is not built")


def _reference(m, keep, p, gamma=0.5, normalize=True):
    m = m.detach().double().clone().requires_grad_(True)
    loss = reference.diversity_loss(m, keep if p > 0 else None, p=p, gamma=gamma, normalize=normalize)
    loss.backward()
    return loss.detach(), m.grad


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_vectorised_keep_bits_match_python_at_every_tail(p):
    """The CPU generator draws 32 columns (8 Philox blocks) per step: rows of 1..129 columns cover every tail."""
    for seed in (3, 2**40 + 1, 2**63 - 5):
        s = torch.tensor(seed, dtype=torch.int64)
        for n in (1, 3, 4, 5, 31, 32, 33, 63, 64, 65, 127, 129):
            assert torch.equal(torch.ops.omniret.diversity_keep_mask(s, 2, n, p), keep_mask(s, 2, n, p)), (seed, n)


@pytest.mark.parametrize("n", [1, 3, 64, 127, 129])
@pytest.mark.parametrize("d", [1, 7, 64, 100])
def test_fused_gradient_matches_reference_odd_sizes(n, d):
    """Float64 through the fused forward + gradient op: N around the 64-bit mask words, D around the vector and
    chunk widths (d = 64 takes the streamed-store path, 7 and 100 the unaligned one)."""
    m = torch.randn(2, n, d, dtype=torch.float64)
    x = m.clone().requires_grad_(True)
    loss, keep = diversity_loss(x, p=0.5, return_keep_mask=True, backend="cpu")
    loss.backward()
    ref_loss, ref_grad = _reference(m, keep, 0.5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("d", [96, 100, 1536])
def test_float32_streamed_and_unaligned_rows(d):
    """float32 rows of 96 floats (384 B: streamed stores) and 100 floats (400 B: plain stores), several samples
    per thread so the next-sample prefetch runs."""
    m = torch.randn(6, 40, d)
    x = m.clone().requires_grad_(True)
    loss, keep = diversity_loss(x, p=0.9, return_keep_mask=True, backend="cpu")
    loss.backward()
    ref_loss, ref_grad = _reference(m, keep, 0.9)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-8)


def test_fused_op_agrees_with_the_op_pair():
    m = torch.randn(3, 29, 33, dtype=torch.float64)
    seed = torch.tensor(2024)
    loss, grad = torch.ops.omniret.diversity_loss_fwd_grad(m, seed, 0.7, 0.3, True)
    assert torch.equal(loss, torch.ops.omniret.diversity_loss_fwd(m, seed, 0.7, 0.3, True))
    grad2 = torch.ops.omniret.diversity_loss_bwd(torch.tensor(2.0, dtype=torch.float64), m, seed, 0.7, 0.3, True)
    torch.testing.assert_close(grad2, 2 * grad, rtol=1e-14, atol=0)


def test_gradient_scaled_retained_and_accumulated():
    m = torch.randn(2, 17, 12, dtype=torch.float64)
    x = m.clone().requires_grad_(True)
    loss, keep = diversity_loss(x, p=0.5, return_keep_mask=True, backend="cpu")
    _, ref_grad = _reference(m, keep, 0.5)
    (2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2.5 * ref_grad, rtol=1e-9, atol=1e-13)
    (-1.0 * loss).backward()  # second backward through the retained graph: the op pair recomputes it
    torch.testing.assert_close(x.grad, 1.5 * ref_grad, rtol=1e-9, atol=1e-13)
    with pytest.raises(RuntimeError):  # the graph is freed now, as for any op
        loss.backward()


def test_no_grad_and_detached_inputs_use_the_loss_only_op():
    m = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    with_grad = diversity_loss(m, p=0.5, generator=gen(), backend="cpu")
    with torch.no_grad():
        without = diversity_loss(m, p=0.5, generator=gen(), backend="cpu")
    assert not without.requires_grad and with_grad.requires_grad
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(diversity_loss(m.detach(), p=0.5, generator=gen(), backend="cpu"), without)


def test_double_backward_is_refused():
    m = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    loss = diversity_loss(m, p=0.0, backend="cpu")
    (g,) = torch.autograd.grad(loss, m, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_fused_op_fake_kernel():
    m = torch.randn(2, 5, 4)
    torch.library.opcheck(torch.ops.omniret.diversity_loss_fwd_grad.default, (m, torch.tensor(3), 0.5, 0.5, True),
                          test_utils=("test_schema", "test_faketensor"))
