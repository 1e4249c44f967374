"""resampler_attention: cross-attention of latent queries over packed, unpadded media keys (SPEC section 2).

Backends: the dispatcher ops omniret::resampler_attention_fwd / _bwd (C++ CPU kernel) and the Python custom ops
omniret::resampler_attention_triton_fwd / _bwd (Triton) share the fake kernels and the backward formula below: the
forward returns (out, lse) with lse (B, H, Nq) the log-sum-exp of each query row, and the backward recomputes the
probabilities from it. On CUDA, float16/bfloat16 go first to torch's varlen_attn or flash-attn's
flash_attn_varlen_func (differentiable on their own); the rule is in _dispatch.py and docs/gpu.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from omniret_kernels import reference
from omniret_kernels._checks import FLOAT_DTYPES, check_finite as _check_finite, check_same_device, check_tensor, is_compiling
from omniret_kernels._dispatch import plan, run
from omniret_kernels._op import define_pair, reference_dtype

__all__ = ["resampler_attention", "check_cu_seqlens"]

_OP = "resampler_attention"


def _check_args(q, k, v, cu_seqlens):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, _, d = q.shape
    if d == 0:
        raise ValueError(f"q: the head dim d (last dimension) must be > 0, got shape {tuple(q.shape)}")
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), shape=(None, None, d))
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), shape=tuple(k.shape))
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({k.shape[1]})")
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), shape=(B + 1,))
    device = check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, k.shape[0])
    return device


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """cu_seqlens starts at 0, ends at `total` and strictly increases (no empty sample). Skipped when compiling."""
    if is_compiling():
        return
    lengths = cu_seqlens.diff()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {total}, got "
                         f"{int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}")
    if bool((lengths <= 0).any()):
        bad = (lengths <= 0).nonzero().flatten().tolist()
        raise ValueError(f"cu_seqlens must be strictly increasing: samples {bad} have no keys")


# ----------------------------------------------------------------------------------------------------------
# omniret::resampler_attention_fwd / _bwd (C++ CPU kernel) and the Triton pair, registered by _op.define_pair
# with one fake kernel per direction and one backward formula.
# ----------------------------------------------------------------------------------------------------------
FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> (Tensor, Tensor)"
BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
              "float scale) -> (Tensor, Tensor, Tensor)")


# The kernels return contiguous tensors whatever the inputs' strides, and so do the fakes.
def _fake_fwd(q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=reference_dtype(q.dtype))


def _fake_bwd(grad_out, q, k, v, out, lse, cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)  # an auxiliary output for the backward, not part of the op's value


def _backward(ctx, bwd_op, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.scale)
    return dq, dk, dv, None, None


def _triton_fwd(q, k, v, cu_seqlens, scale):
    from omniret_kernels.triton.resampler_attention import forward
    return forward(q, k, v, cu_seqlens, scale)


def _triton_bwd(grad_out, q, k, v, out, lse, cu_seqlens, scale):
    from omniret_kernels.triton.resampler_attention import backward
    return backward(grad_out, q, k, v, out, lse, cu_seqlens, scale)


OPS = define_pair(_OP, fwd_schema=FWD_SCHEMA, bwd_schema=BWD_SCHEMA, fwd_fake=_fake_fwd, bwd_fake=_fake_bwd,
                  setup_context=_setup_context, backward=_backward, triton_fwd=_triton_fwd,
                  triton_bwd=_triton_bwd)


# ----------------------------------------------------------------------------------------------------------
# The flash kernels of torch (varlen_attn) and flash-attn: differentiable functions of their own. The op's
# queries are latents, Nq per sample, so the queries are packed as (B * Nq, H, d) with cu_seqlens_q =
# 0, Nq, 2 Nq, ...; the keys are packed already. Grouped-query heads map as ours do (q head h reads kv head
# h // (H / Hk)), which both kernels implement natively.
# ----------------------------------------------------------------------------------------------------------
def _flash_arguments(q, k, cu_seqlens):
    """(packed q (B * Nq, H, d), cu_seqlens_q, cu_seqlens_k, max_q, max_k) for a varlen flash kernel."""
    B, H, Nq, d = q.shape
    packed_q = q.transpose(1, 2).reshape(B * Nq, H, d)
    cu_q = torch.arange(0, B * Nq + 1, Nq, dtype=torch.int32, device=q.device)
    # max_k sizes the kernel's grid; any upper bound is correct, the exact one (a device sync) is cheaper to run.
    max_k = k.shape[0] if is_compiling() else int(cu_seqlens.diff().max())
    return packed_q, cu_q, cu_seqlens, Nq, max_k


def _unpack_queries(out, q_shape):
    B, H, Nq, d = q_shape
    return out.view(B, Nq, H, d).transpose(1, 2)


def _varlen_attn_forward(q, k, v, cu_seqlens, scale):
    from torch.nn.attention import varlen

    packed_q, cu_q, cu_k, max_q, max_k = _flash_arguments(q, k, cu_seqlens)
    out = varlen.varlen_attn(packed_q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                             enable_gqa=q.shape[1] != k.shape[1])
    return _unpack_queries(out, q.shape)


def _flash_attn_forward(q, k, v, cu_seqlens, scale):
    import flash_attn

    packed_q, cu_q, cu_k, max_q, max_k = _flash_arguments(q, k, cu_seqlens)
    out = flash_attn.flash_attn_varlen_func(packed_q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                            softmax_scale=scale, causal=False)
    return _unpack_queries(out, q.shape)


def resampler_attention(q, k, v, cu_seqlens, *, scale: Optional[float] = None, check_finite: bool = False,
                        backend: Optional[str] = None):
    """q (B, H, Nq, d), k/v (T, Hk, d) packed, cu_seqlens (B + 1,) int32 -> (B, H, Nq, d).

    out[b, h] = softmax(q[b, h] k_b^T * scale) v_b over sample b's keys only, kv head h // (H / Hk);
    scale = d ** -0.5 by default. float32/float16/bfloat16 compute in float32, float64 in float64.
    check_finite=True raises a ValueError naming q, k or v when it holds NaN or Inf (one pass over each).
    On CUDA, float16/bfloat16 go to torch's varlen_attn (or flash-attn); the result may then be a strided view.
    """
    device = _check_args(q, k, v, cu_seqlens)
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_finite(name, t)
    B, H, Nq, d = q.shape
    scale = float(d ** -0.5 if scale is None else scale)
    sizes = dict(H=H, Hk=k.shape[1], Nq=Nq, d=d)
    backends = plan(_OP, device, q.dtype, backend, **sizes)

    def call(chosen: str) -> torch.Tensor:
        if chosen == "reference":
            compute = reference_dtype(q.dtype)
            out = reference.resampler_attention(q.to(compute), k.to(compute), v.to(compute), cu_seqlens,
                                                scale=scale)
            return out.to(q.dtype)
        if chosen == "varlen_attn":
            return _varlen_attn_forward(q, k, v, cu_seqlens, scale)
        if chosen == "flash_attn":
            return _flash_attn_forward(q, k, v, cu_seqlens, scale)
        return OPS.fwd.get(chosen)(q, k, v, cu_seqlens, scale)[0]

    return run(_OP, backends, call, device=device, dtype=q.dtype, **sizes)
