"""aswp_pool: every backend that runs here against omniret_kernels.reference (SPEC section 1)."""
import importlib

import pytest
import torch

from omniret_kernels import ASWPPool, _ext, aswp_pool, reference

from conftest import device_backends, tolerance

CPU_BUILT = _ext.cpu_extension_built()
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason="omniret_kernels._C is not built")
POOLINGS = ("stm", "max", "mean", "weighted")


def make_inputs(B, N, D, L, M, *, dtype=torch.float64, masked=False, requires_grad=True, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(B, N, D, dtype=dtype, generator=gen)
    directions = torch.randn(L, D, dtype=dtype, generator=gen)
    references = torch.randn(M, L, dtype=dtype, generator=gen)
    weights = torch.randn(M, L, dtype=dtype, generator=gen)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=gen) > 0.4
        mask[torch.arange(B), torch.randint(0, N, (B,), generator=gen)] = True  # every sample keeps a token
    tensors = [t.requires_grad_(requires_grad) for t in (x, directions, references, weights)]
    return (*tensors, mask)


def run_both(pooling, x, directions, references, weights, mask, backend="cpu", **kw):
    """(out, grads) of the backend and of the reference for the same upstream gradient."""
    leaves = (x, directions, references) + ((weights,) if pooling == "weighted" else ())
    out = aswp_pool(x, directions, references, mask, pooling=pooling, weights=weights, backend=backend, **kw)
    ref = reference.aswp_pool(x, directions, references, mask, pooling=pooling, weights=weights, **kw)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, leaves, g)
    return out, grads, ref, ref_grads


def assert_close_all(out, grads, ref, ref_grads, atol, rtol):
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)
    for name, a, b in zip(("x", "directions", "references", "weights"), grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# CPU kernel
# ---------------------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_cpu_float64_matches_reference(pooling, masked, normalize):
    x, d, r, w, mask = make_inputs(3, 13, 10, 37, 8, masked=masked)  # N != M, L not a multiple of 32
    res = run_both(pooling, x, d, r, w, mask, normalize_directions=normalize, temperature=0.6)
    assert_close_all(*res, atol=1e-10, rtol=1e-10)


@needs_cpu
@pytest.mark.parametrize("shape", [(2, 1, 4, 5, 3), (2, 127, 33, 65, 64), (1, 40, 33, 65, 128), (2, 8, 3, 70, 8)])
@pytest.mark.parametrize("pooling", ["stm", "weighted"])
def test_cpu_odd_sizes(shape, pooling):
    B, N, D, L, M = shape
    x, d, r, w, mask = make_inputs(B, N, D, L, M, masked=N > 1)
    assert_close_all(*run_both(pooling, x, d, r, w, mask), atol=1e-9, rtol=1e-9)


@needs_cpu
def test_cpu_multithreaded_with_grad():
    """Enough slice tiles (256 slices each) for at::parallel_for to use its worker threads, with inputs that
    require grad (the kernel's ATen calls on worker threads must not see autograd), and more than one backward
    chunk of 1024 slices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, d, r, w, mask = make_inputs(2, 9, 8, 1100, 9, masked=True)
        assert_close_all(*run_both("stm", x, d, r, w, mask), atol=1e-9, rtol=1e-9)
    finally:
        torch.set_num_threads(threads)


@needs_cpu
@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
def test_cpu_temperature(temperature):
    x, d, r, w, mask = make_inputs(2, 16, 6, 33, 16, masked=True)
    assert_close_all(*run_both("stm", x, d, r, w, mask, temperature=temperature), atol=1e-9, rtol=1e-9)


@needs_cpu
@pytest.mark.parametrize("pooling", POOLINGS)
def test_cpu_ties_in_projections(pooling):
    """Duplicated tokens tie in every projection; duplicated references tie in rank; a constant column ties psi.
    The forward, the reference/weight/direction gradients and the summed gradient of each tied token group are
    independent of how ties are broken, and must match exactly."""
    B, D, L, M = 2, 5, 40, 12  # 12 tokens: 4 distinct, each three times
    base = torch.randn(B, 4, D, dtype=torch.float64)
    x = base.repeat(1, 3, 1).requires_grad_()  # token n ties with n + 4 and n + 8
    d = torch.randn(L, D, dtype=torch.float64)
    d[0] = 0.0
    d[0, 0] = 1.0
    d = d.requires_grad_()
    r = torch.randn(M, L, dtype=torch.float64)
    r[1] = r[0]  # reference ties -> ranks broken by index
    r[:, 5] = 0.3  # a constant reference column
    r = r.requires_grad_()
    w = torch.randn(M, L, dtype=torch.float64, requires_grad=True)
    out, grads, ref, ref_grads = run_both(pooling, x, d, r, w, None)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    group = lambda g: g.view(B, 3, 4, D).sum(1)  # noqa: E731
    torch.testing.assert_close(group(grads[0]), group(ref_grads[0]), atol=1e-10, rtol=1e-10)


@needs_cpu
@pytest.mark.parametrize("pooling", ["max", "mean", "weighted"])
def test_cpu_gradcheck_float64(pooling):
    """STM's gradient is by design not the derivative of its forward (straight-through), so it is checked against
    the reference's autograd above; the other poolings are true gradients and must pass gradcheck."""
    x, d, r, w, mask = make_inputs(2, 6, 4, 7, 5, masked=True)
    fn = lambda x, d, r, w: aswp_pool(x, d, r, mask, pooling=pooling, weights=w, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, d, r, w))


@needs_cpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
def test_cpu_low_precision_inputs(dtype, atol):
    """float32/bf16/fp16 inputs accumulate in float32 and return x.dtype; compared with the float64 reference
    on the same (rounded) values."""
    x, d, r, w, mask = make_inputs(2, 24, 16, 40, 24, dtype=dtype, masked=True)
    out = aswp_pool(x, d, r, mask, backend="cpu")
    assert out.dtype == dtype
    ref = reference.aswp_pool(x.double(), d.double(), r.double(), mask)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, d, r), g.to(dtype))
    xd, dd, rd = (t.detach().double().requires_grad_() for t in (x, d, r))
    ref_grads = torch.autograd.grad(reference.aswp_pool(xd, dd, rd, mask), (xd, dd, rd), g)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol * 4, rtol=atol * 4)


@needs_cpu
def test_cpu_saved_tensors_fully_written():
    """sorted / sorted_tokens are fresh outputs: every valid position holds the sorted projection and the valid
    token sorted there (each column a permutation of the valid tokens); positions past n_b hold 0."""
    x, d, r, w, mask = make_inputs(3, 20, 6, 45, 7, dtype=torch.float32, masked=True, requires_grad=False)
    out, sorted_values, sorted_tokens = torch.ops.omniret.aswp_pool_fwd(x, d, r, mask, None, "stm", True, 1.0)
    assert sorted_tokens.dtype == torch.uint8 and sorted_values.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(sorted_values).all()
    proj = reference.aswp_project(x, d)
    for b in range(3):
        n_b = int(mask[b].sum())
        torch.testing.assert_close(sorted_values[b, :n_b], proj[b][mask[b]].sort(0).values)
        tokens = sorted_tokens[b, :n_b].long()
        assert mask[b][tokens].all()
        assert (tokens.sort(0).values == mask[b].nonzero()).all()
        torch.testing.assert_close(proj[b].gather(0, tokens), sorted_values[b, :n_b])
        assert (sorted_values[b, n_b:] == 0).all() and (sorted_tokens[b, n_b:] == 0).all()


@needs_cpu
def test_cpu_large_n_uses_int32_tokens():
    x, d, r, w, mask = make_inputs(1, 300, 4, 9, 16, masked=True)
    _, _, sorted_tokens = torch.ops.omniret.aswp_pool_fwd(x.detach(), d.detach(), r.detach(), mask, None, "stm",
                                                          True, 1.0)
    assert sorted_tokens.dtype == torch.int32
    assert_close_all(*run_both("stm", x, d, r, w, mask), atol=1e-9, rtol=1e-9)


@needs_cpu
def test_opcheck_dispatcher_ops():
    x, d, r, w, mask = make_inputs(2, 9, 5, 11, 6, dtype=torch.float32, masked=True, requires_grad=True)
    for pooling, weights in (("stm", None), ("weighted", w)):
        args = (x, d, r, mask, weights, pooling, True, 0.8)
        torch.library.opcheck(torch.ops.omniret.aswp_pool_fwd.default, args)
        out, s, tr = torch.ops.omniret.aswp_pool_fwd(*(a.detach() if torch.is_tensor(a) else a for a in args))
        bwd_args = (torch.randn_like(out), x.detach(), d.detach(), r.detach(), mask,
                    None if weights is None else weights.detach(), s, tr, pooling, True, 0.8, True, True)
        torch.library.opcheck(torch.ops.omniret.aswp_pool_bwd.default, bwd_args)
        lean_args = tuple(a.detach() if torch.is_tensor(a) else a for a in args) + (False,)
        torch.library.opcheck(torch.ops.omniret.aswp_pool_fwd.default, lean_args)


# ---------------------------------------------------------------------------------------------------------
# save_for_backward=False: the forward without the (B, N, L) tensors backward needs (grad off or no input needs grad)
# ---------------------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 37, 7, 70, 20, True), (2, 5, 3, 64, 9, False), (2, 1, 4, 33, 3, False),
                                   (1, 300, 4, 40, 16, True), (2, 20, 6, 300, 40, True)], ids=lambda s: "B{}N{}D{}L{}M{}{}".format(*s[:5], "m" * s[5]))
def test_no_save_forward_equals_saving_forward(pooling, dtype, shape):
    """Bit for bit the same output (float32 sorts value-only keys, float64 the keyed block), saved slots empty."""
    B, N, D, L, M, masked = shape
    x, d, r, w, mask = make_inputs(B, N, D, L, M, dtype=dtype, masked=masked, requires_grad=False)
    x[:, 1::4] = x[:, 0:1]  # tied projections
    weights = w if pooling == "weighted" else None
    saving = torch.ops.omniret.aswp_pool_fwd(x, d, r, mask, weights, pooling, True, 0.7, True)
    lean = torch.ops.omniret.aswp_pool_fwd(x, d, r, mask, weights, pooling, True, 0.7, False)
    assert torch.equal(lean[0], saving[0])
    assert lean[1].numel() == 0 and lean[2].numel() == 0
    assert (lean[1].dtype, lean[2].dtype) == (saving[1].dtype, saving[2].dtype)
    with torch.no_grad():  # the wrapper picks the lean forward here
        assert torch.equal(aswp_pool(x, d, r, mask, pooling=pooling, weights=weights, temperature=0.7,
                                     backend="cpu"), saving[0])


@needs_cpu
def test_wrapper_saves_only_when_backward_can_be_needed(monkeypatch):
    aswp_module = importlib.import_module("omniret_kernels.aswp_pool")  # the package attribute is the function
    seen = []
    monkeypatch.setattr(aswp_module, "_needs_backward",
                        lambda *t, _f=aswp_module._needs_backward: seen.append(_f(*t)) or seen[-1])
    x, d, r, w, _ = make_inputs(2, 6, 4, 40, 5, requires_grad=False)
    aswp_pool(x, d, r, backend="cpu")
    aswp_pool(x, d.requires_grad_(), r, backend="cpu")
    with torch.no_grad():
        aswp_pool(x, d, r, backend="cpu")
    with torch.inference_mode():
        aswp_pool(x, d, r, backend="cpu")
    out = aswp_pool(x, d.detach(), r, pooling="weighted", weights=w.requires_grad_(), backend="cpu")
    assert seen == [False, True, False, False, True]
    assert out.requires_grad


@needs_cpu
def test_backward_after_a_no_save_forward_raises():
    x, d, r, _, mask = make_inputs(2, 6, 4, 40, 5, masked=True)
    out, sorted_values, _ = torch.ops.omniret.aswp_pool_fwd(x, d, r, mask, None, "stm", True, 1.0, False)
    assert sorted_values.numel() == 0
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()
    with torch.no_grad():
        lean = aswp_pool(x, d, r, mask, backend="cpu")
    assert not lean.requires_grad  # nothing recorded: no backward to reach


@needs_cpu
@pytest.mark.parametrize("pooling", ["max", "weighted"])
def test_gradcheck_after_no_grad_forward(pooling):
    """A no-grad forward first (the lean path) does not disturb a later forward with grad: gradcheck in float64."""
    x, d, r, w, mask = make_inputs(2, 5, 3, 7, 4, masked=True, seed=11)
    weights = w if pooling == "weighted" else None
    with torch.no_grad():
        lean = aswp_pool(x, d, r, mask, pooling=pooling, weights=weights, backend="cpu")
    f = lambda *a: aswp_pool(*a[:3], mask, pooling=pooling, weights=a[3] if len(a) > 3 else None,  # noqa: E731
                             backend="cpu")
    inputs = (x, d, r) + ((w,) if pooling == "weighted" else ())
    assert torch.equal(f(*inputs).detach(), lean)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)


@needs_cpu
def test_torch_compile_fullgraph_no_grad_matches_eager():
    torch.manual_seed(2)
    pool = ASWPPool(12, num_slices=40, num_references=9)
    x = torch.randn(3, 9, 12)
    compiled = torch.compile(pool, fullgraph=True)
    with torch.no_grad():
        eager, got = pool(x), compiled(x)
    assert not got.requires_grad
    torch.testing.assert_close(got, eager)


@needs_cpu
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(1)
    pool = ASWPPool(12, num_slices=40, num_references=9)
    x = torch.randn(3, 9, 12)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False

    def loss_of(module):
        return (module(x, mask) * torch.linspace(-1, 1, 40)).sum()

    eager = loss_of(pool)
    eager_grads = torch.autograd.grad(eager, list(pool.parameters()))
    compiled = torch.compile(pool, fullgraph=True)
    got = loss_of(compiled)
    got_grads = torch.autograd.grad(got, list(pool.parameters()))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU tensors; tiny shapes: tl.sort is slow there)
# ---------------------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not (_ext.triton_importable() and _ext.triton_interpreting()),
                                  reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1")


@pytest.mark.parametrize("device,backend", device_backends("aswp_pool"))
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_reference_on_each_device_backend(device, backend, pooling, dtype):
    """Forward and gradients against the float64 reference on the same (rounded) inputs, on the backend's device.
    The interpreter runs tiny float32 shapes (tl.sort is slow there); the CPU kernel and GPUs the odd-sized ones."""
    interpreted = device == "cpu" and backend == "triton"
    if interpreted and dtype != torch.float32:
        pytest.skip("the Triton interpreter test runs float32 only (slow); the other dtypes run on a GPU")
    shape = (2, 5, 7, 9, 6) if interpreted else (3, 37, 24, 70, 20)
    x, d, r, w, mask = make_inputs(*shape, dtype=dtype, masked=pooling in ("stm", "mean") or not interpreted,
                                   requires_grad=False)
    leaves = (x, d, r) + ((w,) if pooling == "weighted" else ())
    on_device = [t.to(device).requires_grad_() for t in leaves]
    out = aswp_pool(*on_device[:3], None if mask is None else mask.to(device), pooling=pooling,
                    weights=on_device[3] if pooling == "weighted" else None, temperature=0.7, backend=backend)
    g = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, on_device, g.to(device, out.dtype))
    ref_leaves = [t.double().requires_grad_() for t in leaves]
    ref = reference.aswp_pool(*ref_leaves[:3], mask, pooling=pooling,
                              weights=ref_leaves[3] if pooling == "weighted" else None, temperature=0.7)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    tol = tolerance(dtype, device)
    atol = max(tol["atol"], tol["rtol"]) * (2 if dtype in (torch.bfloat16, torch.float16) else 1)
    assert out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=atol)
    for name, a, b in zip(("x", "directions", "references", "weights"), grads, ref_grads):
        torch.testing.assert_close(a.cpu().double(), b, atol=4 * atol, rtol=4 * atol,
                                   msg=lambda m: f"grad {name}: {m}")


@needs_triton
@needs_cpu
@pytest.mark.triton
def test_backends_agree():
    x, d, r, w, mask = make_inputs(2, 6, 5, 17, 4, dtype=torch.float32, masked=True, requires_grad=False)
    outs = {}
    for backend in ("reference", "cpu", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, d, r)]
        out = aswp_pool(*leaves, mask, backend=backend, normalize_directions=False)
        out.backward(torch.ones_like(out))
        outs[backend] = [out.detach()] + [t.grad for t in leaves]
        with torch.no_grad():  # the forward without saving for backward: the same output
            lean = aswp_pool(*leaves, mask, backend=backend, normalize_directions=False)
        assert torch.equal(lean, outs[backend][0]), backend
    for backend in ("cpu", "triton"):
        for a, b in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.triton
def test_triton_no_save_forward_writes_only_the_output():
    """save_for_backward=False: the same output bit for bit, both saved slots empty (the kernel skips the token
    store; the sorted values are its scratch and are not returned)."""
    x, d, r, w, mask = make_inputs(2, 7, 5, 19, 4, dtype=torch.float32, masked=True, requires_grad=False)
    op = torch.ops.omniret.aswp_pool_triton_fwd
    saving = op(x, d, r, mask, w, "weighted", True, 0.7, True)
    lean = op(x, d, r, mask, w, "weighted", True, 0.7, False)
    assert saving[1].shape == saving[2].shape == (2, 7, 19)
    assert torch.equal(lean[0], saving[0])
    assert lean[1].shape == lean[2].shape == (0,)
    assert (lean[1].dtype, lean[2].dtype) == (saving[1].dtype, saving[2].dtype)


# ---------------------------------------------------------------------------------------------------------
# CUDA extension: compiled here, no device to run it
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _ext.cuda_extension_built(), reason="omniret_kernels._C_cuda was not built")
def test_cuda_kernel_registered():
    assert _ext.has_kernel("aswp_pool_fwd", "CUDA")
    assert _ext.has_kernel("aswp_pool_bwd", "CUDA")


# ---------------------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------------------
@needs_cpu
def test_bad_arguments_raise_value_errors():
    x, d, r, w, mask = make_inputs(2, 5, 4, 6, 3, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="directions"):
        aswp_pool(x, d[:, :3], r)
    with pytest.raises(ValueError, match="references"):
        aswp_pool(x, d, r[:, :4])
    with pytest.raises(ValueError, match="mask"):
        aswp_pool(x, d, r, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        aswp_pool(x, d, r, pooling="weighted")
    with pytest.raises(ValueError, match="pooling"):
        aswp_pool(x, d, r, pooling="median")
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x"):
        aswp_pool(bad, d, r, check_finite=True)
    with pytest.raises(ValueError, match="mask"):  # the kernel's own check, reached without the Python one
        torch.ops.omniret.aswp_pool_fwd(x, d, r, torch.zeros(2, 5, dtype=torch.bool), None, "stm", True, 1.0)
