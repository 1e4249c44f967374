"""Philox4x32-10, the counter-based generator behind the diversity loss's keep mask, in plain PyTorch.

The same function is written three more times and must agree bit for bit: in C++ (csrc/include/omniret/
counter_rng.h, shared by the CPU and CUDA kernels) and in Triton (omniret_kernels/triton/diversity_loss.py).
A counter-based generator lets every backend draw the keep bit of pair (b, i, j) on its own, in any order,
and lets the backward pass regenerate the mask from (seed, b, i, j) instead of storing a (B, N, N) tensor.

Layout of one draw (shared with the C++ and Triton versions):
  key     = (seed & 0xffffffff, seed >> 32)             seed: 63-bit, drawn from a torch.Generator
  counter = (j // 4, i, b, DIVERSITY_STREAM)             one Philox block serves four consecutive j
  word    = output[j % 4]
  keep    = word >= threshold,  threshold = floor(p * 2^32)   so P(keep) = 1 - threshold / 2^32 ~ 1 - p

Arithmetic is done on int64 tensors holding 32-bit values: a 32x32-bit product fits in 64 bits modulo 2^64,
which is all we need (two's-complement wraparound keeps the low 64 bits exact).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
PHILOX_ROUNDS = 10
# Fourth counter word: separates the diversity-loss stream from any other use of the same seed ("DIVS").
DIVERSITY_STREAM = 0x44495653
SEED_BOUND = 2**63 - 1  # seeds are drawn uniformly from [0, SEED_BOUND)

_MASK32 = 0xFFFFFFFF

__all__ = ["philox4x32", "keep_threshold", "draw_seed", "keep_mask", "DIVERSITY_STREAM"]


def _mul_hilo(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    prod = a * m  # exact modulo 2^64
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(counter: Tuple[torch.Tensor, ...], key: Tuple[torch.Tensor, torch.Tensor],
               rounds: int = PHILOX_ROUNDS) -> Tuple[torch.Tensor, ...]:
    """Philox4x32 (Salmon et al., SC'11) on broadcastable int64 tensors holding uint32 values."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mul_hilo(c0, PHILOX_M0)
        hi1, lo1 = _mul_hilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """floor(p * 2^32): exact in float64 (a power-of-two scaling), so every backend gets the same integer."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    return int(float(p) * 4294967296.0)


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """A 0-dim int64 tensor seed from `generator` (or torch's default generator of `device`).

    Drawn with torch.randint so that restoring the generator's state replays it, and kept a tensor (no
    .item()) so that torch.compile traces it without a graph break."""
    if generator is not None:
        device = generator.device
    return torch.randint(0, SEED_BOUND, (), generator=generator, dtype=torch.int64, device=device)


def keep_mask(seed: torch.Tensor, batch: int, n: int, p: float) -> torch.Tensor:
    """The (batch, n, n) bool keep mask of the diversity loss for `seed` (0-dim int64 tensor)."""
    threshold = keep_threshold(p)
    device = seed.device
    seed = seed.to(torch.int64)
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    b = torch.arange(batch, dtype=torch.int64, device=device).view(batch, 1, 1)
    i = torch.arange(n, dtype=torch.int64, device=device).view(1, n, 1)
    j = torch.arange(n, dtype=torch.int64, device=device).view(1, 1, n)
    stream = torch.full((), DIVERSITY_STREAM, dtype=torch.int64, device=device)
    words = philox4x32((j >> 2, i, b, stream), key)
    lane = (j & 3).expand(batch, n, n)
    word = torch.stack(torch.broadcast_tensors(*words), dim=-1).gather(-1, lane.unsqueeze(-1)).squeeze(-1)
    return word >= threshold
