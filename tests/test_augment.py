"""speed_perturb: a waveform played faster or slower by a seeded random factor."""
import math

import pytest
import torch

from omniret.train.augment import speed_perturb


def test_length_and_pitch_follow_the_factor():
    rate, n = 16000, 16000
    t = torch.arange(n, dtype=torch.float64) / rate
    wave = torch.sin(2 * math.pi * 440.0 * t)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        factor = 0.8 + (1.25 - 0.8) * float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        out = speed_perturb(wave, g, 0.8, 1.25)
        assert out.dtype == wave.dtype and out.dim() == 1
        assert out.shape[0] == round(n / factor)
        # the tone's frequency moves with the factor: find the spectrum's peak
        spec = torch.fft.rfft(out * torch.hann_window(out.shape[0], dtype=out.dtype))
        peak = int(spec.abs().argmax()) * rate / out.shape[0]
        assert abs(peak - 440.0 * factor) < 3.0, (seed, factor, peak)


def test_seeded_and_bounded():
    wave = torch.randn(3000)
    a = speed_perturb(wave, torch.Generator().manual_seed(3))
    b = speed_perturb(wave, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    lengths = {speed_perturb(wave, torch.Generator().manual_seed(s)).shape[0] for s in range(20)}
    assert len(lengths) > 5 and min(lengths) >= round(3000 / 1.25) and max(lengths) <= round(3000 / 0.8)
    assert torch.equal(speed_perturb(wave, torch.Generator(), 1.0, 1.0), wave)
    assert speed_perturb(torch.randn(10), torch.Generator(), min_samples=400).shape[0] == 400


def test_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        speed_perturb(torch.randn(2, 100), torch.Generator())
    with pytest.raises(ValueError, match="low"):
        speed_perturb(torch.randn(100), torch.Generator(), 1.2, 0.9)
