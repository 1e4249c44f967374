"""Triton kernels of resampler_attention, flash-style: varlen keys; forward one program per (sample, head, query
block), backward one per (sample, head).

Forward: the program holds a block of its head's queries and walks the sample's packed keys
cu_seqlens[b] : cu_seqlens[b + 1] in tiles of BLOCK_N with the online softmax (running max, running sum,
rescaled accumulator); QK^T and PV are tl.dot on tensor cores at the input's precision (see _precision.py: 16-bit
operands, tf32 or ieee for float32, ieee for float64). It writes out and the log-sum-exp.
Backward: the same walk recomputes P = exp(S - lse) from the saved log-sum-exp; dq stays in registers for the
whole walk, and each key tile's dk and dv go to rows this program alone owns (written by the first query block,
accumulated by the next ones). With several query heads per kv head (GQA) each head writes its own dk/dv slice
and the launcher sums the group, so no two programs write one element and there are no atomics.

Head dims that are not a power of two (d = 96) are padded to the next one in registers (BLOCK_D = 128, masked
loads and stores): Triton's tl.arange and tile shapes must be powers of two, so this padding is unavoidable here.
Nq is tiled into query blocks of at most BLOCK_M (a power of two <= 128); d is limited to 256.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniret_kernels._checks import KernelLimitError
from omniret_kernels.triton._launch import Config, launch_fitting
from omniret_kernels.triton._precision import dot_precision

MAX_HEAD_DIM = 256


@triton.jit
def _load_kv_tile(k_ptr, v_ptr, n0, rn, rd, end, Hk, hk, d, OPERAND: tl.constexpr):
    """One tile of a sample's packed keys and values for kv head `hk`: rows n0 + rn of [.., end), zero past the
    sample's end and past d. Returns the rows, their validity, the (rows, d) mask and the two tiles."""
    rows = n0 + rn
    row_ok = rows < end
    kv_offs = (rows[:, None] * Hk + hk) * d + rd[None, :]
    kv_mask = row_ok[:, None] & (rd[None, :] < d)
    kb = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(OPERAND)
    vb = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(OPERAND)
    return rows, row_ok, kv_mask, kb, vb


@triton.jit
def _resampler_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, lse_ptr,
    scale, H, Hk, Nq, d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (H // Hk)
    start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    q_mask = (rm[:, None] < Nq) & (rd[None, :] < d)
    q_rows = (b * H + h).to(tl.int64) * Nq + rm
    q = tl.load(q_ptr + q_rows[:, None] * d + rd[None, :], mask=q_mask, other=0.0).to(OPERAND)

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for n0 in range(start, end, BLOCK_N):
        _, row_ok, _, kb, vb = _load_kv_tile(k_ptr, v_ptr, n0, rn, rd, end, Hk, hk, d, OPERAND)
        s = tl.dot(q, tl.trans(kb), input_precision=PRECISION, out_dtype=ACC) * scale
        s = tl.where(row_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key (n0 < end)
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(OPERAND), vb, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * d + rd[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + q_rows, (m_i + tl.log(l_i)).to(lse_ptr.dtype.element_ty), mask=rm < Nq)


@triton.jit
def _resampler_bwd_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, cu_seqlens_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    scale, H, Hk, Nq, d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dk_ptr/dv_ptr are (T, H, d): one slice per query head, summed over each GQA group by the launcher. The
    program walks its head's query blocks one after the other; the first pass writes its dk/dv rows, later passes
    add to them (rows this program alone owns, so no atomics; a barrier between passes orders the threads)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // (H // Hk)
    start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    for m0 in range(0, Nq, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        q_mask = (rm[:, None] < Nq) & (rd[None, :] < d)
        q_rows = (b * H + h).to(tl.int64) * Nq + rm
        q_offs = q_rows[:, None] * d + rd[None, :]
        q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(OPERAND)
        do = tl.load(grad_out_ptr + q_offs, mask=q_mask, other=0.0).to(OPERAND)
        lse = tl.load(lse_ptr + q_rows, mask=rm < Nq, other=0.0).to(ACC)
        delta = tl.load(delta_ptr + q_rows, mask=rm < Nq, other=0.0).to(ACC)

        dq = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        for n0 in range(start, end, BLOCK_N):
            rows, row_ok, kv_mask, kb, vb = _load_kv_tile(k_ptr, v_ptr, n0, rn, rd, end, Hk, hk, d, OPERAND)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION, out_dtype=ACC) * scale
            # padded query rows (rm >= Nq) load q = do = 0 and lse = 0; the mask keeps their p out of dk and dv
            p = tl.where(row_ok[None, :] & (rm[:, None] < Nq), tl.exp(s - lse[:, None]), 0.0)
            dv_blk = tl.dot(tl.trans(p.to(OPERAND)), do, input_precision=PRECISION, out_dtype=ACC)
            dp = tl.dot(do, tl.trans(vb), input_precision=PRECISION, out_dtype=ACC)
            ds = (p * (dp - delta[:, None])).to(OPERAND)
            dq += tl.dot(ds, kb, input_precision=PRECISION, out_dtype=ACC)
            dk_blk = tl.dot(tl.trans(ds), q, input_precision=PRECISION, out_dtype=ACC) * scale
            dkv_offs = (rows[:, None] * H + h) * d + rd[None, :]
            if m0 > 0:  # earlier query blocks' share of these rows
                dk_blk += tl.load(dk_ptr + dkv_offs, mask=kv_mask, other=0.0).to(ACC)
                dv_blk += tl.load(dv_ptr + dkv_offs, mask=kv_mask, other=0.0).to(ACC)
            tl.store(dk_ptr + dkv_offs, dk_blk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(dv_ptr + dkv_offs, dv_blk.to(dv_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)
        tl.debug_barrier()  # the next pass reads dk/dv rows other threads of this program wrote


def _configs(Nq, d, dtype, backward, input_precision="tf32") -> list[Config]:
    """Candidate configs, best first (launch_fitting takes the first that fits the device's shared memory). They
    share BLOCK_M (the forward's grid depends on it) and differ in the key tile and pipeline depth.

    The register budget sets the query block: the BLOCK_M x BLOCK_D float32 accumulator (and dq in backward) must
    stay in registers with the tiles, so wide rows (float32 / float64 at d = 128) take smaller query blocks."""
    if d > MAX_HEAD_DIM:
        raise KernelLimitError(f"q: the Triton resampler_attention supports head dims d <= {MAX_HEAD_DIM}, got d = {d}; "
                         f"use backend='cpu' or 'reference'")
    block_d = max(16, triton.next_power_of_2(d))
    row_bytes = block_d * (8 if dtype == torch.float64 else (4 if dtype == torch.float32 else 2))
    if backward:
        max_m = 128 if row_bytes <= 128 else (64 if row_bytes <= 256 else (32 if row_bytes <= 512 else 16))
    else:
        max_m = 128 if row_bytes <= 256 else (64 if row_bytes <= 512 else 32)
    fma = dtype == torch.float32 and input_precision == "ieee"  # exact fp32: FMA dots hold whole tiles in registers
    if fma:
        max_m = 16 if backward else 32
    block_m = max(16, min(max_m, triton.next_power_of_2(Nq)))
    if dtype == torch.float64 or (fma and backward):
        block_ns = (16,)
    elif fma:
        block_ns = (32, 16)
    elif backward or block_m * block_d >= 128 * 128:
        block_ns = (32, 16)
    else:
        block_ns = (64, 32, 16)
    warps = 8 if block_m * row_bytes >= 16 * 1024 or fma else 4
    # a third K/V buffer costs the 32-bit backward its last registers (32-40 B of spills on sm_80 at d = 128)
    stages = (2, 1) if backward and dtype in (torch.float32, torch.float64) else (3, 2, 1)
    configs = [Config((("BLOCK_M", block_m), ("BLOCK_N", bn), ("BLOCK_D", block_d)), warps, st)
               for bn in block_ns for st in stages]
    return configs


def forward(q, k, v, cu_seqlens, scale: float):
    """(out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) float32 / float64)."""
    q, k, v, cu_seqlens = q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.contiguous()
    B, H, Nq, d = q.shape
    Hk = k.shape[1]
    prec = dot_precision(q.dtype)
    out = torch.empty_like(q)  # q is contiguous here
    lse = torch.empty(B, H, Nq, dtype=prec.torch_acc, device=q.device)
    if out.numel() == 0:
        return out, lse
    configs = _configs(Nq, d, q.dtype, backward=False, input_precision=prec.input_precision)
    block_m = dict(configs[0].constexprs)["BLOCK_M"]
    launch_fitting(_resampler_fwd_kernel, (B, H, triton.cdiv(Nq, block_m)),
                   (q, k, v, cu_seqlens, out, lse, scale, H, Hk, Nq, d),
                   dict(OPERAND=prec.operand, PRECISION=prec.input_precision, ACC=prec.acc), configs, q.device,
                   "resampler_attention forward")
    return out, lse


def backward(grad_out, q, k, v, out, lse, cu_seqlens, scale: float):
    """(dq, dk, dv) in the inputs' dtypes."""
    grad_out, q, k, v = grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    cu_seqlens, lse = cu_seqlens.contiguous(), lse.contiguous()
    B, H, Nq, d = q.shape
    T, Hk, _ = k.shape
    prec = dot_precision(q.dtype)
    delta = (grad_out.to(prec.torch_acc) * out.to(prec.torch_acc)).sum(-1).contiguous()  # rowsum(dO * O)
    dq = torch.empty_like(q)
    if q.numel() == 0:
        zeros = torch.zeros(T, Hk, d, dtype=k.dtype, device=k.device)
        return dq.zero_(), zeros, zeros.clone()
    configs = _configs(Nq, d, q.dtype, backward=True, input_precision=prec.input_precision)
    dk = torch.empty(T, H, d, dtype=prec.torch_acc, device=q.device)
    dv = torch.empty_like(dk)
    launch_fitting(_resampler_bwd_kernel, (B, H),
                   (grad_out, q, k, v, lse, delta, cu_seqlens, dq, dk, dv, scale, H, Hk, Nq, d),
                   dict(OPERAND=prec.operand, PRECISION=prec.input_precision, ACC=prec.acc), configs, q.device,
                   "resampler_attention backward")
    if H != Hk:  # sum each group's per-head slices: (T, Hk, G, d) -> (T, Hk, d)
        dk = dk.view(T, Hk, H // Hk, d).sum(2)
        dv = dv.view(T, Hk, H // Hk, d).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
