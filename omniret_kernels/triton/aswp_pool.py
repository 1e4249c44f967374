"""Triton kernels of aswp_pool (SPEC section 1), forward and backward.

Forward, one program per (sample, block of slices): project the block with tl.dot at x's precision
(_precision.py: 16-bit operands, tf32 or ieee for float32; theta is rounded to x's dtype in the tile), pack each
projection with its token index into an int64 key whose signed order is (value, index) order, sort the keys
along the token axis with tl.sort (on the last axis, hence the transpose), write the sorted values and the
token at each sorted position, then couple every reference to its quantile (gathered back from the sorted values)
and pool. Backward, one program per block of slices looping over the samples (so the reference and weight
gradients need no atomics): recompute psi, take the pooling gradient, scatter it onto the sorted positions
(atomic adds: several references couple to one position), then scatter it back to the tokens sorted there. The
two GEMMs of backward (dx, d theta) run in torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniret_kernels.triton._launch import Config, launch_fitting
from omniret_kernels.triton._precision import dot_precision

POOLING_CODES = {"stm": 0, "max": 1, "mean": 2, "weighted": 3}


@triton.jit
def _ordered_bits(bits):
    """int32 bits of a float -> int32 whose signed order is the float order (and back: it is an involution)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _psi_block(sorted_base_ptr, rank_ptr, ref_ptr, offs_m, offs_l, n_b, M, L, valid_ml):
    """psi (BLOCK_M, BLOCK_L) of one sample: quantile coupling against the sorted values already in memory."""
    r = tl.load(rank_ptr + offs_m[:, None] * L + offs_l[None, :], mask=valid_ml, other=0).to(tl.float64)
    t = (r + 0.5) * n_b.to(tl.float64) / M - 0.5
    t = tl.minimum(tl.maximum(t, 0.0), (n_b - 1).to(tl.float64))
    lo_f = tl.floor(t)
    w = (t - lo_f).to(tl.float32)
    lo = lo_f.to(tl.int32)
    hi = tl.minimum(lo + 1, n_b - 1)
    s_lo = tl.load(sorted_base_ptr + lo * L + offs_l[None, :], mask=valid_ml, other=0.0)
    s_hi = tl.load(sorted_base_ptr + hi * L + offs_l[None, :], mask=valid_ml, other=0.0)
    ref = tl.load(ref_ptr + offs_m[:, None] * L + offs_l[None, :], mask=valid_ml, other=0.0).to(tl.float32)
    return s_lo * (1.0 - w) + s_hi * w - ref, lo, hi, w


@triton.jit
def _aswp_fwd_kernel(
    x_ptr, theta_ptr, rank_ptr, ref_ptr, weight_ptr, mask_ptr,
    out_ptr, sorted_ptr, sorted_tokens_ptr,
    N, D, L, M,
    POOLING: tl.constexpr, HAS_MASK: tl.constexpr, SAVE_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    OPERAND: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < N
    in_l = offs_l < L
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        in_d = d0 + offs_d < D
        xa = tl.load(x_ptr + b * N * D + offs_n[:, None] * D + d0 + offs_d[None, :],
                     mask=in_n[:, None] & in_d[None, :], other=0.0).to(OPERAND)
        ta = tl.load(theta_ptr + offs_l[:, None] * D + d0 + offs_d[None, :],
                     mask=in_l[:, None] & in_d[None, :], other=0.0).to(OPERAND)
        acc += tl.dot(xa, tl.trans(ta), input_precision=PRECISION, out_dtype=tl.float32)
    valid = in_n
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b * N + offs_n, mask=in_n, other=0) != 0)
    n_b = tl.sum(valid.to(tl.int32), axis=0)
    # (value, token) keys; -0 becomes +0 so both zeros tie and order by token, like a stable sort
    bits = _ordered_bits((acc + 0.0).to(tl.int32, bitcast=True))
    keys = (bits.to(tl.int64) << 32) | offs_n[:, None].to(tl.int64)
    keys = tl.where(valid[:, None], keys, 0x7FFFFFFFFFFFFFFF)
    keys = tl.sort(tl.trans(keys), dim=1)  # (BLOCK_L, BLOCK_N), ascending along the token axis
    values = _ordered_bits((keys >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    tokens = (keys & 0xFFFFFFFF).to(tl.int32)
    pos = tl.arange(0, BLOCK_N)[None, :]
    sorted_base = sorted_ptr + b * N * L
    tl.store(sorted_base + pos * L + offs_l[:, None], tl.where(pos < n_b, values, 0.0),
             mask=(pos < N) & in_l[:, None])
    if SAVE_TOKENS:  # the sorted values are also this kernel's scratch (gathered below); the tokens only backward's
        tl.store(sorted_tokens_ptr + b * N * L + pos * L + offs_l[:, None], tl.where(pos < n_b, tokens, 0),
                 mask=(pos < N) & in_l[:, None])
    tl.debug_barrier()  # the gathers below read the sorted values this program just wrote

    offs_m = tl.arange(0, BLOCK_M)
    valid_ml = (offs_m < M)[:, None] & in_l[None, :]
    psi, lo, hi, w = _psi_block(sorted_base, rank_ptr, ref_ptr, offs_m, offs_l, n_b, M, L, valid_ml)
    if POOLING == 0 or POOLING == 1:
        out = tl.max(tl.where(valid_ml, psi, float("-inf")), axis=0)
    elif POOLING == 2:
        out = tl.sum(tl.where(valid_ml, psi, 0.0), axis=0) / M
    else:
        wt = tl.load(weight_ptr + offs_m[:, None] * L + offs_l[None, :], mask=valid_ml, other=0.0).to(tl.float32)
        out = tl.sum(tl.where(valid_ml, wt * psi, 0.0), axis=0)
    tl.store(out_ptr + b * L + offs_l, out, mask=in_l)


@triton.jit
def _aswp_bwd_kernel(
    grad_ptr, rank_ptr, ref_ptr, weight_ptr, mask_ptr, sorted_ptr, sorted_tokens_ptr,
    ds_ptr, dp_ptr, dref_ptr, dweight_ptr,
    B, N, L, M, inv_t,
    POOLING: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    in_l = offs_l < L
    in_n = offs_n < N
    valid_ml = (offs_m < M)[:, None] & in_l[None, :]
    dref = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    dweight = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    for b in range(B):
        valid = in_n
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * N + offs_n, mask=in_n, other=0) != 0)
        n_b = tl.sum(valid.to(tl.int32), axis=0)
        sorted_base = sorted_ptr + b * N * L
        psi, lo, hi, w = _psi_block(sorted_base, rank_ptr, ref_ptr, offs_m, offs_l, n_b, M, L, valid_ml)
        g = tl.load(grad_ptr + b * L + offs_l, mask=in_l, other=0.0).to(tl.float32)[None, :]
        if POOLING == 0 or POOLING == 1:
            masked_psi = tl.where(valid_ml, psi, float("-inf"))
            best = tl.max(masked_psi, axis=0)
            first = tl.min(tl.where(masked_psi == best[None, :], offs_m[:, None], BLOCK_M), axis=0)
            dpsi = tl.where(offs_m[:, None] == first[None, :], g, 0.0)
            if POOLING == 0:
                e = tl.where(valid_ml, tl.exp((psi - best[None, :]) * inv_t), 0.0)
                z = tl.sum(e, axis=0)
                z = tl.where(in_l, z, 1.0)  # slices past L have no valid entry (0 / 0 otherwise)
                mean_psi = tl.sum(e * psi, axis=0) / z
                dpsi += g * (e / z[None, :]) * (psi - mean_psi[None, :]) * inv_t
        elif POOLING == 2:
            dpsi = g / M + tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
        else:
            wt = tl.load(weight_ptr + offs_m[:, None] * L + offs_l[None, :], mask=valid_ml, other=0.0)
            dpsi = g * wt.to(tl.float32)
            dweight += tl.where(valid_ml, g * psi, 0.0)
        dpsi = tl.where(valid_ml, dpsi, 0.0)
        dref -= dpsi
        ds_base = ds_ptr + b * N * L
        tl.atomic_add(ds_base + lo * L + offs_l[None, :], dpsi * (1.0 - w), mask=valid_ml)
        tl.atomic_add(ds_base + hi * L + offs_l[None, :], dpsi * w, mask=valid_ml)
        tl.debug_barrier()
        # position i -> the token sorted there (dp is zeroed beforehand, so masked tokens keep 0)
        real = (offs_n < n_b)[:, None] & in_l[None, :]
        tok = tl.load(sorted_tokens_ptr + b * N * L + offs_n[:, None] * L + offs_l[None, :], mask=real, other=0)
        ds_i = tl.load(ds_base + offs_n[:, None] * L + offs_l[None, :], mask=real, other=0.0)
        tl.store(dp_ptr + b * N * L + tok.to(tl.int32) * L + offs_l[None, :], ds_i, mask=real)
    tl.store(dref_ptr + offs_m[:, None] * L + offs_l[None, :], dref, mask=valid_ml)
    if POOLING == 3:
        tl.store(dweight_ptr + offs_m[:, None] * L + offs_l[None, :], dweight, mask=valid_ml)


def _blocks(N, M, L):
    block_n = max(16, triton.next_power_of_2(N))
    block_m = max(16, triton.next_power_of_2(M))
    block_l = max(16, min(32, triton.next_power_of_2(L)))
    return block_n, block_m, block_l


def _theta(directions, normalize_directions):
    d = directions.float()
    return (d / d.norm(dim=1, keepdim=True) if normalize_directions else d).contiguous()


def _ranks(references):
    """r_l(j) (M, L) int32: stable rank of each reference in its column."""
    order = torch.sort(references.detach().float(), dim=0, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(0, order, torch.arange(order.shape[0], device=order.device)[:, None].expand_as(order))
    return ranks.to(torch.int32).contiguous()


def aswp_pool_forward(x, directions, references, mask, weights, pooling, normalize_directions, temperature,
                      save_for_backward=True):
    """-> (out, sorted values, sorted tokens); without save_for_backward the last two are empty (0,) tensors (the
    values are still written, to a scratch buffer the interpolation reads back)."""
    B, N, D = x.shape
    L, M = directions.shape[0], references.shape[0]
    block_n, block_m, block_l = _blocks(N, M, L)
    theta = _theta(directions, normalize_directions)
    out = torch.empty(B, L, device=x.device, dtype=torch.float32)
    sorted_values = torch.empty(B, N, L, device=x.device, dtype=torch.float32)
    sorted_tokens = torch.empty((B, N, L) if save_for_backward else (0,), device=x.device,
                                dtype=torch.uint8 if N <= 256 else torch.int32)
    tokens_arg = sorted_tokens if save_for_backward else out  # never written then: any valid pointer
    mask_arg = mask.to(torch.uint8).contiguous() if mask is not None else out
    weight_arg = weights.float().contiguous() if pooling == "weighted" else out
    prec = dot_precision(x.dtype)
    launch_fitting(_aswp_fwd_kernel, (B, triton.cdiv(L, block_l)),
                   (x.contiguous(), theta, _ranks(references), references.float().contiguous(), weight_arg, mask_arg,
                    out, sorted_values, tokens_arg, N, D, L, M),
                   dict(POOLING=POOLING_CODES[pooling], HAS_MASK=mask is not None, SAVE_TOKENS=save_for_backward,
                        BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_M=block_m, OPERAND=prec.operand,
                        PRECISION=prec.input_precision),
                   [Config((("BLOCK_D", 32),), 4, stages) for stages in (3, 2, 1)], x.device, "aswp_pool forward")
    if not save_for_backward:
        sorted_values = sorted_values.new_empty((0,))
    return out.to(x.dtype), sorted_values, sorted_tokens


def aswp_pool_backward(grad_out, x, directions, references, mask, weights, sorted_values, sorted_tokens, pooling,
                       normalize_directions, temperature, need_x, need_directions):
    B, N, D = x.shape
    L, M = directions.shape[0], references.shape[0]
    block_n, block_m, block_l = _blocks(N, M, L)
    ds = torch.zeros(B, N, L, device=x.device, dtype=torch.float32)
    dp = torch.zeros(B, N, L, device=x.device, dtype=torch.float32)
    dref = torch.empty(M, L, device=x.device, dtype=torch.float32)
    weighted = pooling == "weighted"
    dweight = torch.empty(M, L, device=x.device, dtype=torch.float32) if weighted else dref
    mask_arg = mask.to(torch.uint8).contiguous() if mask is not None else dref
    # the (BLOCK_M x BLOCK_L) tiles of psi, its coupling and the two accumulators live in registers: at M = 128,
    # 16 slices per program and 8 warps keep them there (32 slices spill ~1 KB per thread with 4 warps, 44 B with 8)
    block_l = 16 if block_m >= 128 else block_l
    warps = 8 if block_m * block_l >= 64 * 32 else 4
    launch_fitting(_aswp_bwd_kernel, (triton.cdiv(L, block_l),),
                   (grad_out.float().contiguous(), _ranks(references), references.float().contiguous(),
                    weights.float().contiguous() if weighted else dref, mask_arg, sorted_values,
                    sorted_tokens.contiguous(), ds, dp, dref, dweight, B, N, L, M, 1.0 / temperature),
                   dict(POOLING=POOLING_CODES[pooling], HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_M=block_m),
                   [Config((("BLOCK_L", block_l),), warps, stages) for stages in (2, 1)], x.device,
                   "aswp_pool backward")
    del ds
    d = directions.float()
    theta = _theta(directions, normalize_directions)
    gx = (dp.view(B * N, L) @ theta).view(B, N, D).to(x.dtype) if need_x else x.new_empty(0)
    if need_directions:
        dtheta = dp.view(B * N, L).t() @ x.reshape(B * N, D).float()
        if normalize_directions:
            norm = d.norm(dim=1, keepdim=True)
            dtheta = (dtheta - theta * (dtheta * theta).sum(1, keepdim=True)) / norm
        gd = dtheta.to(directions.dtype)
    else:
        gd = directions.new_empty(0)
    gw = dweight.to(weights.dtype) if weighted else references.new_empty(0)
    return gx, gd, dref.to(references.dtype), gw
