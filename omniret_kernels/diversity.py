"""diversity_loss: the dropout-masked diversity loss of Eq. 5-6 (SPEC section 3)."""
from __future__ import annotations

from typing import Optional

import torch

from omniret_kernels import reference
from omniret_kernels._checks import FLOAT_DTYPES, check_tensor
from omniret_kernels._dispatch import resolve_backend

__all__ = ["diversity_loss"]


def diversity_loss(m, *, p: float = 0.9, gamma: float = 0.5, normalize: bool = True,
                   generator: Optional[torch.Generator] = None, return_keep_mask: bool = False,
                   backend: Optional[str] = None):
    """m (B, N, D) -> scalar. Interim: the keep mask is drawn with torch.rand; issue 5 brings the
    counter-based generator shared by every backend."""
    check_tensor("m", m, ndim=3, dtypes=FLOAT_DTYPES)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    backend = resolve_backend("diversity_loss", m.device, backend)
    if backend != "reference":
        raise NotImplementedError(f"diversity_loss backend {backend!r}")  # replaced by issue 5
    B, N, _ = m.shape
    keep = torch.rand(B, N, N, generator=generator, device=m.device) >= p if p > 0 else None
    loss = reference.diversity_loss(m.float(), keep, p=p, gamma=gamma, normalize=normalize).to(m.dtype)
    if return_keep_mask:
        return loss, (keep if keep is not None else torch.ones(B, N, N, dtype=torch.bool, device=m.device))
    return loss
