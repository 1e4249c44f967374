"""Loading raw media into tensors: images, audio waveforms, video frames, and Whisper-style log-mel features.

Everything here is deterministic and runs per item on the CPU; its output is what the feature cache hashes.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_image", "load_audio", "load_video", "log_mel", "resize_image", "to_float_tensor"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_float_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or array here, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise ValueError(f"{name} must hold floats (or uint8 pixels), got dtype {x.dtype}")
    x = x.detach().to("cpu")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _pil_to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size), bicubic with antialiasing (as SigLIP's processor), clamped."""
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    y = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y[0].clamp_(0.0, 1.0)


def load_image(image, size: int, name: str = "image") -> torch.Tensor:
    """A PIL image, a path, or a float tensor/array (3, H, W) in [0, 1] -> (3, size, size) float32 in [0, 1].
    (H, W) and (1, H, W) grey images are repeated to 3 channels."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{name}: no such image file {str(path)!r}")
        from PIL import Image

        with Image.open(path) as img:
            x = _pil_to_tensor(img)
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        x = _pil_to_tensor(image)
    else:
        x = to_float_tensor(name, image)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"{name} must have shape (3, H, W) (or (1, H, W), (H, W)), got {tuple(x.shape)}")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if x.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{name} values must be in [0, 1], got min {lo:.4g}, max {hi:.4g}")
        x = x.clamp(0.0, 1.0)
    return resize_image(x, size)


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def load_audio(audio, sample_rate: int = 16000, max_seconds: float | None = None, name: str = "audio") -> torch.Tensor:
    """A path to a sound file (any rate, resampled; channels averaged) or a 1-D float waveform at `sample_rate`
    -> 1-D float32 waveform, cut to `max_seconds`."""
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise ValueError(f"{name}: no such audio file {str(path)!r}")
        import soundfile

        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        wave = torch.from_numpy(_resample(data.mean(axis=1), rate, sample_rate).copy())
    else:
        wave = to_float_tensor(name, audio)
        if wave.dim() == 2 and 1 in wave.shape:
            wave = wave.flatten()
        if wave.dim() != 1:
            raise ValueError(f"{name} must be a 1-D waveform at {sample_rate} Hz, got shape {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise ValueError(f"{name} is empty (no samples)")
    if max_seconds is not None:
        wave = wave[: int(max_seconds * sample_rate)]
    return wave.contiguous()


def load_video(video, num_frames: int, size: int, name: str = "video") -> torch.Tensor:
    """A (T, 3, H, W) float tensor/array in [0, 1], or a path: a directory of frame images (sorted by name),
    a .npy / .pt file holding (T, 3, H, W) -> (min(T, num_frames), 3, size, size), frames sampled uniformly."""
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not frames:
                raise ValueError(f"{name}: directory {str(path)!r} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
            idx = _uniform_indices(len(frames), num_frames)
            return torch.stack([load_image(frames[i], size, name=f"{name} frame {frames[i].name}") for i in idx])
        if path.suffix == ".npy" and path.is_file():
            video = np.load(path)
        elif path.suffix == ".pt" and path.is_file():
            video = torch.load(path, map_location="cpu", weights_only=True)
        elif path.is_file():
            raise ValueError(f"{name}: cannot decode {str(path)!r}; pass a (T, 3, H, W) tensor, a directory of "
                             "frames, or a .npy/.pt file (no video decoder is a dependency of omniret)")
        else:
            raise ValueError(f"{name}: no such video file or directory {str(path)!r}")
    x = to_float_tensor(name, video)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (T, 3, H, W) with T >= 1, got {tuple(x.shape)}")
    idx = _uniform_indices(x.shape[0], num_frames)
    return torch.stack([load_image(x[i], size, name=f"{name}[{i}]") for i in idx])


def _uniform_indices(total: int, wanted: int) -> list[int]:
    if total <= wanted:
        return list(range(total))
    return [int((i + 0.5) * total / wanted) for i in range(wanted)]


@functools.lru_cache(maxsize=8)
def _mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0,
                         max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(np.asarray(fb, dtype=np.float32)).t().contiguous()  # (n_mels, n_freq)


def log_mel(wave: torch.Tensor, n_mels: int, n_fft: int = 400, hop_length: int = 160,
            sample_rate: int = 16000) -> torch.Tensor:
    """Whisper's log-mel: |STFT|^2 (Hann, centred, last frame dropped) -> slaney mel -> log10, floored at
    max - 8, then (x + 4) / 4. wave (n,) or (B, n) -> (n_mels, n // hop) or (B, n_mels, n // hop)."""
    squeeze = wave.dim() == 1
    w = wave.float().reshape(-1, wave.shape[-1])
    window = torch.hann_window(n_fft, device=w.device)
    spec = torch.stft(w, n_fft, hop_length, window=window, return_complex=True)[..., :-1].abs() ** 2
    mel = _mel_filters(n_mels, n_fft, sample_rate).to(w.device) @ spec  # (B, n_mels, frames)
    logs = mel.clamp_min(1e-10).log10()
    floor = logs.amax(dim=(1, 2), keepdim=True) - 8.0
    out = (torch.maximum(logs, floor) + 4.0) / 4.0
    return out[0] if squeeze else out
