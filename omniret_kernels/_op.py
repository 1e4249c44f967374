"""How every op registers its kernels with torch.library, in one place.

An op's kernels come in two variants with one schema:
- "native": the dispatcher op omniret::<name> defined by the C++ library (csrc/ops.cpp), with a CPU kernel and,
  when _C_cuda is built, a CUDA kernel;
- "triton": a Python custom op omniret::<triton name> with the same schema, calling a Triton launcher (imported
  when first called: TRITON_INTERPRET must be set before triton is imported).
`define` gives both the same fake kernel and, for a forward, the same autograd formula, whose backward calls the
backward op of the same variant. Each op file calls `define_pair` once for its forward/backward pair.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from omniret_kernels import _ext


class Variants(NamedTuple):
    """The native and Triton ops of one schema (None where absent: no C++ library built)."""
    native: Optional[object]
    triton: Optional[object]

    def get(self, backend: str):
        """The op for `backend`: "triton" -> the Triton custom op; "cpu"/"cuda" -> the dispatcher op (which picks
        the CPU or CUDA kernel from the tensors' device)."""
        op = self.triton if backend == "triton" else self.native
        if op is None:
            raise RuntimeError(f"no {backend} variant of this op is registered")
        return op


def native_op(name: str):
    """torch.ops.omniret.<name> when the C++ library defines it, else None."""
    if not _ext.cpu_extension_built() or not hasattr(torch.ops.omniret, name):
        return None
    return getattr(torch.ops.omniret, name)


def schema_of(op) -> str:
    """The schema of a registered op without its name, "(Tensor x, ...) -> Tensor", to compare with ours."""
    text = str(op.default._schema)
    return text[text.index("("):]


def define(name: str, schema: str, fake: Callable, *, triton_name: Optional[str] = None,
           triton_impl: Optional[Callable] = None,
           autograd: Optional[Callable[[str], tuple[Callable, Callable]]] = None) -> Variants:
    """Registers the fake kernel (and autograd) of omniret::<name> when the C++ library defines it, and the Triton
    custom op omniret::<triton_name> = triton_impl with `schema`, the same fake and the same autograd.

    autograd(variant) -> (setup_context, backward) for variant "native" / "triton"."""
    native = native_op(name)
    if native is not None:
        torch.library.register_fake(f"omniret::{name}")(fake)
        if autograd is not None:
            setup_context, backward = autograd("native")
            torch.library.register_autograd(f"omniret::{name}", backward, setup_context=setup_context)
    triton = None
    if triton_impl is not None:
        custom = torch.library.custom_op(f"omniret::{triton_name}", triton_impl, mutates_args=(), schema=schema)
        custom.register_fake(fake)
        if autograd is not None:
            setup_context, backward = autograd("triton")
            custom.register_autograd(backward, setup_context=setup_context)
        triton = getattr(torch.ops.omniret, triton_name)
    return Variants(native, triton)


class OpPair(NamedTuple):
    fwd: Variants
    bwd: Variants


def define_pair(stem: str, *, fwd_schema: str, bwd_schema: str, fwd_fake: Callable, bwd_fake: Callable,
                setup_context: Callable, backward: Callable, triton_fwd: Callable, triton_bwd: Callable) -> OpPair:
    """omniret::<stem>_fwd / _bwd (C++) and omniret::<stem>_triton_fwd / _triton_bwd (Triton) with one fake kernel
    per direction and one autograd formula: backward(ctx, bwd_op, *grad_outputs) -> grads of the forward's
    inputs, where bwd_op is the backward op of the forward's own variant."""
    bwd = define(f"{stem}_bwd", bwd_schema, bwd_fake, triton_name=f"{stem}_triton_bwd", triton_impl=triton_bwd)

    def autograd(variant: str):
        bwd_op = bwd.native if variant == "native" else bwd.triton

        def backward_of_variant(ctx, *grads):
            return backward(ctx, bwd_op, *grads)

        return setup_context, backward_of_variant

    fwd = define(f"{stem}_fwd", fwd_schema, fwd_fake, triton_name=f"{stem}_triton_fwd", triton_impl=triton_fwd,
                 autograd=autograd)
    return OpPair(fwd, bwd)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the plain-PyTorch reference computes in when it runs as a backend: float64 stays float64, every
    other float widens to float32 (the kernels' accumulation type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_backward(*inputs: Optional[torch.Tensor]) -> bool:
    """Whether autograd will record the op: grad mode on and a differentiable input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
