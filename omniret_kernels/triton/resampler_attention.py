"""Triton kernels of resampler_attention: varlen, one program per (sample, head), forward and backward.

Forward: the program holds its head's Nq queries, walks the sample's keys cu_seqlens[b] : cu_seqlens[b + 1] in
blocks of BLOCK_N with the online softmax, and writes out and the log-sum-exp. Backward: the same walk recomputes
the probabilities from the log-sum-exp; dq stays in registers, the key block's dk and dv are written to rows the
program owns. When several query heads share a kv head (GQA), each head writes its own dk/dv slice and the
launcher sums the group, so no two programs ever write the same element.

Compute is float32 (float64 for float64 inputs); inputs are converted right after tl.load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _resampler_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, lse_ptr,
    scale, H, Hk, Nq, d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (H // Hk)
    start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q_mask = (rm[:, None] < Nq) & (rd[None, :] < d)
    q_rows = (b * H + h).to(tl.int64) * Nq + rm
    q = tl.load(q_ptr + q_rows[:, None] * d + rd[None, :], mask=q_mask, other=0.0).to(COMPUTE)

    m_i = tl.full((BLOCK_M,), float("-inf"), COMPUTE)
    l_i = tl.zeros((BLOCK_M,), COMPUTE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), COMPUTE)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + rn
        row_ok = rows < end
        kv_offs = (rows[:, None] * Hk + hk) * d + rd[None, :]
        kv_mask = row_ok[:, None] & (rd[None, :] < d)
        kb = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(COMPUTE)
        vb = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(COMPUTE)
        s = tl.dot(q, tl.trans(kb), input_precision="ieee", out_dtype=COMPUTE) * scale
        s = tl.where(row_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee", out_dtype=COMPUTE)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * d + rd[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + q_rows, (m_i + tl.log(l_i)).to(lse_ptr.dtype.element_ty), mask=rm < Nq)


@triton.jit
def _resampler_bwd_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, cu_seqlens_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    scale, H, Hk, Nq, d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    """dk_ptr/dv_ptr are (T, H, d): one slice per query head (the launcher sums each GQA group; with H == Hk
    they are dk and dv themselves)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (H // Hk)
    start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q_mask = (rm[:, None] < Nq) & (rd[None, :] < d)
    q_rows = (b * H + h).to(tl.int64) * Nq + rm
    q_offs = q_rows[:, None] * d + rd[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(COMPUTE)
    do = tl.load(grad_out_ptr + q_offs, mask=q_mask, other=0.0).to(COMPUTE)
    lse = tl.load(lse_ptr + q_rows, mask=rm < Nq, other=0.0).to(COMPUTE)
    delta = tl.load(delta_ptr + q_rows, mask=rm < Nq, other=0.0).to(COMPUTE)

    dq = tl.zeros((BLOCK_M, BLOCK_D), COMPUTE)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + rn
        row_ok = rows < end
        kv_offs = (rows[:, None] * Hk + hk) * d + rd[None, :]
        kv_mask = row_ok[:, None] & (rd[None, :] < d)
        kb = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(COMPUTE)
        vb = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(COMPUTE)
        s = tl.dot(q, tl.trans(kb), input_precision="ieee", out_dtype=COMPUTE) * scale
        # padded query rows (rm >= Nq) have q = do = 0 and lse = 0, so they contribute nothing below
        p = tl.where(row_ok[None, :] & (rm[:, None] < Nq), tl.exp(s - lse[:, None]), 0.0)
        dv_blk = tl.dot(tl.trans(p), do, input_precision="ieee", out_dtype=COMPUTE)
        dp = tl.dot(do, tl.trans(vb), input_precision="ieee", out_dtype=COMPUTE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, kb, input_precision="ieee", out_dtype=COMPUTE) * scale
        dk_blk = tl.dot(tl.trans(ds), q, input_precision="ieee", out_dtype=COMPUTE) * scale
        dkv_offs = (rows[:, None] * H + h) * d + rd[None, :]
        tl.store(dk_ptr + dkv_offs, dk_blk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + dkv_offs, dv_blk.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dq_ptr + q_offs, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


_BLOCK_N = 32


def _blocks(Nq: int, d: int):
    # tl.dot needs every dimension >= 16
    return max(16, triton.next_power_of_2(Nq)), max(16, triton.next_power_of_2(d))


def _compute(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def forward(q, k, v, cu_seqlens, scale: float):
    """(out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) float32 / float64)."""
    q, k, v, cu_seqlens = q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.contiguous()
    B, H, Nq, d = q.shape
    Hk = k.shape[1]
    tl_compute, torch_compute = _compute(q.dtype)
    out = torch.empty_like(q)  # q is contiguous here
    lse = torch.empty(B, H, Nq, dtype=torch_compute, device=q.device)
    if out.numel() == 0:
        return out, lse
    BLOCK_M, BLOCK_D = _blocks(Nq, d)
    _resampler_fwd_kernel[(B, H)](
        q, k, v, cu_seqlens, out, lse, scale, H, Hk, Nq, d,
        BLOCK_M=BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=BLOCK_D, COMPUTE=tl_compute,
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, cu_seqlens, scale: float):
    """(dq, dk, dv) in the inputs' dtypes."""
    grad_out, q, k, v = grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    cu_seqlens, lse = cu_seqlens.contiguous(), lse.contiguous()
    B, H, Nq, d = q.shape
    T, Hk, _ = k.shape
    tl_compute, torch_compute = _compute(q.dtype)
    delta = (grad_out.to(torch_compute) * out.to(torch_compute)).sum(-1).contiguous()  # rowsum(dO * O)
    dq = torch.empty_like(q)
    dk = torch.empty(T, H, d, dtype=torch_compute, device=q.device)
    dv = torch.empty_like(dk)
    if q.numel() > 0:
        BLOCK_M, BLOCK_D = _blocks(Nq, d)
        _resampler_bwd_kernel[(B, H)](
            grad_out, q, k, v, lse, delta, cu_seqlens, dq, dk, dv, scale, H, Hk, Nq, d,
            BLOCK_M=BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=BLOCK_D, COMPUTE=tl_compute,
        )
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    if H != Hk:  # sum each group's per-head slices: (T, Hk, G, d) -> (T, Hk, d)
        dk = dk.view(T, Hk, H // Hk, d).sum(2)
        dv = dv.view(T, Hk, H // Hk, d).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
