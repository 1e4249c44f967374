"""Loads the compiled extensions and says which backends can run here."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

# The ops of the library; each is the pair of dispatcher ops omniret::<op>_fwd and omniret::<op>_bwd.
OPS = ("aswp_pool", "resampler_attention", "diversity_loss")

_CUDA_EXT = None
_CUDA_ERROR: Optional[BaseException] = None


def _import_extension(name: str):
    """(module, None) or (None, the reason it is unavailable)."""
    if importlib.util.find_spec(f"omniret_kernels.{name}") is None:
        return None, ImportError(f"omniret_kernels.{name} is not built")
    try:
        return importlib.import_module(f"omniret_kernels.{name}"), None
    except ImportError as exc:  # built against another torch, or a missing shared library
        return None, exc


# Importing _C registers the omniret:: schemas and the CPU kernels; _C_cuda registers the CUDA kernels.
_CPU_EXT, _CPU_ERROR = _import_extension("_C")
if _CPU_EXT is not None:
    _CUDA_EXT, _CUDA_ERROR = _import_extension("_C_cuda")


def cpu_extension_built() -> bool:
    return _CPU_EXT is not None


def cuda_extension_built() -> bool:
    return _CUDA_EXT is not None


def cpu_extension_error() -> str:
    return "" if _CPU_ERROR is None else f"{type(_CPU_ERROR).__name__}: {_CPU_ERROR}"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def has_kernel(op: str, key: str) -> bool:
    """True when the dispatcher op omniret::<op> has a kernel for the dispatch key ("CPU", "CUDA")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"omniret::{op}", key)
    except RuntimeError:  # the op is not registered at all
        return False


def available_backends() -> list[str]:
    """The backends this installation can use, with what limits them here, e.g.
    ['reference', 'cpu', 'triton (interpreter)', 'cuda (compiled, no device)']."""
    has_device = torch.cuda.is_available()
    out = ["reference"]
    if cpu_extension_built():
        out.append("cpu")
    if triton_importable():
        if has_device:
            out.append("triton")
        elif triton_interpreting():
            out.append("triton (interpreter)")
        else:
            out.append("triton (no device; TRITON_INTERPRET=1 runs it on CPU tensors)")
    if cuda_extension_built():
        out.append("cuda" if has_device else "cuda (compiled, no device)")
    return out


# What setup.py builds when TORCH_CUDA_ARCH_LIST is not set: SASS for these archs, no PTX. Used only when the CUDA
# extension does not report its own archs (an older build).
_DEFAULT_CUDA_ARCHS = ("sm_80", "sm_90", "sm_90a")


def cuda_built_archs() -> tuple[str, ...]:
    """The GPU code in _C_cuda: 'sm_XY' (SASS, runs on compute capability X.Y' with Y' >= Y; 'sm_XYa' on X.Y only)
    and 'compute_XY' (PTX, JIT-compiled for any capability >= X.Y). Read from `_C_cuda.built_archs()` when the
    build exports it, else the build's default list. Empty when the extension is not built."""
    if _CUDA_EXT is None:
        return ()
    reported = getattr(_CUDA_EXT, "built_archs", None)
    if callable(reported):
        return tuple(str(a) for a in reported())
    return _DEFAULT_CUDA_ARCHS


def arch_runs_on(archs, capability: tuple[int, int]) -> bool:
    """Whether code built for `archs` (see cuda_built_archs) can run on a device of compute `capability`."""
    major, minor = capability
    for arch in archs:
        kind, _, digits = arch.partition("_")
        family = digits.endswith("a")  # sm_90a: arch-specific features, runs on exactly 9.0
        digits = digits.rstrip("a")
        if not digits.isdigit() or len(digits) < 2:
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and (a_minor == minor if family else a_minor <= minor):
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor) and not family:
            return True
    return False
