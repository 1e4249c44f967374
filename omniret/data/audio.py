"""16 kHz log-mel features (Slaney-style triangular mel filters on a power spectrogram), in plain torch."""
from __future__ import annotations

import functools
import math

import torch

SAMPLE_RATE = 16000


def _hz_to_mel(hz):
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int = SAMPLE_RATE, f_min: float = 20.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, each normalised to unit area."""
    f_max = sample_rate / 2 if f_max is None else f_max
    mels = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    edges = torch.tensor([_mel_to_hz(float(m)) for m in mels], dtype=torch.float64)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs[None] - lower) / (centre - lower)
    fall = (upper - freqs[None]) / (upper - centre)
    bank = torch.clamp(torch.minimum(rise, fall), min=0.0)
    bank = bank * (2.0 / (upper - lower))
    return bank.float()


def log_mel(wave, n_mels: int = 40, n_fft: int = 400, hop: int = 160) -> torch.Tensor:
    """Log-mel features of a 1-D 16 kHz waveform: (frames, n_mels), 25 ms windows every 10 ms."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.dim() != 1 or wave.numel() == 0:
        raise ValueError(f"wave must be a non-empty 1-D waveform, got shape {tuple(wave.shape)}")
    if not torch.isfinite(wave).all():
        raise ValueError("wave contains NaN or infinite samples")
    if wave.numel() < n_fft:
        wave = torch.nn.functional.pad(wave, (0, n_fft - wave.numel()))
    spec = torch.stft(wave, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=True,
                      return_complex=True).abs().pow(2)
    mel = mel_filterbank(n_mels, n_fft) @ spec
    return torch.log(mel + 1e-6).T.contiguous()
