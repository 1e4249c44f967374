"""Per-channel standardisation of a frozen media encoder's tokens, with fixed statistics of the training media.

Frozen encoders without a final normalisation give tokens whose channels share large offsets: mean-pooled, two
Whisper tiny.en clips of the real benchmark have cosine 0.78 on average and two speech_embedding clips 0.79, so
at the start of training every clip looks alike to the projector. (x - mean) / std per channel, with the mean and
std of every token of the training split's media, removes that offset (the pooled cosine falls to ~0), as pixel
normalisation does for images. The statistics are buffers: fitted once before the first step
(`OmniRet.before_training` or `DualEncoder.before_training`, called by the Trainer on a fresh run), saved with the
model, never trained.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["MediaStandardizer", "token_moments", "media_paths_of", "fit_standardizers"]

MIN_STD = 1e-3  # channels that never vary (a dead unit) are divided by this, not by zero


def token_moments(token_sets: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std, tokens) per channel over the rows of every (T, D) tensor, accumulated in float64."""
    total = sq = None
    count = 0
    for x in token_sets:
        x = torch.as_tensor(x).to(torch.float64)
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"token_moments: each item must be (tokens >= 1, D), got {tuple(x.shape)}")
        if total is None:
            total, sq = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
        elif x.shape[1] != total.shape[0]:
            raise ValueError(f"token_moments: widths differ ({x.shape[1]} after {total.shape[0]})")
        total += x.sum(0)
        sq += (x * x).sum(0)
        count += x.shape[0]
    if count == 0:
        raise ValueError("token_moments: no tokens (no media of this modality in the training data)")
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().float(), count


def media_paths_of(dataset, modality: str) -> list:
    """The distinct media of `modality` (file paths, in first-seen order) among the queries, positives and hard
    negatives of a trainer dataset (`len()` and `draw(i, step)` or `[i]`)."""
    seen: dict = {}
    for i in range(len(dataset)):
        ex = dataset.draw(i, 0) if hasattr(dataset, "draw") else dataset[i]
        for item in [ex.get("query"), ex.get("candidate"), *(ex.get("negatives") or [])]:
            if not isinstance(item, dict):
                continue
            media = item.get(modality)
            for m in media if isinstance(media, (list, tuple)) else [media]:
                if isinstance(m, str):
                    seen.setdefault(m, None)
    return list(seen)


def fit_standardizers(norms, dataset, tokens_of: Callable[[str, list], Iterable[torch.Tensor]]) -> None:
    """Fits each standardizer of `norms` ({modality: MediaStandardizer}) that is not fitted yet to the tokens of
    the dataset's media of its modality, each file once: `tokens_of(modality, paths)` yields their (T, D) tokens.
    A model's `before_training` calls it with its own way of reading tokens."""
    for modality, norm in norms.items():
        if bool(norm.fitted):
            continue
        paths = media_paths_of(dataset, modality)
        if not paths:
            raise ValueError(f"standardize_media: the training data hold no {modality} media to fit its statistics "
                             f"on (set standardize_media=False, or drop the {modality} encoder)")
        mean, std, _ = token_moments(tokens_of(modality, paths))
        norm.set_stats(mean, std)


class MediaStandardizer(nn.Module):
    """(..., D) -> (x - mean) / std with buffers `mean`, `std` and `fitted` (saved in the state dict). Until it
    is fitted it passes tokens through and warns once."""

    def __init__(self, dim: int, name: str = "media"):
        super().__init__()
        self.name = name
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._warned = False

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(f"{self.name} standardizer: stats of shape {tuple(mean.shape)}, {tuple(std.shape)}; "
                             f"expected ({self.mean.shape[0]},)")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"{self.name} standardizer: statistics hold NaN or Inf")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(MIN_STD))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            if not self._warned:
                warnings.warn(f"{self.name} tokens are not standardised: the statistics were never fitted (the "
                              f"Trainer fits them before a fresh run; or call before_training(dataset))",
                              stacklevel=2)
                self._warned = True
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.mean.shape[0]}, fitted={bool(self.fitted)}"
