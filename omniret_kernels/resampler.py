"""resampler_attention: cross-attention of latent queries over packed, unpadded media keys (SPEC section 2)."""
from __future__ import annotations

from typing import Optional

import torch

from omniret_kernels import reference
from omniret_kernels._checks import FLOAT_DTYPES, check_same_device, check_tensor, is_compiling
from omniret_kernels._dispatch import resolve_backend

__all__ = ["resampler_attention"]


def _check_args(q, k, v, cu_seqlens):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, _, d = q.shape
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), shape=(None, None, d))
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), shape=tuple(k.shape))
    if H % k.shape[1] != 0:
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


def resampler_attention(q, k, v, cu_seqlens, *, scale: Optional[float] = None, backend: Optional[str] = None):
    """q (B, H, Nq, d), k/v (T, Hk, d) packed, cu_seqlens (B + 1,) int32 -> (B, H, Nq, d)."""
    device = _check_args(q, k, v, cu_seqlens)
    backend = resolve_backend("resampler_attention", device, backend)
    if backend == "reference":
        out = reference.resampler_attention(q.float(), k.float(), v.float(), cu_seqlens, scale=scale)
        return out.to(q.dtype)
    raise NotImplementedError(f"resampler_attention backend {backend!r}")  # replaced by issue 4
