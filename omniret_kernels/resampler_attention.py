"""resampler_attention: cross-attention of latent queries over packed, unpadded media keys (SPEC section 2).

Backends: the dispatcher ops omniret::resampler_attention_fwd / _bwd (C++ CPU kernel, CUDA kernel when built)
and the Python custom ops omniret::resampler_attention_triton_fwd / _bwd (Triton). Both pairs share the fake
kernels and the backward formula below: the forward returns (out, lse) with lse (B, H, Nq) the log-sum-exp of each
query row, and the backward recomputes the probabilities from it.
"""
from __future__ import annotations

from typing import Optional

import torch

from omniret_kernels import _ext, reference
from omniret_kernels._checks import FLOAT_DTYPES, check_finite as _check_finite, check_same_device, check_tensor, is_compiling
from omniret_kernels._dispatch import resolve_backend

__all__ = ["resampler_attention", "check_cu_seqlens"]

_OP = "resampler_attention"


def _check_args(q, k, v, cu_seqlens):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, _, d = q.shape
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
# Fake kernels and the backward formula, shared by the dispatcher ops and the Triton custom ops
# ----------------------------------------------------------------------------------------------------------
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The kernels return contiguous tensors whatever the inputs' strides, and so do the fakes.
def _fake_fwd(q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _fake_bwd(grad_out, q, k, v, out, lse, cu_seqlens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)  # an auxiliary output for the backward, not part of the op's value


def _backward_with(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.scale)
        return dq, dk, dv, None, None

    return backward


def _register_dispatcher_ops() -> bool:
    """Fake kernels + autograd for omniret::resampler_attention_fwd/_bwd, when the C++ library defines them."""
    if not _ext.cpu_extension_built() or not hasattr(torch.ops.omniret, f"{_OP}_fwd"):
        return False
    torch.library.register_fake(f"omniret::{_OP}_fwd")(_fake_fwd)
    torch.library.register_fake(f"omniret::{_OP}_bwd")(_fake_bwd)
    torch.library.register_autograd(f"omniret::{_OP}_fwd", _backward_with(torch.ops.omniret.resampler_attention_bwd),
                                    setup_context=_setup_context)
    return True


def _register_triton_ops() -> bool:
    if not _ext.triton_importable():
        return False

    @torch.library.custom_op(f"omniret::{_OP}_triton_fwd", mutates_args=())
    def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        from omniret_kernels.triton.resampler_attention import forward

        return forward(q, k, v, cu_seqlens, scale)

    @torch.library.custom_op(f"omniret::{_OP}_triton_bwd", mutates_args=())
    def triton_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from omniret_kernels.triton.resampler_attention import backward

        return backward(grad_out, q, k, v, out, lse, cu_seqlens, scale)

    triton_fwd.register_fake(_fake_fwd)
    triton_bwd.register_fake(_fake_bwd)
    triton_fwd.register_autograd(_backward_with(torch.ops.omniret.resampler_attention_triton_bwd),
                                 setup_context=_setup_context)
    return True


_HAS_DISPATCHER_OPS = _register_dispatcher_ops()
_HAS_TRITON_OPS = _register_triton_ops()


@torch.compiler.assume_constant_result
def _resolve(device_type: str, device_index: int, backend: Optional[str]) -> str:
    """The backend rule, evaluated once at trace time under torch.compile (its answer is a constant)."""
    device = torch.device(device_type) if device_index < 0 else torch.device(device_type, device_index)
    return resolve_backend(_OP, device, backend)


def resampler_attention(q, k, v, cu_seqlens, *, scale: Optional[float] = None, check_finite: bool = False,
                        backend: Optional[str] = None):
    """q (B, H, Nq, d), k/v (T, Hk, d) packed, cu_seqlens (B + 1,) int32 -> (B, H, Nq, d).

    out[b, h] = softmax(q[b, h] k_b^T * scale) v_b over sample b's keys only, kv head h // (H / Hk);
    scale = d ** -0.5 by default. float32/float16/bfloat16 compute in float32, float64 in float64.
    check_finite=True raises a ValueError naming q, k or v when it holds NaN or Inf (one pass over each).
    """
    device = _check_args(q, k, v, cu_seqlens)
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_finite(name, t)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    backend = _resolve(device.type, -1 if device.index is None else device.index, backend)
    if backend == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = reference.resampler_attention(q.to(compute), k.to(compute), v.to(compute), cu_seqlens, scale=scale)
        return out.to(q.dtype)
    if backend == "triton":
        return torch.ops.omniret.resampler_attention_triton_fwd(q, k, v, cu_seqlens, scale)[0]
    return torch.ops.omniret.resampler_attention_fwd(q, k, v, cu_seqlens, scale)[0]
