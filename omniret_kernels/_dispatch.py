"""The one backend rule every op follows (docs/gpu.md has it as a table).

`plan(op, device, dtype, backend, **sizes)` returns the backends to try, in order:
- `backend=` given ("reference", "cpu", "cuda", "triton", and for resampler_attention "varlen_attn",
  "flash_attn"): that one alone, or a ValueError naming what is missing when it cannot run here.
- otherwise the op's candidates for the device type (CANDIDATES) that pass their gates, fastest first, then
  "reference". Gates: the extension or package is there and has the op; on CUDA, the device's compute capability
  against the archs the code was built for (our CUDA extension) or is compiled for (Triton, flash kernels: sm_80+);
  the dtype; the shape limits a kernel documents. With no candidate left the reference runs, after one warning
  per op that says why.

`run(op, plan, call, key)` calls `call(backend)` with the first backend of the plan; when it raises at launch
(anything but a ValueError about the input, or a KernelLimitError, a ValueError saying a shape is beyond a
kernel's limits), the next one runs, after one warning; the failed backend is skipped from then on for that key.
Under torch.compile the plan is a trace-time constant and the first backend runs alone.
Triton runs on CPU tensors only under TRITON_INTERPRET=1 (for the tests).
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Callable, Optional

import torch

from omniret_kernels import _ext
from omniret_kernels._checks import KernelLimitError

BACKENDS = ("reference", "cpu", "cuda", "triton", "varlen_attn", "flash_attn")

# Fastest first, per op and device type; "reference" always comes last. resampler_attention has no CUDA kernel of
# its own: the flash kernels of torch and flash-attn beat a hand-written one (issue 18), Triton covers the rest.
CANDIDATES = {
    "aswp_pool": {"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    "resampler_attention": {"cpu": ("cpu",), "cuda": ("varlen_attn", "flash_attn", "triton")},
    "diversity_loss": {"cpu": ("cpu",), "cuda": ("cuda", "triton")},
}

FLASH_BACKENDS = ("varlen_attn", "flash_attn")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256  # FlashAttention-2's limit; head dims must also be a multiple of 8
TRITON_MIN_CAPABILITY = (8, 0)  # the Triton kernels are compile-checked for sm_80 and sm_90 only
FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 (torch's varlen_attn and flash-attn) needs Ampere or newer


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _triton_module(op: str):
    if not _ext.triton_importable() or importlib.util.find_spec(f"omniret_kernels.triton.{op}") is None:
        return None
    return importlib.import_module(f"omniret_kernels.triton.{op}")


def has_varlen_attn() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _why_not_cpu(op, device, dtype, sizes):
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    if not _ext.cpu_extension_built():
        return ("the CPU extension omniret_kernels._C is not built or failed to load "
                f"({_ext.cpu_extension_error()}); reinstall with `pip install -e . --no-build-isolation`")
    if not _ext.has_kernel(f"{op}_fwd", "CPU"):
        return (f"omniret::{op}_fwd has no CPU kernel in this build (is omniret_kernels._C older than the Python "
                "sources? rebuild with `pip install -e . --no-build-isolation`)")
    return None


def _why_not_cuda(op, device, dtype, sizes):
    if device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if not _ext.cuda_extension_built():
        return ("the CUDA extension omniret_kernels._C_cuda was not built (it needs a CUDA build of torch and nvcc "
                "at build time; OMNIRET_BUILD_CUDA=1 forces it)")
    if not _ext.has_kernel(f"{op}_fwd", "CUDA"):
        return f"omniret::{op}_fwd has no CUDA kernel in this build"
    archs = _ext.cuda_built_archs()
    capability = _capability(device)
    if not _ext.arch_runs_on(archs, capability):
        return (f"omniret_kernels._C_cuda holds code for {', '.join(archs)}, none of which runs on compute "
                f"capability {capability[0]}.{capability[1]} (rebuild with TORCH_CUDA_ARCH_LIST including it)")
    return None


def _why_not_triton(op, device, dtype, sizes):
    if not _ext.triton_importable():
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not _ext.triton_interpreting():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels need CUDA tensors, got tensors on {device}"
    module = _triton_module(op)
    if module is None:
        return f"{op} has no Triton kernel"
    if device.type == "cuda" and _capability(device) < TRITON_MIN_CAPABILITY:
        return "the Triton kernels need compute capability 8.0 or newer (sm_80+)"
    # The kernels' documented limits (module constants: MAX_N of diversity_loss, MAX_HEAD_DIM of
    # resampler_attention), or a function of the module saying why a shape does not fit.
    for constant, size in (("MAX_N", "N"), ("MAX_HEAD_DIM", "d")):
        limit = getattr(module, constant, None)
        if limit is not None and sizes.get(size, 0) > limit:
            return f"the Triton {op} supports {size} <= {limit}, got {size} = {sizes[size]}"
    unsupported = getattr(module, "unsupported_reason", None)
    if callable(unsupported) and sizes:
        return unsupported(device=device, dtype=dtype, **sizes)
    return None


def _why_not_flash(backend, op, device, dtype, sizes):
    if op != "resampler_attention":
        return f"backend {backend!r} serves resampler_attention only"
    if backend == "varlen_attn" and not has_varlen_attn():
        return "this torch has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)"
    if backend == "flash_attn" and not has_flash_attn():
        return "flash-attn is not installed (pip install flash-attn)"
    if device.type != "cuda":
        return f"backend {backend!r} needs CUDA tensors, got tensors on {device}"
    if dtype not in FLASH_DTYPES:
        return f"backend {backend!r} needs float16 or bfloat16, got {str(dtype).replace('torch.', '')}"
    d = sizes.get("d")
    if d is not None and (d % 8 != 0 or d > FLASH_MAX_HEAD_DIM):
        return f"backend {backend!r} needs a head dim that is a multiple of 8 and <= {FLASH_MAX_HEAD_DIM}, got {d}"
    if _capability(device) < FLASH_MIN_CAPABILITY:
        return f"backend {backend!r} needs compute capability 8.0 or newer (sm_80+)"
    return None


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
            **sizes: int) -> Optional[str]:
    """None when `backend` can run `op` on tensors of `dtype` and `sizes` on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return _why_not_cpu(op, device, dtype, sizes)
    if backend == "cuda":
        return _why_not_cuda(op, device, dtype, sizes)
    if backend == "triton":
        return _why_not_triton(op, device, dtype, sizes)
    if backend in FLASH_BACKENDS:
        return _why_not_flash(backend, op, device, dtype, sizes)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


@torch.compiler.assume_constant_result
def _plan(op: str, device_type: str, device_index: int, dtype: torch.dtype, backend: Optional[str],
          sizes: tuple) -> tuple:
    """Evaluated once at trace time under torch.compile (it asks the dispatcher which kernels exist and the
    device what it is, which Dynamo cannot trace): the plan is a constant of the compiled graph."""
    device = torch.device(device_type) if device_index < 0 else torch.device(device_type, device_index)
    sizes = dict(sizes)
    if backend is not None:
        reason = why_not(op, backend, device, dtype, **sizes)
        if reason is not None:
            raise ValueError(f"{op}: backend {backend!r} is unavailable: {reason}")
        return (backend,)
    reasons, runnable = [], []
    for name in CANDIDATES[op].get(device.type, ()):
        reason = why_not(op, name, device, dtype, **sizes)
        if reason is None:
            runnable.append(name)
        else:
            reasons.append(f"{name}: {reason}")
    if not runnable and op not in _WARNED:
        _WARNED.add(op)
        detail = "; ".join(reasons) if reasons else f"no kernel runs on {device.type} tensors"
        warnings.warn(f"{op}: no fast backend can run here ({detail}); using the slow plain-PyTorch reference",
                      RuntimeWarning, stacklevel=4)
    return tuple(runnable) + ("reference",)


def plan(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
         **sizes: int) -> tuple:
    """The backends to try for `op` on these tensors, in order (see the module docstring). `sizes` are the shape
    numbers the gates look at (d, N, ...); they matter on CUDA only, so on CPU they are dropped (and a CPU plan
    does not depend on the shape, which keeps it one constant under torch.compile with dynamic shapes)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    shape_key = tuple(sorted((k, int(v)) for k, v in sizes.items())) if device.type == "cuda" else ()
    plan_ = _plan(op, device.type, -1 if device.index is None else device.index, dtype, backend, shape_key)
    if not _FAILED or torch.compiler.is_compiling():
        return plan_
    return tuple(b for b in plan_ if b == plan_[-1] or (op, b, device.type, dtype, shape_key) not in _FAILED)


def run(op: str, backends: tuple, call: Callable[[str], object], *, device: torch.device, dtype: torch.dtype,
        **sizes: int):
    """call(backend) for the first backend of `backends` (from `plan`); a launch failure hands over to the next
    with one warning (see the module docstring). Input errors (ValueError) are raised as they are."""
    if len(backends) == 1 or torch.compiler.is_compiling():
        return call(backends[0])
    shape_key = tuple(sorted((k, int(v)) for k, v in sizes.items())) if device.type == "cuda" else ()
    for i, backend in enumerate(backends):
        last = i == len(backends) - 1
        try:
            return call(backend)
        except KernelLimitError as exc:
            if last:
                raise
            failure = exc
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any launch failure (no kernel image, OutOfResources, ...)
            if last:
                raise
            failure = exc
        _FAILED.add((op, backend, device.type, dtype, shape_key))
        warnings.warn(f"{op}: backend {backend!r} failed on {device} {str(dtype).replace('torch.', '')} "
                      f"({type(failure).__name__}: {failure}); using {backends[i + 1]!r} from now on for this "
                      "dtype and shape", RuntimeWarning, stacklevel=3)
    raise AssertionError("unreachable")


def forget_failures() -> None:
    """Lets failed backends be tried again (tests; a user after fixing the installation in one process)."""
    _FAILED.clear()


def resolve_backend(op: str, device: torch.device, backend: Optional[str] = None,
                    dtype: torch.dtype = torch.float32, **sizes: int) -> str:
    """The backend `plan` would try first."""
    return plan(op, device, dtype, backend, **sizes)[0]


_WARNED: set = set()
_FAILED: set = set()
