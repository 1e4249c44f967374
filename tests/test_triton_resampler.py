"""The flash-style Triton resampler_attention kernels (interpreter) against the float64 reference: odd sizes,
ragged lengths with one-key samples, GQA / MQA, several query blocks (Nq beyond one block), float64 (ieee) and
bfloat16 inputs, NaN-poisoned outputs, and the launcher's config rules."""
import pytest
import torch

from omniret_kernels import _ext, reference

pytestmark = pytest.mark.skipif(not (_ext.triton_importable() and _ext.triton_interpreting()),
                                reason="triton not importable or TRITON_INTERPRET != 1")


def _case(lengths, H, Hk, Nq, d, dtype):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    T = int(cu[-1])
    q = torch.randn(len(lengths), H, Nq, d, dtype=torch.float64)
    k = torch.randn(T, Hk, d, dtype=torch.float64) * 2
    v = torch.randn(T, Hk, d, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


def _reference(q, k, v, cu, grad, scale):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.resampler_attention(q, k, v, cu, scale=scale)
    out.backward(grad.double())
    return out.detach(), q.grad, k.grad, v.grad


def _triton(q, k, v, cu, grad, scale):
    from omniret_kernels.triton import resampler_attention as kernels
    out, lse = kernels.forward(q, k, v, cu, scale)
    dq, dk, dv = kernels.backward(grad, q, k, v, out, lse, cu, scale)
    return out, dq, dk, dv


@pytest.mark.parametrize("lengths,H,Hk,Nq,d,dtype", [
    ([1, 37, 2], 3, 3, 5, 24, torch.float64),  # one-key sample, odd d and Nq, MHA, ieee float64
    ([33, 1, 17], 6, 2, 7, 40, torch.float64),  # GQA 3:1
    ([19, 50], 4, 1, 3, 12, torch.float32),  # MQA, key tiles crossed with a ragged tail
    ([9, 1], 2, 1, 130, 16, torch.float64),  # Nq = 130 > one 128-query block: several query blocks
    ([21, 4], 4, 2, 9, 48, torch.bfloat16),  # 16-bit inputs (widened in the interpreter, see _precision.py)
])
def test_matches_float64_reference(lengths, H, Hk, Nq, d, dtype):
    q, k, v, cu = _case(lengths, H, Hk, Nq, d, dtype)
    grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    scale = d ** -0.5
    want = _reference(q, k, v, cu, grad, scale)
    got = _triton(q, k, v, cu, grad, scale)
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-5),
           torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{name}: {m}")


def test_configs_follow_the_register_budget_and_reject_wide_heads():
    from omniret_kernels.triton.resampler_attention import MAX_HEAD_DIM, _configs
    first = {(dt, bwd): dict(_configs(128, 128, dt, bwd)[0].constexprs)["BLOCK_M"]
             for dt in (torch.bfloat16, torch.float32, torch.float64) for bwd in (False, True)}
    assert first[(torch.bfloat16, False)] == 128 and first[(torch.float32, False)] == 64
    assert first[(torch.float64, True)] == 16  # fp64 backward: the config that used to ask for 278 KB of smem
    assert dict(_configs(96, 96, torch.bfloat16, False)[0].constexprs)["BLOCK_D"] == 128  # d = 96 pads to 128
    with pytest.raises(ValueError, match=f"d <= {MAX_HEAD_DIM}"):
        _configs(64, MAX_HEAD_DIM + 1, torch.float32, False)
