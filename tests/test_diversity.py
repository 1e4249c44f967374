"""diversity_loss (SPEC section 3): every backend against reference.py, given the backend's own keep mask."""
import math

import pytest
import torch

import omniret_kernels
from omniret_kernels import _ext, reference
from omniret_kernels._counter_rng import keep_mask, keep_threshold, philox4x32
from omniret_kernels.diversity_loss import diversity_loss

from conftest import device_backends, poison_like, tolerance

FAST_BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _ext.cpu_extension_built(), reason="_C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not _ext.triton_importable(), reason="no triton")),
]
ALL_BACKENDS = [pytest.param("reference")] + FAST_BACKENDS
PAIRS = device_backends("diversity_loss")  # (device, backend): the CPU ones here, the CUDA ones on a GPU


def _reference_with_mask(m, keep, p, gamma=0.5, normalize=True):
    """Loss and gradient of reference.py given an explicit keep mask, in m's dtype (float64 in tests)."""
    m = m.detach().clone().requires_grad_(True)
    loss = reference.diversity_loss(m, keep if p > 0 else None, p=p, gamma=gamma, normalize=normalize)
    loss.backward()
    return loss.detach(), m.grad


def _run(m, backend, device="cpu", **kw):
    """(loss, grad, keep) on CPU, computed on `device`."""
    m = m.detach().to(device).clone().requires_grad_(True)
    loss, keep = diversity_loss(m, return_keep_mask=True, backend=backend, **kw)
    loss.backward()
    return loss.detach().cpu(), m.grad.cpu(), keep.cpu()


# ------------------------------------------------------------------------------------------------------------
# The counter-based generator
# ------------------------------------------------------------------------------------------------------------
def test_philox_known_answers():
    """Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        out = philox4x32(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
        assert tuple(int(o) for o in out) == expected


def test_keep_threshold_is_exact():
    assert keep_threshold(0.0) == 0
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(0.9) == math.floor(0.9 * 2**32)
    with pytest.raises(ValueError, match="p must be"):
        keep_threshold(1.0)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("p", [0.0, 0.9])
def test_same_seed_same_mask_on_every_backend(device, backend, p):
    """The kernels' own mask generators (C++ header / Triton) agree bit for bit with the Python one."""
    op = {"triton": torch.ops.omniret.diversity_keep_mask_triton}.get(backend, torch.ops.omniret.diversity_keep_mask)
    seeds = (0, 2**32 + 7, 2**63 - 2, 0x123456789ABCDEF)
    shapes = ((3, 37), (2, 1), (1, 70))
    if device == "cpu" and backend == "triton":  # every interpreted launch costs ~0.5 s here
        seeds, shapes = seeds[2:], ((3, 37), (1, 70))
    for seed in seeds:
        s = torch.tensor(seed, dtype=torch.int64)
        for batch, n in shapes:
            assert torch.equal(op(s.to(device), batch, n, p).cpu(), keep_mask(s, batch, n, p)), (seed, batch, n)


def test_different_seeds_different_masks():
    a = keep_mask(torch.tensor(1), 2, 32, 0.5)
    b = keep_mask(torch.tensor(2), 2, 32, 0.5)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # samples draw independent masks


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_public_masks_agree_across_backends(backend):
    m = torch.randn(3, 21, 8, dtype=torch.float64)
    _, keep_ref = diversity_loss(m, p=0.5, generator=torch.Generator().manual_seed(5), return_keep_mask=True,
                                 backend="reference")
    loss, keep = diversity_loss(m, p=0.5, generator=torch.Generator().manual_seed(5), return_keep_mask=True,
                                backend=backend)
    assert torch.equal(keep, keep_ref)


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    """B * N^2 = 65536 independent Bernoulli(1 - p) draws: the kept fraction is within 5 sigma of 1 - p, and
    every row and column position is covered (no stuck lanes of the 4-word Philox block)."""
    B, N = 16, 64
    keep = keep_mask(torch.tensor(987654321), B, N, p)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    for lane in range(4):  # the four words of a Philox block each follow Bernoulli(1 - p)
        lane_keep = keep[..., lane::4]
        lane_sigma = math.sqrt(p * (1 - p) / lane_keep.numel())
        assert abs(lane_keep.float().mean().item() - (1 - p)) < 5 * lane_sigma
    assert keep.any(dim=(0, 1)).all() and keep.any(dim=(0, 2)).all()


def test_p_zero_keeps_everything_and_draws_nothing():
    assert keep_mask(torch.tensor(3), 2, 9, 0.0).all()
    m = torch.randn(2, 5, 3)
    state = torch.get_rng_state()
    for backend in ("reference", "cpu"):
        diversity_loss(m, p=0.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_given_own_mask(device, backend, p, normalize):
    m = torch.randn(3, 37, 19, dtype=torch.float64)
    if not normalize:
        m = m * 0.3  # raw dot products then straddle gamma, exercising both smooth-L1 branches
    loss, grad, keep = _run(m, backend, device, p=p, gamma=0.5, normalize=normalize)
    ref_loss, ref_grad = _reference_with_mask(m, keep, p, 0.5, normalize)
    assert keep.shape == (3, 37, 37) and keep.dtype == torch.bool
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_and_gamma(backend):
    base = torch.randn(2, 11, 40, dtype=torch.float64)
    m = base.transpose(1, 2)  # (2, 40, 11), non-contiguous
    loss, grad, keep = _run(m, backend, p=0.5, gamma=0.05)
    ref_loss, ref_grad = _reference_with_mask(m, keep, 0.5, 0.05)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_float32(device, backend):
    m = torch.randn(4, 24, 33)
    loss, grad, keep = _run(m, backend, device, p=0.5)
    ref_loss, ref_grad = _reference_with_mask(m.double(), keep, 0.5)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    tf32 = tolerance(torch.float32, device)["rtol"] > 1e-3  # CUDA with tf32 matmuls allowed
    torch.testing.assert_close(loss.double(), ref_loss, **(tolerance(torch.float32, device) if tf32 else
                                                           dict(rtol=1e-5, atol=1e-6)))
    torch.testing.assert_close(grad.double(), ref_grad, **(tolerance(torch.float32, device) if tf32 else
                                                           dict(rtol=1e-4, atol=1e-7)))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bfloat16_inputs(device, backend):
    m = torch.randn(3, 20, 48).bfloat16()
    loss, grad, keep = _run(m, backend, device, p=0.5)
    ref_loss, ref_grad = _reference_with_mask(m.double(), keep, 0.5)  # same bf16 values, exact math
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=2e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_single_token_gives_zero(backend):
    m = torch.randn(3, 1, 17, dtype=torch.float64)
    loss, grad, _ = _run(m, backend, p=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-14)
    assert grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_feature_size_one(backend, normalize):
    m = torch.randn(2, 9, 1, dtype=torch.float64)
    loss, grad, keep = _run(m, backend, p=0.5, normalize=normalize)
    ref_loss, ref_grad = _reference_with_mask(m, keep, 0.5, normalize=normalize)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_gradcheck_float64(device, backend):
    m = torch.randn(2, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    fast = backend == "triton"  # the interpreter is slow: check a random projection of the Jacobian
    assert torch.autograd.gradcheck(lambda x: diversity_loss(x, p=0.0, backend=backend), (m,), fast_mode=fast)
    # p > 0 with a freshly seeded generator per call, so that every evaluation draws the same mask
    assert torch.autograd.gradcheck(
        lambda x: diversity_loss(x, p=0.5, generator=torch.Generator(device).manual_seed(11), backend=backend), (m,),
        fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda x: diversity_loss(x, p=0.0, normalize=False, gamma=2.0, backend=backend), (m,), fast_mode=fast)


def test_triton_backward_writes_every_element():
    """The Triton backward fills a NaN-poisoned buffer completely (odd N and D, several row blocks)."""
    pytest.importorskip("triton")
    from omniret_kernels.triton.diversity_loss import diversity_loss_backward

    m = torch.randn(2, 45, 21, dtype=torch.float64)
    seed = torch.tensor(77)
    out = poison_like(m)
    diversity_loss_backward(torch.tensor(1.0, dtype=torch.float64), m, seed, keep_threshold(0.5), 0.5, 0.5,
                            True, out=out)
    _, ref_grad = _reference_with_mask(m, keep_mask(seed, 2, 45, 0.5), 0.5)
    torch.testing.assert_close(out, ref_grad, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# RNG state: replay, and backward regenerating the forward's mask
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rng_state_replay_gives_same_mask_and_loss(backend):
    m = torch.randn(2, 16, 12, dtype=torch.float64)
    state = torch.get_rng_state()
    loss1, keep1 = diversity_loss(m, p=0.5, return_keep_mask=True, backend=backend)
    loss2, keep2 = diversity_loss(m, p=0.5, return_keep_mask=True, backend=backend)
    torch.set_rng_state(state)
    loss3, keep3 = diversity_loss(m, p=0.5, return_keep_mask=True, backend=backend)
    assert torch.equal(keep1, keep3) and torch.equal(loss1, loss3)
    assert not torch.equal(keep1, keep2)  # the default generator advanced: a fresh mask

    gen = torch.Generator().manual_seed(123)
    gstate = gen.get_state()
    loss4, keep4 = diversity_loss(m, p=0.5, generator=gen, return_keep_mask=True, backend=backend)
    torch.rand(10)  # the default generator is not involved when a generator is given
    gen.set_state(gstate)
    loss5, keep5 = diversity_loss(m, p=0.5, generator=gen, return_keep_mask=True, backend=backend)
    assert torch.equal(keep4, keep5) and torch.equal(loss4, loss5)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_backward_regenerates_forward_mask(device, backend):
    """Draws between forward and backward do not change the mask the backward uses (it comes from the seed)."""
    m = torch.randn(2, 23, 10, dtype=torch.float64, device=device, requires_grad=True)
    loss, keep = diversity_loss(m, p=0.7, return_keep_mask=True, backend=backend)
    torch.rand(1000, device=device)
    diversity_loss(m.detach(), p=0.7, backend=backend)
    loss.backward()
    _, ref_grad = _reference_with_mask(m.cpu(), keep.cpu(), 0.7)
    torch.testing.assert_close(m.grad.cpu(), ref_grad, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_arguments_raise(backend):
    m = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="m must have 3 dimensions"):
        diversity_loss(torch.randn(5, 4), backend=backend)
    with pytest.raises(ValueError, match="m must have dtype"):
        diversity_loss(torch.ones(2, 5, 4, dtype=torch.int64), backend=backend)
    for shape in ((0, 5, 4), (2, 0, 4), (2, 5, 0)):
        with pytest.raises(ValueError, match="m must be non-empty"):
            diversity_loss(torch.randn(shape), backend=backend)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p must be"):
            diversity_loss(m, p=p, backend=backend)
    with pytest.raises(ValueError, match="gamma must be"):
        diversity_loss(m, gamma=0.0, backend=backend)
    bad = m.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="m contains NaN"):
        diversity_loss(bad, check_finite=True, backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        diversity_loss(torch.randn(2, 3, 4), backend="nope")


@pytest.mark.skipif(not _ext.cpu_extension_built(), reason="_C not built")
def test_cpu_kernel_rejects_zero_and_nan_tokens():
    m = torch.randn(2, 5, 4)
    m[1, 3] = 0.0
    with pytest.raises(ValueError, match=r"m\[1, 3\] is a zero vector"):
        diversity_loss(m, backend="cpu")
    diversity_loss(m, normalize=False, backend="cpu")  # fine without normalization
    m[1, 3] = 1.0
    m[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        diversity_loss(m, backend="cpu")
    with pytest.raises(ValueError, match="NaN or Inf"):
        diversity_loss(m, normalize=False, p=0.0, backend="cpu")


# ------------------------------------------------------------------------------------------------------------
# Op registration: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.omniret
    fwd, bwd, mask = {
        "cpu": (ops.diversity_loss_fwd, ops.diversity_loss_bwd, ops.diversity_keep_mask),
        "triton": (ops.diversity_loss_triton_fwd, ops.diversity_loss_triton_bwd, ops.diversity_keep_mask_triton),
    }[backend]
    m = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(42)
    torch.library.opcheck(fwd, (m, seed, 0.5, 0.5, True))
    torch.library.opcheck(fwd, (m, seed, 0.0, 0.3, False))
    torch.library.opcheck(bwd, (torch.tensor(1.5, dtype=torch.float64), m.detach(), seed, 0.5, 0.5, True))
    torch.library.opcheck(mask, (seed, 2, 7, 0.5))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def compiled(x):
        return diversity_loss(x, p=0.5, return_keep_mask=True, backend=backend)

    m = torch.randn(2, 13, 9, dtype=torch.float64, requires_grad=True)
    state = torch.get_rng_state()
    loss, keep = compiled(m)
    loss.backward()
    ref_loss, ref_grad = _reference_with_mask(m, keep, 0.5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.grad, ref_grad, rtol=1e-9, atol=1e-12)
    torch.set_rng_state(state)  # replay works under compile too
    loss2, keep2 = compiled(m)
    assert torch.equal(keep, keep2) and torch.equal(loss.detach(), loss2.detach())


@pytest.mark.skipif(not _ext.cuda_extension_built(), reason="omniret_kernels._C_cuda not built")
def test_cuda_kernels_are_registered():
    """The CUDA kernels compile here but cannot run (no GPU): check that the build registered them."""
    for op in ("diversity_loss_fwd", "diversity_loss_bwd", "diversity_keep_mask"):
        assert _ext.has_kernel(op, "CUDA"), op


def test_exported_from_package():
    assert omniret_kernels.diversity_loss is diversity_loss
