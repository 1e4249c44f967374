"""Per-channel standardisation of a frozen media encoder's tokens, with fixed statistics of the training media.

Frozen encoders without a final normalisation give tokens whose channels share large offsets: mean-pooled, two
Whisper tiny.en clips of the real benchmark have cosine 0.78 on average and two speech_embedding clips 0.79, so
at the start of training every clip looks alike to the projector. (x - mean) / std per channel, with the mean and
std of every token of the training split's media (of a seeded sample of MAX_FIT_EXAMPLES examples in a larger
split), removes that offset (the pooled cosine falls to ~0), as pixel normalisation does for images. The
statistics are buffers: fitted once before the first step (`OmniRet.before_training` or
`DualEncoder.before_training`, called by the Trainer on a fresh run), saved with the model, never trained.
"""
from __future__ import annotations

import random
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["MediaStandardizer", "token_moments", "fit_indices", "media_paths_by_modality", "media_paths_of",
           "fit_standardizers", "MAX_FIT_EXAMPLES"]

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


# The statistics come from at most this many training examples' media (a seeded sample of the examples beyond it).
# Per-channel moments settle within a few thousand files, and reading the tokens of every file of a large training
# set (M-BEIR's 1.1M pairs) would take hours before the first step. The real benchmark has 6,124 examples: all.
MAX_FIT_EXAMPLES = 20_000


def fit_indices(n: int, max_examples: int | None = None, seed: int = 0) -> list:
    """The example indices the statistics are fitted on: all of `n` in order, or `max_examples` (default
    MAX_FIT_EXAMPLES) of them drawn without replacement with `seed` (the same draw for every model and run), in
    order."""
    max_examples = MAX_FIT_EXAMPLES if max_examples is None else max_examples
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    if n <= max_examples:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_examples))


def media_paths_by_modality(dataset, modalities, max_examples: int | None = None) -> dict:
    """{modality: the distinct media of that modality (file paths, in first-seen order)} among the queries,
    positives and hard negatives of a trainer dataset (`len()` and `draw(i, step)` or `[i]`), in one pass over
    `fit_indices(len(dataset), max_examples)`."""
    seen = {m: {} for m in modalities}
    for i in fit_indices(len(dataset), max_examples):
        ex = dataset.draw(i, 0) if hasattr(dataset, "draw") else dataset[i]
        for item in [ex.get("query"), ex.get("candidate"), *(ex.get("negatives") or [])]:
            if not isinstance(item, dict):
                continue
            for modality, paths in seen.items():
                media = item.get(modality)
                for m in media if isinstance(media, (list, tuple)) else [media]:
                    if isinstance(m, str):
                        paths.setdefault(m, None)
    return {m: list(paths) for m, paths in seen.items()}


def media_paths_of(dataset, modality: str, max_examples: int | None = None) -> list:
    """The distinct media of one modality: `media_paths_by_modality` for it alone."""
    return media_paths_by_modality(dataset, (modality,), max_examples)[modality]


def fit_standardizers(norms, dataset, tokens_of: Callable[[str, list], Iterable[torch.Tensor]]) -> None:
    """Fits each standardizer of `norms` ({modality: MediaStandardizer}) that is not fitted yet to the tokens of
    the dataset's media of its modality (those of at most MAX_FIT_EXAMPLES examples), each file once:
    `tokens_of(modality, paths)` yields their (T, D) tokens. A model's `before_training` calls it with its own
    way of reading tokens."""
    todo = [m for m, norm in norms.items() if not bool(norm.fitted)]
    if not todo:
        return
    for modality, paths in media_paths_by_modality(dataset, todo).items():
        if not paths:
            raise ValueError(f"standardize_media: the training data hold no {modality} media to fit its statistics "
                             f"on (set standardize_media=False, or drop the {modality} encoder)")
        mean, std, _ = token_moments(tokens_of(modality, paths))
        norms[modality].set_stats(mean, std)


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
