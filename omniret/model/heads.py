"""Pooling heads: LLM hidden states (B, T, D) + mask (B, T) -> the embedding. The rows of the paper's Table 5:

- `ASWPHead` (the paper's): a `HiddenStateResampler` compresses the valid hidden states of each sequence to S
  latents (packed, no padding), then `ASWPPool` (L slices, M = S references) -> (B, L). `aswp_pooling` picks STM
  (default), max, mean or the learnable weighted sum (Table 5 c).
- `EOSHead`: the last valid token's hidden state (the [EOS] row of Table 5 a) -> (B, D).
- `MeanHead`: mean of the valid hidden states -> (B, D).
- `MultiVectorHead`: the hidden-state resampler's V = 16 latents kept as V vectors (late interaction) -> (B, V, D); score
  them with `late_interaction_scores`.
"""
from __future__ import annotations

import torch
from torch import nn

from omniret.config import OmniRetConfig
from omniret_kernels import ASWPPool, SharedMediaResampler

__all__ = ["HiddenStateResampler", "ASWPHead", "EOSHead", "MeanHead", "MultiVectorHead", "build_head",
           "pack_hidden", "late_interaction_scores"]

# state-dict names of earlier versions -> today's, under a head's prefix (checkpoints written before the
# hidden-state resampler had its name load as they are)
RENAMED_KEYS = {"resampler.": "hidden_state_resampler."}


def pack_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) + (B, T) bool -> the valid rows packed (sum_b n_b, D) and cu_seqlens (B + 1,) int32."""
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("mask: every sequence needs at least one valid token")
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = lengths.cumsum(0).to(torch.int32)
    return hidden[mask], cu


class HiddenStateResampler(SharedMediaResampler):
    """Compresses the LLM's hidden states of each sequence (packed, cu_seqlens) to `num_latents` latents: the
    attention blocks of the media resampler, with no per-modality latents (`config.output_resampler_depth`
    blocks; the paper's "output resampler")."""

    def __init__(self, cfg: OmniRetConfig, dim: int, num_latents: int):
        super().__init__(dim, num_latents=num_latents, depth=cfg.output_resampler_depth, heads=cfg.resampler_heads,
                         modalities=(), mlp_mult=cfg.resampler_mlp_mult)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """(sum_b n_b, D) packed hidden states -> (B, num_latents, D)."""
        return super().forward(hidden, cu_seqlens, modality=None)


def _load_renamed_keys(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: keys under an earlier name (RENAMED_KEYS) are moved to today's."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in RENAMED_KEYS.items():
            if rest.startswith(old) and prefix + new + rest[len(old):] not in state_dict:
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)


class ASWPHead(nn.Module):
    def __init__(self, cfg: OmniRetConfig, dim: int):
        super().__init__()
        self.hidden_state_resampler = HiddenStateResampler(cfg, dim, cfg.output_latents)
        self.pool = ASWPPool(dim, num_slices=cfg.num_slices, num_references=cfg.output_latents,
                             pooling=cfg.aswp_pooling)
        self.register_load_state_dict_pre_hook(_load_renamed_keys)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        packed, cu = pack_hidden(hidden, mask)
        return self.pool(self.hidden_state_resampler(packed, cu))  # (B, S, D) -> (B, L)


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
        self.hidden_state_resampler = HiddenStateResampler(cfg, dim, cfg.multi_vectors)
        self.register_load_state_dict_pre_hook(_load_renamed_keys)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        packed, cu = pack_hidden(hidden, mask)
        return self.hidden_state_resampler(packed, cu)  # (B, V, D)


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
