"""Triton kernels of the diversity loss (SPEC section 3): fused forward and backward, one program per
(sample, block of rows).

A program owns rows I of sample b and the whole row strip G[I, :] of the Gram matrix (BLOCK_N >= N columns),
tiled over D with tl.dot. The Philox keep bits of the strip are drawn in registers (same counter layout as
omniret_kernels/_counter_rng.py and csrc/include/omniret/counter_rng.h), so no mask and no (B, N, N) tensor ever
reaches memory. Forward: smooth-L1 of the kept entries, reduced to one partial sum per program. Backward: the
strip's coefficients W[I, :] (smooth-L1', relu', dropout scale, both pair directions, normalization Jacobian)
stay in registers and the gradient rows are written as W[I, :] @ m[b] tile by tile over D.
Limit: BLOCK_N = next power of two >= N must fit a program's registers: N <= MAX_N = 256 (a larger N raises a
ValueError before launch; the cpu and cuda backends have no such limit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniret_kernels._checks import KernelLimitError
from omniret_kernels._counter_rng import DIVERSITY_STREAM
from omniret_kernels.triton._launch import Config, launch_fitting
from omniret_kernels.triton._precision import dot_precision

# The largest N whose strip kernels compile without spills for sm_80 and sm_90 (float32 and bfloat16; checked by
# omniret_kernels.compile_check): at N = 512 the backward's strip spills, at 1024 both kernels do.
MAX_N = 256


@triton.jit
def _u32(value):
    return tl.full([1], value, tl.int64).to(tl.uint32)


@triton.jit
def _keep_bits(seed, b, rows, cols, threshold, STREAM: tl.constexpr):
    """keep[b, rows[:, None], cols[None, :]]: Philox4x32-10 with counter (j >> 2, i, b, STREAM), word j & 3."""
    zero = (rows[:, None] * 0 + cols[None, :] * 0).to(tl.uint32)
    c0 = zero + (cols[None, :] >> 2).to(tl.uint32)
    c1 = zero + rows[:, None].to(tl.uint32)
    c2 = zero + b.to(tl.uint32)
    c3 = zero + _u32(STREAM)
    k0 = zero + (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = zero + ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    m0 = _u32(0xD2511F53)
    m1 = _u32(0xCD9E8D57)
    w0 = _u32(0x9E3779B9)
    w1 = _u32(0xBB67AE85)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    lane = cols[None, :] & 3
    word = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    return word.to(tl.int64) >= threshold


@triton.jit
def _gram_strip(m_ptr, b, offs_i, offs_n, N, D, stride_b, stride_n, stride_d,
                BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                OPERAND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """G[I, :] = m[b, I] @ m[b]^T, and the squared norms of rows I and of all rows."""
    gram = tl.zeros([BLOCK_I, BLOCK_N], ACC)
    ss_i = tl.zeros([BLOCK_I], ACC)
    ss_n = tl.zeros([BLOCK_N], ACC)
    base = m_ptr + b * stride_b
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d[None, :] < D
        xi = tl.load(base + offs_i[:, None] * stride_n + offs_d[None, :] * stride_d,
                     mask=(offs_i[:, None] < N) & in_d, other=0.0)
        xn = tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d,
                     mask=(offs_n[:, None] < N) & in_d, other=0.0)
        gram += tl.dot(xi.to(OPERAND), tl.trans(xn.to(OPERAND)), input_precision=PRECISION, out_dtype=ACC)
        ss_i += tl.sum(xi.to(ACC) * xi.to(ACC), axis=1)  # the norms in ACC, whatever the dot's operands
        ss_n += tl.sum(xn.to(ACC) * xn.to(ACC), axis=1)
    return gram, ss_i, ss_n


@triton.jit
def _smooth_l1(x, gamma):
    ax = tl.abs(x)
    return tl.where(ax < gamma, 0.5 * x * x / gamma, ax - 0.5 * gamma)


@triton.jit
def _smooth_l1_grad(x, gamma):
    ax = tl.abs(x)
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    return tl.where(ax < gamma, x / gamma, sign)


@triton.jit
def _cosines(gram, ss_i, ss_n, offs_i, offs_n, N, NORMALIZE: tl.constexpr):
    """Cosines (or raw dots) and 1 / norms; padding rows (index >= N) get 0 so that 0 * inf never turns the
    padded part of a tile into NaN that tl.dot would spread (a zero token inside N still gives NaN, as the
    reference does)."""
    if NORMALIZE:
        inv_i = tl.where(offs_i < N, 1.0 / tl.sqrt(tl.where(offs_i < N, ss_i, 1.0)), 0.0)
        inv_n = tl.where(offs_n < N, 1.0 / tl.sqrt(tl.where(offs_n < N, ss_n, 1.0)), 0.0)
        return gram * inv_i[:, None] * inv_n[None, :], inv_i, inv_n
    else:
        return gram, tl.where(offs_i < N, 1.0, 0.0), tl.where(offs_n < N, 1.0, 0.0)


@triton.jit
def _diversity_fwd_kernel(m_ptr, seed_ptr, partial_ptr, N, D, stride_b, stride_n, stride_d, threshold,
                          scale, gamma, NORMALIZE: tl.constexpr, STREAM: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          OPERAND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0)
    ib = tl.program_id(1)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    gram, ss_i, ss_n = _gram_strip(m_ptr, b, offs_i, offs_n, N, D, stride_b, stride_n, stride_d,
                                   BLOCK_I, BLOCK_N, BLOCK_D, OPERAND, PRECISION, ACC)
    g, inv_i, inv_n = _cosines(gram, ss_i, ss_n, offs_i, offs_n, N, NORMALIZE)
    seed = tl.load(seed_ptr)
    valid = (offs_i[:, None] < N) & (offs_n[None, :] < N)
    keep = _keep_bits(seed, b, offs_i, offs_n, threshold, STREAM) & valid
    diagonal = offs_i[:, None] == offs_n[None, :]
    a = (tl.maximum(g, 0.0) - tl.where(diagonal, 1.0, 0.0)) * scale
    terms = tl.where(keep, _smooth_l1(a, gamma), 0.0)
    tl.store(partial_ptr + b * tl.num_programs(1) + ib, tl.sum(tl.sum(terms, axis=1), axis=0))


@triton.jit
def _diversity_bwd_kernel(m_ptr, seed_ptr, grad_loss_ptr, grad_ptr, N, D, stride_b, stride_n, stride_d,
                          gstride_b, gstride_n, gstride_d, threshold, scale, gamma, inv_count,
                          NORMALIZE: tl.constexpr, STREAM: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          OPERAND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0)
    ib = tl.program_id(1)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    gram, ss_i, ss_n = _gram_strip(m_ptr, b, offs_i, offs_n, N, D, stride_b, stride_n, stride_d,
                                   BLOCK_I, BLOCK_N, BLOCK_D, OPERAND, PRECISION, ACC)
    g, inv_i, inv_n = _cosines(gram, ss_i, ss_n, offs_i, offs_n, N, NORMALIZE)
    seed = tl.load(seed_ptr)
    valid = (offs_i[:, None] < N) & (offs_n[None, :] < N)
    diagonal = offs_i[:, None] == offs_n[None, :]
    # g_ij feeds pair (i, j) and pair (j, i) (g is symmetric); each has its own keep bit.
    keep_ij = _keep_bits(seed, b, offs_i, offs_n, threshold, STREAM) & valid
    keep_ji = tl.trans(_keep_bits(seed, b, offs_n, offs_i, threshold, STREAM)) & valid
    a = (tl.maximum(g, 0.0) - tl.where(diagonal, 1.0, 0.0)) * scale
    dpair = tl.where(g > 0, _smooth_l1_grad(a, gamma) * scale, 0.0)
    weight = tl.load(grad_loss_ptr).to(ACC) * inv_count
    coef = (tl.where(keep_ij, dpair, 0.0) + tl.where(keep_ji, dpair, 0.0)) * weight  # dL/du_i = coef @ u
    w = coef * inv_i[:, None] * inv_n[None, :]
    if NORMALIZE:  # dm_i = inv_i * (du_i - <du_i, u_i> u_i)
        radial = tl.sum(coef * g, axis=1) * inv_i * inv_i
        w = w - tl.where(diagonal, radial[:, None], 0.0)
    w = w.to(OPERAND)  # 16-bit into the dot for 16-bit inputs, like P in flash attention
    base = m_ptr + b * stride_b
    out = grad_ptr + b * gstride_b
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d[None, :] < D
        xn = tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d,
                     mask=(offs_n[:, None] < N) & in_d, other=0.0).to(OPERAND)
        rows = tl.dot(w, xn, input_precision=PRECISION, out_dtype=ACC)
        tl.store(out + offs_i[:, None] * gstride_n + offs_d[None, :] * gstride_d,
                 rows.to(grad_ptr.dtype.element_ty), mask=(offs_i[:, None] < N) & in_d)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, N, threshold, STREAM: tl.constexpr, BLOCK_I: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    keep = _keep_bits(tl.load(seed_ptr), b, offs_i, offs_n, threshold, STREAM)
    valid = (offs_i[:, None] < N) & (offs_n[None, :] < N)
    tl.store(out_ptr + (b * N + offs_i[:, None]) * N + offs_n[None, :], keep.to(tl.int8), mask=valid)


def _configs(N: int, D: int, dtype: torch.dtype, input_precision: str = "tf32") -> tuple[int, int, list[Config]]:
    """(BLOCK_I, BLOCK_N, candidate configs best first). The strip G[I, :] (BLOCK_I x BLOCK_N, with its keep bits
    and coefficients) lives in registers, so BLOCK_I shrinks as N grows and the D tile shrinks so that the
    BLOCK_N x BLOCK_D tile of m, times the pipeline depth, fits shared memory."""
    if N > MAX_N:
        raise KernelLimitError(f"m: the Triton diversity_loss keeps a row strip of the Gram matrix in registers and "
                         f"supports N <= {MAX_N}, got N = {N}; use backend='cpu' or 'cuda'")
    block_n = max(16, triton.next_power_of_2(N))
    block_i = min(block_n, 32 if block_n <= 128 else 16)
    wide = dtype == torch.float64
    block_d = max(16, min(64 if block_n <= 128 and not wide else (32 if block_n <= 256 else 16),
                          triton.next_power_of_2(D)))
    fma = dtype == torch.float32 and input_precision == "ieee"  # exact fp32: FMA dots need more registers
    warps = 4 if block_n <= 64 and not fma else 8
    configs = [Config((("BLOCK_D", block_d),), warps, stages) for stages in (3, 2, 1)]
    return block_i, block_n, configs


def _launch(kernel, m, args, normalize, what):
    B, N, D = m.shape
    prec = dot_precision(m.dtype)
    block_i, block_n, configs = _configs(N, D, m.dtype, prec.input_precision)
    launch_fitting(kernel, (B, triton.cdiv(N, block_i)), args,
                   dict(NORMALIZE=normalize, STREAM=DIVERSITY_STREAM, BLOCK_I=block_i, BLOCK_N=block_n,
                        OPERAND=prec.operand, PRECISION=prec.input_precision, ACC=prec.acc),
                   configs, m.device, what)


def diversity_loss_forward(m, seed, threshold: int, p: float, gamma: float, normalize: bool) -> torch.Tensor:
    B, N, D = m.shape
    block_i, _, _ = _configs(N, D, m.dtype)
    partial = torch.empty((B, triton.cdiv(N, block_i)), dtype=dot_precision(m.dtype).torch_acc, device=m.device)
    _launch(_diversity_fwd_kernel, m,
            (m, seed, partial, N, D, m.stride(0), m.stride(1), m.stride(2), threshold, 1.0 / (1.0 - p), gamma),
            normalize, "diversity_loss forward")
    return (partial.sum() / (B * N * N)).to(m.dtype)


def diversity_loss_backward(grad, m, seed, threshold: int, p: float, gamma: float, normalize: bool, out=None):
    """dL/dm; `out` (tests pass a NaN-poisoned buffer) receives it when given."""
    B, N, D = m.shape
    grad_m = torch.empty_like(m) if out is None else out
    _launch(_diversity_bwd_kernel, m,
            (m, seed, grad.reshape(1), grad_m, N, D, m.stride(0), m.stride(1), m.stride(2),
             grad_m.stride(0), grad_m.stride(1), grad_m.stride(2), threshold, 1.0 / (1.0 - p), gamma,
             1.0 / (B * N * N)), normalize, "diversity_loss backward")
    return grad_m


def diversity_keep_mask(seed, batch: int, n: int, threshold: int) -> torch.Tensor:
    out = torch.empty((batch, n, n), dtype=torch.int8, device=seed.device)
    if batch == 0 or n == 0:
        return out.bool()
    block_n = max(16, triton.next_power_of_2(n))
    block_i = max(1, min(block_n, 4096 // block_n))  # a 4096-entry strip of Philox words per program
    _keep_mask_kernel[(batch, triton.cdiv(n, block_i))](seed, out, n, threshold, STREAM=DIVERSITY_STREAM,
                                                       BLOCK_I=block_i, BLOCK_N=block_n)
    return out.bool()
