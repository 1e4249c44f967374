"""Training-time augmentation of raw media and of their features."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine", "speed_perturb", "warp_frequencies", "insert_random_word", "vocabulary_words",
           "add_filler_words"]


def _uniform_factor(low: float, high: float, generator: torch.Generator) -> float:
    """A factor drawn uniformly from [low, high] (0 < low <= high) with `generator`."""
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    return low + (high - low) * float(torch.rand((), generator=generator))


def speed_perturb(wave: torch.Tensor, generator: torch.Generator, low: float = 0.8, high: float = 1.25,
                  min_samples: int = 400) -> torch.Tensor:
    """Play a 1-D waveform `f` times as fast, f drawn uniformly from [low, high] with `generator`: linear
    resampling to len / f samples, so tempo and pitch move together (speed perturbation, as speech recognisers
    train on: a voice's pace and pitch vary more than its words). Never shorter than `min_samples`."""
    if wave.dim() != 1:
        raise ValueError(f"wave must be 1-D, got shape {tuple(wave.shape)}")
    factor = _uniform_factor(low, high, generator)
    n = max(min_samples, round(wave.shape[0] / factor))
    if n == wave.shape[0]:
        return wave
    return F.interpolate(wave[None, None].float(), size=n, mode="linear", align_corners=False)[0, 0].to(wave.dtype)


def warp_frequencies(features: torch.Tensor, generator: torch.Generator, low: float = 0.85,
                     high: float = 1.2) -> torch.Tensor:
    """Stretch a spectrogram (bins, frames) along its frequency axis by `a`, drawn uniformly from [low, high]
    with `generator`: bin f takes the value at bin f / a (linear interpolation; beyond the top bin, the top
    bin). Vocal tract length perturbation (Jaitly and Hinton): a voice's formants sit higher or lower with the
    speaker, at the same tempo, which speed perturbation alone cannot vary apart from the tempo. On mel bins the
    stretch is an approximation of a linear frequency warp (exact at the low, near-linear end of the mel scale).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (bins, frames), got shape {tuple(features.shape)}")
    factor = _uniform_factor(low, high, generator)
    bins = features.shape[0]
    src = (torch.arange(bins, dtype=torch.float64, device=features.device) / factor).clamp(max=bins - 1)
    below = src.floor().long()
    above = (below + 1).clamp(max=bins - 1)
    w = (src - below).to(features.dtype)[:, None]
    return features[below] * (1 - w) + features[above] * w


def random_affine(image: torch.Tensor, generator: torch.Generator, degrees: float = 12.0, scale: float = 0.1,
                  translate: float = 0.06) -> torch.Tensor:
    """Rotate an image (C, H, W) by up to +-`degrees`, zoom it by a factor in 1 +- `scale` and shift it by up to
    `translate` of its width and height, all drawn uniformly with `generator` (in that order), about its centre;
    bilinear, zeros outside. Handwriting varies in slant, size and position more than a small tower trained on a
    thousand images can learn from them alone."""
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if degrees < 0 or not 0 <= scale < 1 or translate < 0:
        raise ValueError(f"need degrees >= 0, 0 <= scale < 1 and translate >= 0, got {degrees}, {scale}, {translate}")
    draws = torch.rand(4, generator=generator, dtype=torch.float64) * 2 - 1  # four uniforms in [-1, 1)
    angle = math.radians(degrees * float(draws[0]))
    zoom = 1.0 + scale * float(draws[1])
    # affine_grid maps output to input coordinates in [-1, 1] units: a shift of `translate` widths is 2 * translate
    tx, ty = 2 * translate * float(draws[2]), 2 * translate * float(draws[3])
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32, device=image.device)
    grid = F.affine_grid(theta[None], (1, *image.shape), align_corners=False)
    out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].to(image.dtype)


def vocabulary_words(tokenizer, exclude=(), min_letters: int = 3, limit: int = 8000) -> list:
    """Whole lower-case ASCII words of a `transformers` tokenizer's vocabulary, in id order (roughly the most
    frequent first in WordPiece and BPE vocabularies), without `exclude`: filler for `insert_random_word`."""
    if not hasattr(tokenizer, "get_vocab"):
        raise ValueError(f"{type(tokenizer).__name__} has no vocabulary to draw words from (a transformers "
                         "tokenizer has)")
    skip = set(exclude)
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in by_id if w.isascii() and w.isalpha() and w.islower() and len(w) >= min_letters
             and w not in skip]
    if not words:
        raise ValueError("the tokenizer's vocabulary has no whole words to insert")
    return words[:limit]


def insert_random_word(text: str, words: list, generator: torch.Generator) -> str:
    """`text` with one word of `words`, drawn uniformly, inserted at a uniformly drawn gap between its words (the
    start and the end included): a query should not depend on a word that does not name what it asks for."""
    parts = text.split(" ")
    at = int(torch.randint(len(parts) + 1, (), generator=generator))
    word = words[int(torch.randint(len(words), (), generator=generator))]
    return " ".join(parts[:at] + [word] + parts[at:])


def add_filler_words(queries: list, words: list, probability: float, generator: torch.Generator) -> list:
    """Text-only queries (no media) each get one random word of `words` with `probability`; the others, and the
    caller's items, stay as they are."""
    media = ("image", "audio", "video")
    out = []
    for item in queries:
        if not any(k in item for k in media) and float(torch.rand((), generator=generator)) < probability:
            item = {**item, "text": insert_random_word(item["text"], words, generator)}
        out.append(item)
    return out
