"""Argument checks shared by every op. Each raises ValueError naming the argument at fault."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class KernelLimitError(ValueError):
    """A shape or dtype beyond what one kernel supports (its register / shared-memory budget), raised before launch.

    A ValueError, so a caller who named the backend gets the usual error; automatic dispatch catches it and runs
    the next backend instead (omniret_kernels._dispatch.run)."""


def is_compiling() -> bool:
    """Data-dependent checks are skipped while torch.compile traces (they would break the graph)."""
    return torch.compiler.is_compiling()


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape: Optional[tuple] = None,
) -> None:
    """`shape` may hold None for a free dimension."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    """All given tensors (None entries skipped) on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def check_finite(name: str, t: torch.Tensor) -> None:
    if not is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
