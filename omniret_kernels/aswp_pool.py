"""aswp_pool: Attention Sliced Wasserstein Pooling (SPEC section 1), and the ASWPPool module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from omniret_kernels import reference
from omniret_kernels._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor, is_compiling
from omniret_kernels._dispatch import plan, run
from omniret_kernels._op import define_pair, needs_backward, reference_dtype

__all__ = ["aswp_pool", "ASWPPool"]


def _check_args(x, directions, references, mask, pooling, weights, temperature, check_finite_values):
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, D = x.shape
    check_tensor("directions", directions, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, D))
    L = directions.shape[0]
    check_tensor("references", references, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, L))
    if pooling not in reference.POOLINGS:
        raise ValueError(f"pooling must be one of {reference.POOLINGS}, got {pooling!r}")
    if pooling == "weighted":
        if weights is None:
            raise ValueError("weights: pooling='weighted' needs weights of shape (M, L)")
        check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, shape=tuple(references.shape))
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if B == 0 or N == 0 or L == 0 or references.shape[0] == 0:
        raise ValueError(f"x, directions and references must be non-empty, got x {tuple(x.shape)}, "
                         f"directions {tuple(directions.shape)}, references {tuple(references.shape)}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), shape=(B, N))
        if not is_compiling() and not bool(mask.any(dim=1).all()):
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"mask: samples {empty} have no valid token")
    device = check_same_device(x=x, directions=directions, references=references, mask=mask, weights=weights)
    if check_finite_values:
        for name, t in (("x", x), ("directions", directions), ("references", references), ("weights", weights)):
            if t is not None:
                check_finite(name, t)
    return device



# ----------------------------------------------------------------------------------------------------------
# omniret::aswp_pool_fwd / _bwd (schemas in csrc/ops.cpp, CPU kernel csrc/cpu/aswp_pool.cpp, CUDA kernel
# csrc/cuda/aswp_pool.cu) and the Triton pair omniret::aswp_pool_triton_fwd / _bwd, registered by _op.define_pair
# with one fake kernel per direction and one backward formula.
# ----------------------------------------------------------------------------------------------------------
FWD_SCHEMA = ("(Tensor x, Tensor directions, Tensor references, Tensor? mask, Tensor? weights, str pooling, "
              "bool normalize_directions, float temperature, bool save_for_backward=True) -> (Tensor, Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor directions, Tensor references, Tensor? mask, Tensor? weights, "
              "Tensor sorted, Tensor sorted_tokens, str pooling, bool normalize_directions, float temperature, "
              "bool need_x, bool need_directions) -> (Tensor, Tensor, Tensor, Tensor)")


def _saved_dtypes(x: torch.Tensor, n: int):
    """(compute dtype of the saved sorted values, dtype of the saved permutation)."""
    return reference_dtype(x.dtype), (torch.uint8 if n <= 256 else torch.int32)


def _fwd_fake(x, directions, references, mask, weights, pooling, normalize_directions, temperature,
              save_for_backward=True):
    B, N, _ = x.shape
    L = directions.shape[0]
    compute, index = _saved_dtypes(x, N)
    saved = (B, N, L) if save_for_backward else (0,)
    return (x.new_empty((B, L)), x.new_empty(saved, dtype=compute), x.new_empty(saved, dtype=index))


def _bwd_fake(grad_out, x, directions, references, mask, weights, sorted_values, sorted_tokens, pooling,
              normalize_directions, temperature, need_x, need_directions):
    return (
        x.new_empty(x.shape if need_x else (0,)),
        directions.new_empty(directions.shape if need_directions else (0,)),
        references.new_empty(references.shape),
        (weights.new_empty(weights.shape) if pooling == "weighted" and weights is not None
         else references.new_empty((0,))),
    )


def _setup_context(ctx, inputs, output):
    x, directions, references, mask, weights, pooling, normalize_directions, temperature, *rest = inputs
    save_for_backward = rest[0] if rest else True
    _, sorted_values, sorted_tokens = output
    ctx.mark_non_differentiable(sorted_values, sorted_tokens)
    # The saved outputs get no gradient; without this autograd materialises zero gradients for them (20 MiB per
    # 8 samples at the paper shape), which made the op's peak memory grow faster than eager's with the batch.
    ctx.set_materialize_grads(False)
    if save_for_backward:
        ctx.save_for_backward(x, directions, references, mask, weights, sorted_values, sorted_tokens)
    ctx.saved_for_backward = save_for_backward
    ctx.attrs = (pooling, normalize_directions, temperature)


def _backward(ctx, bwd_op, grad_out, _grad_sorted, _grad_sorted_tokens):
    if not ctx.saved_for_backward:
        raise RuntimeError(
            "aswp_pool: backward reached through a forward run with save_for_backward=False, which kept nothing "
            "for backward; aswp_pool() saves when grad is enabled and x, directions, references or weights "
            "requires grad (call the op with save_for_backward=True to differentiate it)")
    if grad_out is None:  # no gradient reached the pooled output (grads are not materialised)
        return (None,) * 9
    x, directions, references, mask, weights, sorted_values, sorted_tokens = ctx.saved_tensors
    pooling, normalize_directions, temperature = ctx.attrs
    need_x, need_directions = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gd, gr, gw = bwd_op(grad_out.contiguous(), x, directions, references, mask, weights, sorted_values,
                            sorted_tokens, pooling, normalize_directions, temperature, need_x, need_directions)
    return (gx if need_x else None, gd if need_directions else None,
            gr if ctx.needs_input_grad[2] else None, None,
            gw if pooling == "weighted" and ctx.needs_input_grad[4] else None, None, None, None, None)


def _triton_fwd(*args):
    from omniret_kernels.triton.aswp_pool import aswp_pool_forward
    return aswp_pool_forward(*args)


def _triton_bwd(*args):
    from omniret_kernels.triton.aswp_pool import aswp_pool_backward
    return aswp_pool_backward(*args)


OPS = define_pair("aswp_pool", fwd_schema=FWD_SCHEMA, bwd_schema=BWD_SCHEMA, fwd_fake=_fwd_fake,
                  bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward, triton_fwd=_triton_fwd,
                  triton_bwd=_triton_bwd)


def _needs_backward(*inputs: Optional[torch.Tensor]) -> bool:
    """Whether autograd will record the op; only then does the forward write the (B, N, L) tensors backward needs.
    Under torch.compile this runs at trace time (both conditions are guarded), so each compiled graph has it as a
    constant."""
    return needs_backward(*inputs)


def aswp_pool(
    x: torch.Tensor,
    directions: torch.Tensor,
    references: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    pooling: str = "stm",
    weights: Optional[torch.Tensor] = None,
    normalize_directions: bool = True,
    temperature: float = 1.0,
    check_finite: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """(B, N, D) tokens -> (B, L) embedding. See SPEC section 1; mask (B, N) bool, True = valid token."""
    device = _check_args(x, directions, references, mask, pooling, weights, temperature, check_finite)
    B, N, D = x.shape
    L, M = directions.shape[0], references.shape[0]
    sizes = dict(B=B, N=N, D=D, L=L, M=M)
    backends = plan("aswp_pool", device, x.dtype, backend, **sizes)
    if pooling != "weighted":
        weights = None
    save = _needs_backward(x, directions, references, weights)

    def call(chosen: str) -> torch.Tensor:
        if chosen == "reference":
            compute = reference_dtype(x.dtype)
            out = reference.aswp_pool(
                x.to(compute), directions.to(compute), references.to(compute), mask, pooling=pooling,
                weights=None if weights is None else weights.to(compute),
                normalize_directions=normalize_directions, temperature=temperature)
            return out.to(x.dtype)
        return OPS.fwd.get(chosen)(x, directions, references, mask, weights, pooling, normalize_directions,
                                   float(temperature), save)[0]

    return run("aswp_pool", backends, call, device=device, dtype=x.dtype, **sizes)


class ASWPPool(nn.Module):
    """Learnable directions (L, D) ~ randn and references (M, L) = linspace(-1, 1, M) in every column."""

    def __init__(self, dim: int, num_slices: int = 4096, num_references: int = 128, pooling: str = "stm",
                 temperature: float = 1.0, normalize_directions: bool = True, backend: Optional[str] = None):
        super().__init__()
        if pooling not in reference.POOLINGS:
            raise ValueError(f"pooling must be one of {reference.POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.temperature = temperature
        self.normalize_directions = normalize_directions
        self.backend = backend
        self.directions = nn.Parameter(torch.randn(num_slices, dim))
        self.references = nn.Parameter(
            torch.linspace(-1.0, 1.0, num_references).unsqueeze(1).repeat(1, num_slices).contiguous()
        )
        self.weights = (
            nn.Parameter(torch.full((num_references, num_slices), 1.0 / num_references))
            if pooling == "weighted" else None
        )

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return aswp_pool(x, self.directions, self.references, mask, pooling=self.pooling, weights=self.weights,
                         normalize_directions=self.normalize_directions, temperature=self.temperature,
                         backend=self.backend)

    def extra_repr(self) -> str:
        L, D = self.directions.shape
        return f"dim={D}, num_slices={L}, num_references={self.references.shape[0]}, pooling={self.pooling!r}"
