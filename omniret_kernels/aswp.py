"""aswp_pool: Attention Sliced Wasserstein Pooling (SPEC section 1), and the ASWPPool module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from omniret_kernels import reference
from omniret_kernels._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor, is_compiling
from omniret_kernels._dispatch import resolve_backend

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
    backend = resolve_backend("aswp_pool", device, backend)
    if backend == "reference":
        out = reference.aswp_pool(
            x.float(), directions.float(), references.float(), mask, pooling=pooling,
            weights=None if weights is None else weights.float(),
            normalize_directions=normalize_directions, temperature=temperature,
        )
        return out.to(x.dtype)
    raise NotImplementedError(f"aswp_pool backend {backend!r}")  # replaced by the fused kernels (issue 3)


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
