"""The executable spec: plain-PyTorch references of every op and loss (SPEC.md sections 1-4).

Every fast path is tested against these functions. They favour clarity over speed and memory, compute in
the input's dtype (use float64 in tests), and differentiate through ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "aswp_pool",
    "aswp_project",
    "quantile_positions",
    "reference_ranks",
    "resampler_attention",
    "diversity_loss",
    "smooth_l1",
    "cosine_logits",
    "hn_infonce_loss",
    "triplet_loss",
]

POOLINGS = ("stm", "max", "mean", "weighted")


# ----------------------------------------------------------------------------------------------------------
# 1. ASWP
# ----------------------------------------------------------------------------------------------------------
def aswp_project(x: torch.Tensor, directions: torch.Tensor, normalize_directions: bool = True) -> torch.Tensor:
    """p[b, n, l] = <x[b, n], theta_l> with theta_l = directions[l] / ||directions[l]||."""
    theta = directions / directions.norm(dim=1, keepdim=True) if normalize_directions else directions
    return x @ theta.t()


def reference_ranks(references: torch.Tensor) -> torch.Tensor:
    """r_l(j): rank of references[j, l] in its column, ascending, ties broken by index. (M, L) int64."""
    order = torch.sort(references.detach(), dim=0, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(references.shape[0], device=references.device).unsqueeze(1).expand_as(order)
    ranks.scatter_(0, order, positions)
    return ranks


def quantile_positions(ranks: torch.Tensor, n: int, m: int):
    """Step 5: t = (r + 0.5) * n / M - 0.5 clamped to [0, n - 1] -> (lower index, upper index, weight w)."""
    t = ((ranks.to(torch.float64) + 0.5) * n / m - 0.5).clamp(0, n - 1)
    lo = t.floor()
    w = t - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n - 1)
    return lo, hi, w


def _stm_pool(psi: torch.Tensor, temperature: float) -> torch.Tensor:
    """Straight-through maximum over dim -2 of psi (..., M, L), Eq. 8-9."""
    y = torch.softmax(psi / temperature, dim=-2)
    idx = psi.argmax(dim=-2, keepdim=True)  # first index on ties
    hard = torch.zeros_like(psi).scatter_(-2, idx, 1.0)
    return (psi * (hard - y.detach() + y)).sum(dim=-2)


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
) -> torch.Tensor:
    """Attention Sliced Wasserstein Pooling, SPEC section 1. (B, N, D) -> (B, L)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "weighted" and weights is None:
        raise ValueError("pooling='weighted' needs weights of shape (M, L)")
    B, N, _ = x.shape
    M, L = references.shape
    proj = aswp_project(x, directions, normalize_directions)  # (B, N, L)
    ranks = reference_ranks(references)  # (M, L)
    rows = []
    for b in range(B):
        p = proj[b] if mask is None else proj[b][mask[b]]
        n = p.shape[0]
        if n == 0:
            raise ValueError(f"mask: sample {b} has no valid token")
        s = torch.sort(p, dim=0).values  # (n, L); its permutation carries no gradient of its own
        lo, hi, w = quantile_positions(ranks, n, M)  # (M, L) each
        w = w.to(s.dtype)
        matched = s.gather(0, lo) * (1 - w) + s.gather(0, hi) * w
        psi = matched - references  # (M, L)
        if pooling == "stm":
            rows.append(_stm_pool(psi, temperature))
        elif pooling == "max":
            rows.append(psi.max(dim=0).values)
        elif pooling == "mean":
            rows.append(psi.mean(dim=0))
        else:
            rows.append((weights * psi).sum(dim=0))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------
# 2. Resampler cross-attention over packed keys
# ----------------------------------------------------------------------------------------------------------
def resampler_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """SPEC section 2: q (B, H, Nq, d), k/v (T, Hk, d) packed, cu_seqlens (B + 1,) -> (B, H, Nq, d)."""
    B, H, _, d = q.shape
    Hk = k.shape[1]
    if H % Hk != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hk})")
    scale = d ** -0.5 if scale is None else scale
    group = H // Hk
    bounds = cu_seqlens.tolist()
    outs = []
    for b in range(B):
        start, end = bounds[b], bounds[b + 1]
        if end <= start:
            raise ValueError(f"cu_seqlens: sample {b} has no keys")
        kb = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)  # (H, T_b, d)
        vb = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        attn = torch.softmax(q[b] @ kb.transpose(1, 2) * scale, dim=-1)  # (H, Nq, T_b)
        outs.append(attn @ vb)
    return torch.stack(outs)


# ----------------------------------------------------------------------------------------------------------
# 3. Diversity loss (Eq. 5-6)
# ----------------------------------------------------------------------------------------------------------
def smooth_l1(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """0.5 x^2 / gamma if |x| < gamma else |x| - 0.5 gamma."""
    ax = x.abs()
    return torch.where(ax < gamma, 0.5 * x * x / gamma, ax - 0.5 * gamma)


def diversity_loss(
    m: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
    *,
    p: float = 0.9,
    gamma: float = 0.5,
    normalize: bool = True,
) -> torch.Tensor:
    """SPEC section 3 with an explicit keep mask (B, N, N) bool. keep=None means no dropout (p is ignored)."""
    B, N, _ = m.shape
    u = F.normalize(m, dim=-1, eps=0.0) if normalize else m
    a = torch.relu(u @ u.transpose(1, 2)) - torch.eye(N, dtype=m.dtype, device=m.device)
    if keep is not None:
        a = a * keep.to(a.dtype) / (1.0 - p)
    return smooth_l1(a, gamma).sum(dim=(1, 2)).mean() / (N * N)


# ----------------------------------------------------------------------------------------------------------
# 4. Contrastive and triplet losses (Eq. 2-4)
# ----------------------------------------------------------------------------------------------------------
def cosine_logits(q: torch.Tensor, c: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """phi[i, j] = cos(q_i, c_j) / tau."""
    return F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).t() / tau


def _negatives(phi: torch.Tensor, positives: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool (Q, C): True where candidate j is a negative of query i. Query i's positive is candidate i;
    `positives` (Q, C) bool marks further relevant candidates, which are masked out of the negatives."""
    Q, C = phi.shape
    is_pos = torch.zeros(Q, C, dtype=torch.bool, device=phi.device)
    is_pos[torch.arange(Q), torch.arange(Q)] = True
    if positives is not None:
        is_pos |= positives
    return ~is_pos


def hn_infonce_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: float = 0.07,
    beta: float = 0.5,
    detach_weights: bool = True,
    positives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hard-negative weighted InfoNCE, written literally from Eq. 2-3 (exp, no log-sum-exp tricks)."""
    phi = cosine_logits(q, c, tau)
    neg = _negatives(phi, positives)
    losses = []
    for i in range(q.shape[0]):
        phi_neg = phi[i][neg[i]]
        w = phi_neg.numel() * torch.softmax(beta * phi_neg, dim=0)
        if detach_weights:
            w = w.detach()
        pos = torch.exp(phi[i, i])
        losses.append(-torch.log(pos / (pos + (w * torch.exp(phi_neg)).sum())))
    return torch.stack(losses).mean()


def triplet_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: float = 0.07,
    margin: float = 0.1,
    positives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """loss_i = sum_{j in N_i} max(0, margin + phi_ij - phi_ii), mean over queries (Eq. 4)."""
    phi = cosine_logits(q, c, tau)
    neg = _negatives(phi, positives)
    diag = phi.diagonal()[:, None]
    hinge = torch.relu(margin + phi - diag) * neg
    return hinge.sum(dim=1).mean()
