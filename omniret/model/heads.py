"""Pooling heads: LLM hidden states (B, T, D) + mask (B, T) -> the embedding. The rows of the paper's Table 5:

- `ASWPHead` (the paper's): an attention resampler compresses the valid hidden states of each sequence to S
  latents (packed, no padding), then `ASWPPool` (L slices, M = S references) -> (B, L). `aswp_pooling` picks STM
  (default), max, mean or the learnable weighted sum (Table 5 c).
- `EOSHead`: the last valid token's hidden state (the [EOS] row of Table 5 a) -> (B, D).
- `MeanHead`: mean of the valid hidden states -> (B, D).
- `MultiVectorHead`: the resampler's V = 16 latents kept as V vectors (late interaction) -> (B, V, D); score
  them with `late_interaction_scores`.
"""
from __future__ import annotations

import torch
from torch import nn

from omniret.config import OmniRetConfig
from omniret_kernels import ASWPPool, SharedMediaResampler

__all__ = ["ASWPHead", "EOSHead", "MeanHead", "MultiVectorHead", "build_head", "pack_hidden",
           "late_interaction_scores"]


def pack_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) + (B, T) bool -> the valid rows packed (sum_b n_b, D) and cu_seqlens (B + 1,) int32."""
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("mask: every sequence needs at least one valid token")
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = lengths.cumsum(0).to(torch.int32)
    return hidden[mask], cu


def _output_resampler(cfg: OmniRetConfig, dim: int, num_latents: int) -> SharedMediaResampler:
    return SharedMediaResampler(dim, num_latents=num_latents, depth=cfg.output_resampler_depth,
                                heads=cfg.resampler_heads, modalities=(), mlp_mult=cfg.resampler_mlp_mult)


class ASWPHead(nn.Module):
    def __init__(self, cfg: OmniRetConfig, dim: int):
        super().__init__()
        self.resampler = _output_resampler(cfg, dim, cfg.output_latents)
        self.pool = ASWPPool(dim, num_slices=cfg.num_slices, num_references=cfg.output_latents,
                             pooling=cfg.aswp_pooling)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        packed, cu = pack_hidden(hidden, mask)
        z = self.resampler(packed, cu, modality=None)  # (B, S, D)
        return self.pool(z)


class EOSHead(nn.Module):
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = mask.sum(dim=1) - 1  # right padding: the last valid token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MeanHead(nn.Module):
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1)


class MultiVectorHead(nn.Module):
    def __init__(self, cfg: OmniRetConfig, dim: int):
        super().__init__()
        self.resampler = _output_resampler(cfg, dim, cfg.multi_vectors)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        packed, cu = pack_hidden(hidden, mask)
        return self.resampler(packed, cu, modality=None)  # (B, V, D)


def build_head(cfg: OmniRetConfig, dim: int) -> nn.Module:
    if cfg.pooling == "aswp":
        return ASWPHead(cfg, dim)
    if cfg.pooling == "eos":
        return EOSHead()
    if cfg.pooling == "mean":
        return MeanHead()
    if cfg.pooling == "multi_vector":
        return MultiVectorHead(cfg, dim)
    raise ValueError(f"pooling must be one of aswp, eos, mean, multi_vector, got {cfg.pooling!r}")


def late_interaction_scores(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """ColBERT-style: q (Q, V, D), c (C, V', D) -> (Q, C) with score = mean_i max_j <q_i, c_j>
    (the mean keeps cosine scores of normalised vectors in [-1, 1])."""
    if q.dim() != 3 or c.dim() != 3 or q.shape[-1] != c.shape[-1]:
        raise ValueError(f"q and c must be (n, V, D) with one D, got {tuple(q.shape)} and {tuple(c.shape)}")
    sim = torch.einsum("qid,cjd->qcij", q, c)
    return sim.amax(dim=-1).mean(dim=-1)
