"""The one backend rule every op follows.

CPU tensors go to the C++ CPU kernel; CUDA tensors to the CUDA kernel if it was built, else to the Triton kernel.
An explicit `backend=` ("reference", "cpu", "triton", "cuda") wins; one that cannot run raises a ValueError
naming what is missing. Triton on CPU tensors runs only under TRITON_INTERPRET=1. With no `backend=` and no fast
kernel for the device, the plain-PyTorch reference runs, after one warning per op that says why.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch

from omniret_kernels import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")


def _triton_op_exists(op: str) -> bool:
    return _ext.triton_importable() and importlib.util.find_spec(f"omniret_kernels.triton.{op}") is not None


def _why_not(op: str, backend: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run omniret::<op> on tensors on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        if not _ext.cpu_extension_built():
            return (
                "the CPU extension omniret_kernels._C is not built or failed to load "
                f"({_ext.cpu_extension_error()}); reinstall with `pip install -e . --no-build-isolation`"
            )
        if not _ext.has_kernel(f"{op}_fwd", "CPU"):
            return (f"omniret::{op}_fwd has no CPU kernel in this build (is omniret_kernels._C older than the "
                    "Python sources? rebuild with `pip install -e . --no-build-isolation`)")
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        if not _ext.cuda_extension_built():
            return (
                "the CUDA extension omniret_kernels._C_cuda was not built (it needs a CUDA build of torch and "
                "nvcc at build time; OMNIRET_BUILD_CUDA=1 forces it)"
            )
        if not _ext.has_kernel(f"{op}_fwd", "CUDA"):
            return (f"omniret::{op}_fwd has no CUDA kernel in this build (is omniret_kernels._C_cuda older than "
                    "the Python sources? rebuild with `pip install -e . --no-build-isolation`)")
        return None
    if backend == "triton":
        if not _ext.triton_importable():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not _ext.triton_interpreting():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, got tensors on {device}"
        if not _triton_op_exists(op):
            return f"{op} has no Triton kernel"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve_backend(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """Pick the backend for omniret::<op> on `device`, or raise a ValueError that says why it cannot run."""
    if backend is not None:
        reason = _why_not(op, backend, device)
        if reason is not None:
            raise ValueError(f"{op}: backend {backend!r} is unavailable: {reason}")
        return backend
    if device.type == "cpu":
        candidates = ("cpu",)
    elif device.type == "cuda":
        candidates = ("cuda", "triton")
    else:
        candidates = ()
    reasons = []
    for name in candidates:
        reason = _why_not(op, name, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    detail = "; ".join(reasons) if reasons else f"no kernel runs on {device.type} tensors"
    if op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(f"{op}: no fast backend can run here ({detail}); using the slow plain-PyTorch reference",
                      RuntimeWarning, stacklevel=3)
    return "reference"


_WARNED: set = set()
