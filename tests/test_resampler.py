"""resampler_attention: every backend that runs here against reference.py, on fresh random ragged batches.

Tests follow the device: (device, backend) pairs from conftest.device_backends, CUDA ones on a GPU only."""
import pytest
import torch

from omniret_kernels import _dispatch, _ext, reference, resampler_attention

from conftest import device_backends, tolerance

needs_cpu = pytest.mark.skipif(not _ext.has_kernel("resampler_attention_fwd", "CPU"),
                               reason="CPU extension not built")
needs_triton = pytest.mark.skipif(not (_ext.triton_importable() and _ext.triton_interpreting()),
                                  reason="triton not importable or TRITON_INTERPRET != 1")
PAIRS = device_backends("resampler_attention")

# The CPU kernel and the GPU see the real lengths (1 key, a few, one SigLIP image, 30 s of audio); the Triton
# interpreter is slow, so its batches stay small but still cross several key blocks and leave partial ones.
LENGTHS = {"cpu": [1, 7, 729, 1500, 3], "interpreter": [1, 7, 70, 33]}


def _interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def _skip_unless_runs(device, backend, dtype, **sizes):
    """Dtype and shape gates of the dispatch rule: a flash kernel does not take float32, for one."""
    reason = _dispatch.why_not("resampler_attention", backend, torch.device(device), dtype, **sizes)
    if reason is not None:
        pytest.skip(reason)


def _cu(lengths, device="cpu"):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def _inputs(lengths, H, Hk, Nq, d, dtype, shuffle=True):
    if shuffle:
        lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    cu = _cu(lengths)
    T = int(cu[-1])
    q = torch.randn(len(lengths), H, Nq, d, dtype=dtype)
    k = torch.randn(T, Hk, d, dtype=dtype) * 2  # sharper softmax than unit scores
    v = torch.randn(T, Hk, d, dtype=dtype)
    return q, k, v, cu


def _run(backend, q, k, v, cu, grad, device="cpu", **kw):
    """(out, dq, dk, dv) on CPU, from inputs moved to `device`."""
    q, k, v = (t.detach().to(device).clone().requires_grad_() for t in (q, k, v))
    cu, grad = cu.to(device), grad.to(device)
    if backend == "reference":
        out = reference.resampler_attention(q, k, v, cu, **kw)
    else:
        out = resampler_attention(q, k, v, cu, backend=backend, **kw)
    out.backward(grad)
    return tuple(t.cpu() for t in (out.detach(), q.grad, k.grad, v.grad))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_match_reference(device, backend, heads, dtype):
    H, Hk = heads
    interpreted = _interpreted(device, backend)
    if interpreted and dtype in (torch.bfloat16, torch.float16):
        pytest.skip("16-bit Triton is tested on a GPU (the interpreter is slow)")
    Nq, d = (3, 20) if interpreted else (5, 24) if device == "cpu" else (8, 32)
    _skip_unless_runs(device, backend, dtype, H=H, Hk=Hk, Nq=Nq, d=d)
    q, k, v, cu = _inputs(LENGTHS["interpreter" if interpreted else "cpu"], H, Hk, Nq, d, dtype)
    grad = torch.randn(q.shape, dtype=dtype)
    want = _run("reference", q.double(), k.double(), v.double(), cu, grad.double())
    got = _run(backend, q, k, v, cu, grad, device=device)
    tol = tolerance(dtype, device, backend)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{backend} {name}: {m}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_explicit_scale(device, backend):
    dtype = torch.bfloat16 if backend in _dispatch.FLASH_BACKENDS else torch.float64
    q, k, v, cu = _inputs([3, 17, 40], 2, 1, 4, 16, dtype)
    grad = torch.randn(q.shape, dtype=dtype)
    want = _run("reference", q.double(), k.double(), v.double(), cu, grad.double(), scale=0.37)
    got = _run(backend, q, k, v, cu, grad, device=device, scale=0.37)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **tolerance(dtype, device))


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v, cu = _inputs([1, 7, 300, 97], 4, 2, 8, 32, dtype)
    grad = torch.randn(q.shape).to(dtype)
    want = _run("reference", q.double(), k.double(), v.double(), cu, grad.double())
    got = _run("cpu", q, k, v, cu, grad)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        # inputs are exact in float64; the only error is the final rounding to dtype
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_gradcheck_float64(device, backend):
    _skip_unless_runs(device, backend, torch.float64, d=8)
    q, k, v, cu = (t.to(device) for t in _inputs([1, 3, 6], 2, 1, 2, 8, torch.float64))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # fast_mode checks random projections of the Jacobian: a few calls instead of one per input element, which
    # the Triton interpreter could not afford
    assert torch.autograd.gradcheck(lambda q, k, v: resampler_attention(q, k, v, cu, backend=backend), (q, k, v),
                                    fast_mode=backend == "triton")


@needs_cpu
@needs_triton
def test_all_backends_agree():
    q, k, v, cu = _inputs([1, 7, 70, 33, 2], 6, 3, 7, 16, torch.float32)
    grad = torch.randn(q.shape)
    results = {b: _run(b, q, k, v, cu, grad) for b in ("reference", "cpu", "triton")}
    for b in ("cpu", "triton"):
        for g, w in zip(results[b], results["reference"]):
            torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5)


@needs_cpu
def test_cpu_kernel_writes_every_output_element():
    """Deterministic mode fills torch.empty / at::empty with NaN, so an element the kernel skips shows up."""
    from torch.utils import deterministic

    q, k, v, cu = _inputs([1, 300, 257, 256], 4, 2, 5, 16, torch.float32)
    before = (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(3).isnan().all()  # the poisoning is active
        out, lse = torch.ops.omniret.resampler_attention_fwd(q, k, v, cu, 0.25)
        dq, dk, dv = torch.ops.omniret.resampler_attention_bwd(torch.randn_like(out), q, k, v, out, lse, cu, 0.25)
    finally:
        torch.use_deterministic_algorithms(before[0])
        deterministic.fill_uninitialized_memory = before[1]
    for t in (out, lse, dq, dk, dv):
        assert torch.isfinite(t).all()


def test_sample_alone_equals_sample_in_batch():
    q, k, v, cu = _inputs([7, 729, 1, 40], 4, 2, 5, 16, torch.float64, shuffle=False)
    batched = resampler_attention(q, k, v, cu)
    bounds = cu.tolist()
    for b in range(4):
        s, e = bounds[b], bounds[b + 1]
        alone = resampler_attention(q[b:b + 1], k[s:e], v[s:e], _cu([e - s]))
        torch.testing.assert_close(alone[0], batched[b], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu),
                                     pytest.param("triton", marks=needs_triton)])
def test_bad_arguments_raise_value_error(backend):
    q, k, v, cu = _inputs([3, 4], 4, 2, 2, 8, torch.float32, shuffle=False)
    call = lambda **kw: resampler_attention(**{"q": q, "k": k, "v": v, "cu_seqlens": cu, "backend": backend, **kw})
    with pytest.raises(ValueError, match="no keys"):
        call(cu_seqlens=torch.tensor([0, 0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        call(cu_seqlens=torch.tensor([0, 8, 7], dtype=torch.int32))  # ends at T but goes backwards
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))  # does not end at T = 7
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int64))
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="k must"):
        call(k=k[..., :4].contiguous(), v=v[..., :4].contiguous())
    with pytest.raises(ValueError, match="v must"):
        call(v=v[:5].contiguous())
    with pytest.raises(ValueError, match="multiple"):
        call(k=torch.randn(7, 3, 8), v=torch.randn(7, 3, 8))
    with pytest.raises(ValueError, match="dtype"):
        call(k=k.double(), v=v.double())
    with pytest.raises(ValueError, match="v contains NaN"):
        call(v=v.clone().index_fill_(0, torch.tensor([4]), float("nan")), check_finite=True)
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        call(q=q.clone().index_fill_(2, torch.tensor([1]), float("inf")), check_finite=True)
    with pytest.raises(ValueError, match="head dim"):  # d = 0 once raised ZeroDivisionError from d ** -0.5
        call(q=q[..., :0], k=k[..., :0], v=v[..., :0])


@needs_cpu
def test_cpu_kernel_checks_cu_seqlens_itself():
    """The kernel's own TORCH_CHECK_VALUE (the Python checks are skipped under torch.compile) raises ValueError."""
    q, k, v, _ = _inputs([3, 4], 2, 2, 2, 8, torch.float32, shuffle=False)
    for bad in ([0, 5, 3], [0, 0, 7], [1, 3, 7]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            torch.ops.omniret.resampler_attention_fwd(q, k, v, torch.tensor(bad, dtype=torch.int32), 0.5)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend):
    q, k, v, cu = _inputs([1, 6, 20], 4, 2, 3, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    prefix = "resampler_attention" if backend == "cpu" else "resampler_attention_triton"
    fwd = getattr(torch.ops.omniret, f"{prefix}_fwd")
    bwd = getattr(torch.ops.omniret, f"{prefix}_bwd")
    torch.library.opcheck(fwd, (q, k, v, cu, 0.25))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), cu, 0.25)
    torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, 0.25))


@needs_cpu
def test_torch_compile_fullgraph_matches_eager():
    q, k, v, cu = _inputs([1, 7, 300, 40], 4, 2, 5, 16, torch.float32)
    grad = torch.randn(q.shape)

    def f(q, k, v, cu):
        return resampler_attention(q, k, v, cu) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = _run_fn(f, q, k, v, cu, grad)
    got = _run_fn(compiled, q, k, v, cu, grad)
    for g, w in zip(got, eager):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _run_fn(fn, q, k, v, cu, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, cu)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.skipif(not _ext.cuda_extension_built(), reason="CUDA extension not built")
def test_no_hand_written_cuda_kernel_when_built():
    """The hand-written CUDA resampler was deleted (issue #18: it lost to varlen_attn/flash-attn on paper), so the
    CUDA extension registers no resampler kernel and CUDA tensors go to the flash kernels or Triton."""
    assert not _ext.has_kernel("resampler_attention_fwd", "CUDA")
    assert not _ext.has_kernel("resampler_attention_bwd", "CUDA")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_inputs(device, backend):
    """Strided views (heads-major q, k and v split from one fused projection) give the contiguous-input result."""
    dtype = torch.bfloat16 if backend in _dispatch.FLASH_BACKENDS else torch.float64
    q, k, v, cu = _inputs([2, 9, 40], 4, 2, 3, 16, dtype)
    grad = torch.randn(q.shape, dtype=dtype)
    want = _run("reference", q.double(), k.double(), v.double(), cu, grad.double())
    q_strided = q.to(device).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (B, Nq, H, d) memory
    kv = torch.stack([k, v], dim=1).to(device).requires_grad_()  # (T, 2, Hk, d), as from one fused to_kv Linear
    assert not q_strided.is_contiguous() and not kv[:, 0].is_contiguous()
    out = resampler_attention(q_strided, kv[:, 0], kv[:, 1], cu.to(device), backend=backend)
    out.backward(grad.to(device))
    got = (out.detach(), q_strided.grad, kv.grad[:, 0], kv.grad[:, 1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, **tolerance(dtype, device))


# ---------------------------------------------------------------------------------------------------------
# The flash kernels (torch's varlen_attn, flash-attn): they need a GPU, so here the argument marshalling is checked
# on CPU against a stand-in that computes packed varlen attention from the arguments it is given. Not run on a GPU
# in this repository's CI.
# ---------------------------------------------------------------------------------------------------------
def _packed_varlen_attention(seen):
    """A varlen attention over packed queries and keys (the flash kernels' contract), recording its arguments."""
    def attention(query, key, value, cu_q, cu_k, max_q, max_k, scale, gqa):
        seen.append(dict(query=query, cu_q=cu_q.clone(), cu_k=cu_k.clone(), max_q=max_q, max_k=max_k, scale=scale,
                         gqa=gqa))
        group = query.shape[1] // key.shape[1]
        outs = []
        for b in range(cu_q.numel() - 1):
            qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
            qb = query[qs:qe].transpose(0, 1)  # (H, nq, d)
            kb = key[ks:ke].transpose(0, 1).repeat_interleave(group, 0)  # q head h reads kv head h // group
            vb = value[ks:ke].transpose(0, 1).repeat_interleave(group, 0)
            probs = torch.softmax(torch.einsum("hqd,hkd->hqk", qb, kb) * scale, dim=-1)
            outs.append(torch.einsum("hqk,hkd->hqd", probs, vb).transpose(0, 1))
        return torch.cat(outs)
    return attention


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("flash", ["varlen_attn", "flash_attn"])
def test_flash_kernel_arguments(monkeypatch, heads, flash):
    import sys
    import types

    from torch.nn.attention import varlen

    module = __import__("importlib").import_module("omniret_kernels.resampler_attention")
    seen = []
    attention = _packed_varlen_attention(seen)
    if flash == "varlen_attn":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False, **kw):
            assert not kw
            assert enable_gqa == (query.shape[1] != key.shape[1])
            return attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, enable_gqa)
        monkeypatch.setattr(varlen, "varlen_attn", fake)
        forward = module._varlen_attn_forward
    else:
        def fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal):
            assert dropout_p == 0.0 and causal is False
            return attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, None)
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake))
        forward = module._flash_attn_forward
    H, Hk = heads
    lengths = [5, 1, 40, 17]
    q, k, v, cu = _inputs(lengths, H, Hk, 3, 16, torch.float64, shuffle=False)
    grad = torch.randn(q.shape, dtype=torch.float64)
    want = _run("reference", q, k, v, cu, grad, scale=0.3)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = forward(qg, kg, vg, cu, 0.3)
    out.backward(grad)
    for g, w in zip((out.detach(), qg.grad, kg.grad, vg.grad), want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    (call,) = seen
    B, Nq = len(lengths), 3
    assert call["query"].shape == (B * Nq, H, 16)
    assert torch.equal(call["cu_q"], torch.arange(0, B * Nq + 1, Nq, dtype=torch.int32))
    assert call["cu_q"].dtype == torch.int32 and torch.equal(call["cu_k"], cu)
    assert call["max_q"] == Nq and call["max_k"] == max(lengths) and call["scale"] == 0.3


def test_flash_gates():
    cuda = torch.device("cuda")  # a device object only: the dtype and head-dim gates come before any device query
    why = lambda backend, dtype, d: _dispatch.why_not("resampler_attention", backend, cuda, dtype, d=d)  # noqa: E731
    assert "float16 or bfloat16" in why("varlen_attn", torch.float32, 64)
    assert "multiple of 8" in why("varlen_attn", torch.bfloat16, 20)
    assert "multiple of 8" in why("varlen_attn", torch.float16, 512)
    assert "CUDA tensors" in _dispatch.why_not("resampler_attention", "varlen_attn", torch.device("cpu"),
                                               torch.bfloat16, d=64)
    assert "resampler_attention only" in _dispatch.why_not("aswp_pool", "varlen_attn", cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="unavailable"):
        q, k, v, cu = _inputs([3, 4], 2, 2, 2, 8, torch.bfloat16)
        resampler_attention(q, k, v, cu, backend="varlen_attn")
