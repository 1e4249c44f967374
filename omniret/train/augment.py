"""Training-time augmentation of raw media."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["speed_perturb"]


def speed_perturb(wave: torch.Tensor, generator: torch.Generator, low: float = 0.8, high: float = 1.25,
                  min_samples: int = 400) -> torch.Tensor:
    """Play a 1-D waveform `f` times as fast, f drawn uniformly from [low, high] with `generator`: linear
    resampling to len / f samples, so tempo and pitch move together (speed perturbation, as speech recognisers
    train on: a voice's pace and pitch vary more than its words). Never shorter than `min_samples`."""
    if wave.dim() != 1:
        raise ValueError(f"wave must be 1-D, got shape {tuple(wave.shape)}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    factor = low + (high - low) * float(torch.rand((), generator=generator))
    n = max(min_samples, round(wave.shape[0] / factor))
    if n == wave.shape[0]:
        return wave
    return F.interpolate(wave[None, None].float(), size=n, mode="linear", align_corners=False)[0, 0].to(wave.dtype)
