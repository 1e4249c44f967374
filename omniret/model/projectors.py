"""Projector per media encoder into the LLM width (LLaVA's `mlp2x_gelu` by default, or one linear layer)."""
from __future__ import annotations

from torch import nn

__all__ = ["build_projector"]


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projector must be 'mlp2x_gelu' or 'linear', got {kind!r}")
