"""Training losses of OmniRet (SPEC section 4, paper Eq. 2-4 and 10).

`hn_infonce_loss` and `triplet_loss` score every query against every candidate of the (global) batch:
query i's positive is candidate i, candidates after the first Q are extra hard negatives, and a `positives`
mask (Q, C) removes further relevant candidates from the negatives.

Both run through one chunked kernel (`_PairLosses`, an autograd Function): similarities are computed in
(row block x column block) tiles with a running log-sum-exp, and the backward recomputes the tiles, so memory
is O(Q + C) plus one tile instead of O(Q * C). Only the optional dense `positives` mask is Q x C (bool).

The contrastive loss in log space, with phi = cos / tau and N_i the negatives of query i:
    log S_i = log |N_i| + LSE_j(phi_ij + beta * sg(phi_ij)) - sg(LSE_j(beta * phi_ij))
    loss_i  = softplus(log S_i - phi_ii)
which equals Eq. 2-3 with the weights w_ij = |N_i| softmax(beta phi_i.)_j detached (the default); with
`detach_weights=False` the stop-gradients are dropped.

`total_loss(..., symmetric=True)` is CLIP's symmetric InfoNCE: the query->candidate loss above averaged with the
candidate->query loss over the positive block (candidate j < Q against the Q queries, query j its positive,
the transposed `positives` block masking further relevant queries). Extra hard negatives (candidates beyond the
first Q) have no query of their own, so they enter the query->candidate side only.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "hn_infonce_loss",
    "triplet_loss",
    "pair_losses",
    "candidate_query_losses",
    "total_loss",
    "LossTerms",
    "LearnableTemperature",
]

TauLike = Union[float, torch.Tensor]
DEFAULT_CHUNK = 1024


class LossTerms(NamedTuple):
    total: torch.Tensor
    contrastive: torch.Tensor
    triplet: torch.Tensor
    diversity: torch.Tensor


class LearnableTemperature(nn.Module):
    """A learnable logit scale 1 / tau (stored as its log, clamped as CLIP does). Off by default in training;
    U-MARVEL found a learnable temperature helps. `forward()` returns tau as a tensor with autograd."""

    def __init__(self, tau: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(self.max_scale)).exp()


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(q: torch.Tensor, c: torch.Tensor, positives: Optional[torch.Tensor], tau: TauLike) -> None:
    for name, t in (("q", q), ("c", c)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (n, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if q.shape[0] == 0:
        raise ValueError("q: empty batch (no queries)")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"q and c must have the same feature size, got {q.shape[1]} and {c.shape[1]}")
    if c.shape[0] < q.shape[0]:
        raise ValueError(f"c must hold at least one candidate per query (the positives first), "
                         f"got {c.shape[0]} candidates for {q.shape[0]} queries")
    if q.device != c.device:
        raise ValueError(f"q and c must be on one device, got {q.device} and {c.device}")
    if not torch.compiler.is_compiling():
        if not bool(torch.isfinite(q).all()):
            raise ValueError("q contains NaN or Inf")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("c contains NaN or Inf")
    if positives is not None:
        if not isinstance(positives, torch.Tensor) or positives.dtype != torch.bool:
            raise ValueError("positives must be a bool tensor of shape (Q, C)")
        if tuple(positives.shape) != (q.shape[0], c.shape[0]):
            raise ValueError(f"positives must have shape ({q.shape[0]}, {c.shape[0]}), got {tuple(positives.shape)}")
    t = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
    if not t > 0 or not math.isfinite(t):
        raise ValueError(f"tau must be a finite number > 0, got {t}")


# ----------------------------------------------------------------------------------------------------------
# the chunked kernel
# ----------------------------------------------------------------------------------------------------------
def _negative_tile(r0: int, r1: int, c0: int, c1: int, positives: Optional[torch.Tensor], device) -> torch.Tensor:
    """Bool (r1 - r0, c1 - c0): True where candidate j is a negative of query i."""
    rows = torch.arange(r0, r1, device=device)[:, None]
    cols = torch.arange(c0, c1, device=device)[None, :]
    neg = rows != cols
    if positives is not None:
        neg &= ~positives[r0:r1, c0:c1]
    return neg


class _PairLosses(torch.autograd.Function):
    """Per-query contrastive and triplet losses on L2-normalised qn (Q, D), cn (C, D) and a logit scale s."""

    @staticmethod
    def forward(ctx, qn, cn, scale, positives, beta, margin, detach_weights, want_cont, want_trip, chunk):
        Q, C = qn.shape[0], cn.shape[0]
        s = scale.to(qn.dtype)
        pos = s * (qn * cn[:Q]).sum(dim=1)  # phi_ii
        neg_inf = torch.full((Q,), -math.inf, dtype=qn.dtype, device=qn.device)
        lse_a, lse_b = neg_inf.clone(), neg_inf.clone()  # LSE (1 + beta) phi, LSE beta phi over negatives
        count = torch.zeros(Q, dtype=qn.dtype, device=qn.device)
        hinge = torch.zeros(Q, dtype=qn.dtype, device=qn.device)
        for r0 in range(0, Q, chunk):
            r1 = min(Q, r0 + chunk)
            for c0 in range(0, C, chunk):
                c1 = min(C, c0 + chunk)
                phi = s * (qn[r0:r1] @ cn[c0:c1].t())
                neg = _negative_tile(r0, r1, c0, c1, positives, qn.device)
                count[r0:r1] += neg.sum(dim=1).to(qn.dtype)
                if want_cont:
                    lse_a[r0:r1] = torch.logaddexp(
                        lse_a[r0:r1], torch.logsumexp(((1 + beta) * phi).masked_fill(~neg, -math.inf), dim=1))
                    lse_b[r0:r1] = torch.logaddexp(
                        lse_b[r0:r1], torch.logsumexp((beta * phi).masked_fill(~neg, -math.inf), dim=1))
                if want_trip:
                    hinge[r0:r1] += (torch.relu(margin + phi - pos[r0:r1, None]) * neg).sum(dim=1)
        has_neg = count > 0
        safe_count = torch.where(has_neg, count, torch.ones_like(count))
        if want_cont:
            log_s = torch.where(has_neg, safe_count.log() + lse_a - lse_b, neg_inf)
            cont = F.softplus(log_s - pos)
        else:
            log_s, cont = neg_inf, torch.zeros_like(pos)
        ctx.save_for_backward(qn, cn, scale, pos, lse_a, lse_b, log_s, positives)
        ctx.cfg = (beta, margin, detach_weights, want_cont, want_trip, chunk)
        return cont, hinge

    @staticmethod
    def backward(ctx, g_cont, g_trip):
        qn, cn, scale, pos, lse_a, lse_b, log_s, positives = ctx.saved_tensors
        beta, margin, detach_weights, want_cont, want_trip, chunk = ctx.cfg
        Q, C = qn.shape[0], cn.shape[0]
        s = scale.to(qn.dtype)
        g_cont = torch.zeros_like(pos) if g_cont is None or not want_cont else g_cont.to(qn.dtype)
        g_trip = torch.zeros_like(pos) if g_trip is None or not want_trip else g_trip.to(qn.dtype)
        # d cont_i / d log S_i = sigmoid(log S_i - phi_ii) (0 when there is no negative)
        r = g_cont * torch.sigmoid(log_s - pos)
        g_pos = -r  # d / d phi_ii of the contrastive part; the triplet part is added per tile
        dq = torch.zeros_like(qn)
        dc = torch.zeros_like(cn)
        d_scale = torch.zeros((), dtype=qn.dtype, device=qn.device)
        for r0 in range(0, Q, chunk):
            r1 = min(Q, r0 + chunk)
            for c0 in range(0, C, chunk):
                c1 = min(C, c0 + chunk)
                phi = s * (qn[r0:r1] @ cn[c0:c1].t())
                neg = _negative_tile(r0, r1, c0, c1, positives, qn.device)
                negf = neg.to(qn.dtype)
                zero = torch.zeros((), dtype=qn.dtype, device=qn.device)
                grad = torch.zeros_like(phi)  # dL / d phi on this tile (off the positive diagonal)
                if want_cont:
                    # where, not multiply: off the negatives the exponent may overflow
                    soft_a = torch.where(neg, torch.exp((1 + beta) * phi - lse_a[r0:r1, None]), zero)
                    if detach_weights:
                        dlog_s = soft_a
                    else:
                        soft_b = torch.where(neg, torch.exp(beta * phi - lse_b[r0:r1, None]), zero)
                        dlog_s = (1 + beta) * soft_a - beta * soft_b
                    grad += r[r0:r1, None] * dlog_s
                if want_trip:
                    active = ((margin + phi - pos[r0:r1, None]) > 0).to(qn.dtype) * negf
                    grad += g_trip[r0:r1, None] * active
                    g_pos[r0:r1] -= g_trip[r0:r1] * active.sum(dim=1)
                dq[r0:r1] += s * (grad @ cn[c0:c1])
                dc[c0:c1] += s * (grad.t() @ qn[r0:r1])
                if ctx.needs_input_grad[2]:
                    d_scale += (grad * phi).sum() / s
        # the positive pairs phi_ii = s <qn_i, cn_i>
        dq += s * g_pos[:, None] * cn[:Q]
        dc[:Q] += s * g_pos[:, None] * qn
        if ctx.needs_input_grad[2]:
            d_scale += (g_pos * pos).sum() / s
        d_scale = d_scale.to(scale.dtype) if ctx.needs_input_grad[2] else None
        return dq, dc, d_scale, None, None, None, None, None, None, None


def _scale_of(tau: TauLike, like: torch.Tensor) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return (1.0 / tau).to(device=like.device).reshape(())
    return torch.tensor(1.0 / tau, dtype=like.dtype, device=like.device)


def pair_losses(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: TauLike = 0.07,
    beta: float = 0.5,
    margin: float = 0.1,
    detach_weights: bool = True,
    positives: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    want_contrastive: bool = True,
    want_triplet: bool = True,
):
    """(contrastive, triplet) per query, each (Q,), from one chunked pass. float16/bfloat16 inputs are
    computed in float32; float64 stays float64."""
    _check_inputs(q, c, positives, tau)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    work = torch.promote_types(q.dtype, torch.float32)
    qn = F.normalize(q.to(work), dim=-1)
    cn = F.normalize(c.to(work), dim=-1)
    return _PairLosses.apply(qn, cn, _scale_of(tau, qn), positives, float(beta), float(margin),
                             bool(detach_weights), want_contrastive, want_triplet, int(chunk_size))


def candidate_query_losses(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: TauLike = 0.07,
    beta: float = 0.5,
    detach_weights: bool = True,
    positives: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """The candidate->query contrastive loss per positive candidate, (Q,): candidate j (j < Q) retrieves among
    the Q queries, query j its positive, queries i with positives[i, j] not its negatives. The same kernel as
    the query->candidate side with the roles swapped (beta weights the hardest queries alike)."""
    _check_inputs(q, c, positives, tau)
    n = q.shape[0]
    reverse = positives[:, :n].t() if positives is not None else None
    cont, _ = pair_losses(c[:n], q, tau, beta, 0.0, detach_weights, reverse, chunk_size, True, False)
    return cont


def hn_infonce_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: TauLike = 0.07,
    beta: float = 0.5,
    detach_weights: bool = True,
    positives: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Hard-negative weighted InfoNCE (Eq. 2-3), mean over queries. beta = 0 is plain InfoNCE."""
    cont, _ = pair_losses(q, c, tau, beta, 0.0, detach_weights, positives, chunk_size, True, False)
    return cont.mean()


def triplet_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    tau: TauLike = 0.07,
    margin: float = 0.1,
    positives: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """sum over negatives of max(0, margin + phi_ij - phi_ii), mean over queries (Eq. 4)."""
    _, trip = pair_losses(q, c, tau, 0.0, margin, True, positives, chunk_size, False, True)
    return trip.mean()


def total_loss(
    q: torch.Tensor,
    c: torch.Tensor,
    diversity: Optional[torch.Tensor] = None,
    *,
    tau: TauLike = 0.07,
    beta: float = 0.5,
    margin: float = 0.1,
    mu1: float = 1.0,
    mu2: float = 0.1,
    detach_weights: bool = True,
    positives: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    symmetric: bool = False,
) -> LossTerms:
    """Eq. 10: L = L_cont + mu1 L_triplet + mu2 L_div. `diversity` is the mean diversity loss over the batch's
    media items (None or 0 when there are none). `symmetric`: L_cont is the mean of the query->candidate and
    the candidate->query losses (CLIP's symmetric InfoNCE; see the module docstring); the triplet term stays
    query->candidate."""
    cont, trip = pair_losses(q, c, tau, beta, margin, detach_weights, positives, chunk_size,
                             True, mu1 != 0)
    cont, trip = cont.mean(), trip.mean()
    if symmetric:
        reverse = candidate_query_losses(q, c, tau, beta, detach_weights, positives, chunk_size)
        cont = 0.5 * (cont + reverse.mean())
    if diversity is None:
        diversity = torch.zeros((), dtype=cont.dtype, device=cont.device)
    diversity = diversity.to(cont.dtype)
    return LossTerms(cont + mu1 * trip + mu2 * diversity, cont, trip, diversity)
