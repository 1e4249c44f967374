"""Media encoders behind one interface: `preprocess(raw) -> tensor` (per item, CPU, deterministic: what the
feature cache hashes) and `encode(batch) -> (packed tokens (T, out_dim), cu_seqlens (n + 1,) int32)`.

- `SiglipImageEncoder`: a `transformers` SigLIP vision tower (frozen); images resized to its input size.
- `WhisperAudioEncoder`: a `transformers` Whisper or Qwen2-Audio encoder (frozen) over Whisper log-mel
  features; the encoder wants fixed windows (30 s for the real ones), so every item is cut into windows, each
  padded with silence exactly as Whisper does, and only the frames that cover real audio are kept: an item's
  tokens never depend on the other items in the batch.
- `CNNImageTower`, `CNNAudioTower`: small trainable towers for the offline demo.
- Video: any image encoder's `encode_video` runs the frames through the image tower, then
  `omniret_kernels.video_to_tokens` reduces (frames, h, w) trilinearly to the configured grid.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omniret.config import BackboneConfig, OmniRetConfig
from omniret.fingerprint import hash_tensors
from omniret.model import media
from omniret.model.backbones import from_pretrained_kwargs, read_local_config, resolve_backbone_path, torch_dtype
from omniret_kernels import video_to_tokens

__all__ = ["MediaEncoder", "SiglipImageEncoder", "WhisperAudioEncoder", "CNNImageTower", "CNNAudioTower",
           "build_encoder", "cu_seqlens_from_lengths"]


def cu_seqlens_from_lengths(lengths: Sequence[int], device=None) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu.to(device) if device is not None else cu


class MediaEncoder(nn.Module):
    modality: str = ""
    out_dim: int
    trainable: bool = False

    def __init__(self, bb: BackboneConfig, cfg: OmniRetConfig):
        super().__init__()
        self.backbone_config = bb
        self.model_config = cfg
        self._fingerprint: Optional[str] = None

    # interface ------------------------------------------------------------------------------------------
    def preprocess(self, raw, name: str):
        raise NotImplementedError

    def encode(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # helpers --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _load_from_state_dict(self, *args, **kwargs):
        self._fingerprint = None  # new weights, new identity
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._fingerprint = None  # .to(dtype) / .half() change what the encoder computes
        return super()._apply(fn, *args, **kwargs)

    def fingerprint(self) -> str:
        """Identity of the encoder for the feature cache: class, architecture, source and a hash of the
        weights (computed once; frozen encoders do not change)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(type(self).__name__.encode())
            h.update(json.dumps(self.backbone_config.arch, sort_keys=True, default=str).encode())
            h.update(str(self.backbone_config.path).encode())
            hash_tensors(h, self.state_dict().items())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class _ImageEncoderMixin:
    """Images and video share the tower: `grid` is the (height, width) layout of its tokens."""

    image_size: int
    grid: tuple[int, int]

    def preprocess(self, raw, name: str = "image") -> torch.Tensor:
        return media.load_image(raw, self.image_size, name=name)

    def preprocess_video(self, raw, name: str = "video") -> torch.Tensor:
        cfg = self.model_config
        return media.load_video(raw, cfg.video_num_frames, self.image_size, name=name)

    def encode_video(self, videos: list) -> tuple[torch.Tensor, torch.Tensor]:
        """videos: list of (T_i, 3, S, S) -> packed (n * t * h * w, D) reduced to `video_grid`, cu_seqlens."""
        frames = list(torch.cat(list(videos), dim=0).unbind(0))
        tokens, _ = self.encode(frames)
        per_frame = self.grid[0] * self.grid[1]
        out, start = [], 0
        grid = tuple(int(g) for g in self.model_config.video_grid)
        for v in videos:
            n = v.shape[0] * per_frame
            feats = tokens[start:start + n].reshape(v.shape[0], self.grid[0], self.grid[1], -1)
            out.append(video_to_tokens(feats, grid))
            start += n
        return torch.cat(out, dim=0), cu_seqlens_from_lengths([o.shape[0] for o in out], tokens.device)


class SiglipImageEncoder(_ImageEncoderMixin, MediaEncoder):
    modality = "image"

    def __init__(self, bb: BackboneConfig, cfg: OmniRetConfig):
        super().__init__(bb, cfg)
        from transformers import SiglipVisionConfig, SiglipVisionModel

        path = resolve_backbone_path(bb, "image_encoder")
        if path is None:
            tower = SiglipVisionModel(SiglipVisionConfig(**bb.arch)).to(torch_dtype(bb.dtype))
        else:
            tower = SiglipVisionModel.from_pretrained(path, **from_pretrained_kwargs(path, bb.dtype))
        self.tower = tower
        vc = tower.config
        self.image_size = int(vc.image_size)
        side = self.image_size // int(vc.patch_size)
        self.grid = (side, side)
        self.out_dim = int(vc.hidden_size)
        self.trainable = bool(bb.trainable)

    def encode(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack(list(batch)).to(self.device, self.dtype)
        x = (x - 0.5) / 0.5  # SigLIP's processor: mean = std = 0.5
        h = self.tower(pixel_values=x).last_hidden_state  # (B, P, D)
        B, P, D = h.shape
        return h.reshape(B * P, D), cu_seqlens_from_lengths([P] * B, h.device)


class WhisperAudioEncoder(MediaEncoder):
    """kind "whisper" (WhisperEncoder: 2x subsampling) or "qwen2_audio" (Qwen2AudioEncoder: 4x, with its average
    pooler)."""

    modality = "audio"

    def __init__(self, bb: BackboneConfig, cfg: OmniRetConfig):
        super().__init__(bb, cfg)
        path = resolve_backbone_path(bb, "audio_encoder")
        kwargs = from_pretrained_kwargs(path, bb.dtype) if path is not None else None
        if bb.kind == "whisper":
            from transformers import WhisperConfig, WhisperModel
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            if path is None:
                tower = WhisperEncoder(WhisperConfig(**bb.arch)).to(torch_dtype(bb.dtype))
            elif "WhisperEncoder" in read_local_config(path).get("architectures", []):
                tower = WhisperEncoder.from_pretrained(path, **kwargs)
            else:  # a full Whisper checkpoint: keep its encoder
                tower = WhisperModel.from_pretrained(path, **kwargs).get_encoder()
        elif bb.kind == "qwen2_audio":
            from transformers import Qwen2AudioEncoderConfig
            from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

            if path is None:
                tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**bb.arch)).to(torch_dtype(bb.dtype))
            else:
                tower = Qwen2AudioEncoder.from_pretrained(path, **kwargs)
        else:
            raise ValueError(f"audio_encoder.kind must be 'whisper' or 'qwen2_audio' here, got {bb.kind!r}")
        self.tower = tower
        self.kind = bb.kind
        tc = tower.config
        self.num_mel_bins = int(tc.num_mel_bins)
        self.window_frames = int(tc.max_source_positions) * 2
        self.window_samples = self.window_frames * cfg.audio_hop_length
        self.out_dim = int(tc.d_model)
        self.trainable = bool(bb.trainable)

    def preprocess(self, raw, name: str = "audio") -> torch.Tensor:
        cfg = self.model_config
        return media.load_audio(raw, cfg.audio_sample_rate, cfg.audio_max_seconds, name=name)

    def _valid_outputs(self, mel_frames: int) -> int:
        n = (mel_frames - 1) // 2 + 1  # conv2, stride 2
        if self.kind == "qwen2_audio":
            n = (n - 2) // 2 + 1  # average pooler, stride 2
        return max(1, n)

    def encode(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model_config
        windows, valid, owner = [], [], []
        for i, wave in enumerate(batch):
            n = wave.shape[0]
            for start in range(0, n, self.window_samples):
                piece = wave[start:start + self.window_samples]
                valid.append(self._valid_outputs(max(1, math.ceil(piece.shape[0] / cfg.audio_hop_length))))
                windows.append(F.pad(piece, (0, self.window_samples - piece.shape[0])))
                owner.append(i)
        waves = torch.stack(windows).to(self.device)
        mel = media.log_mel(waves, self.num_mel_bins, cfg.audio_n_fft, cfg.audio_hop_length, cfg.audio_sample_rate)
        h = self.tower(input_features=mel.to(self.dtype)).last_hidden_state  # (W, frames_out, D)
        pieces = [h[w, :valid[w]] for w in range(len(windows))]
        lengths = [0] * len(batch)
        for w, i in enumerate(owner):
            lengths[i] += valid[w]
        return torch.cat(pieces, dim=0), cu_seqlens_from_lengths(lengths, h.device)


class CNNImageTower(_ImageEncoderMixin, MediaEncoder):
    """conv3x3 -> GELU -> conv3x3 (stride) -> GELU -> grid tokens + learned positions -> LayerNorm. Trainable."""

    modality = "image"

    def __init__(self, bb: BackboneConfig, cfg: OmniRetConfig):
        super().__init__(bb, cfg)
        a = dict(image_size=8, channels=(32, 64), stride=2)
        a.update(bb.arch)
        c1, c2 = a["channels"]
        self.image_size = int(a["image_size"])
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=int(a["stride"]), padding=1)
        side = (self.image_size - 1) // int(a["stride"]) + 1
        self.grid = (side, side)
        self.positions = nn.Parameter(torch.randn(side * side, c2) * 0.02)
        self.norm = nn.LayerNorm(c2)
        self.out_dim = c2
        self.trainable = bool(bb.trainable)

    def encode(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack(list(batch)).to(self.device, self.dtype)
        x = (x - 0.5) / 0.5
        h = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # (B, C, g, g)
        tokens = self.norm(h.flatten(2).transpose(1, 2) + self.positions)  # (B, P, C)
        B, P, C = tokens.shape
        return tokens.reshape(B * P, C), cu_seqlens_from_lengths([P] * B, tokens.device)


def _sinusoid(n: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out


class CNNAudioTower(MediaEncoder):
    """log-mel -> conv1d (stride) -> GELU -> conv1d (stride) -> GELU -> time tokens + sinusoidal positions ->
    LayerNorm. Trainable. Items are zero-padded together; the padding is re-zeroed between the convolutions so
    an item's tokens equal those it gets alone. `arch["cmn"]`: subtract each item's mean log-mel per mel bin
    (mean normalisation, as speech front ends do for cepstra: a voice's or a channel's fixed spectral tilt is
    removed, which helps a small tower on unseen voices). `feature_augment`: None, or fn(log-mel (bins, frames)) ->
    log-mel, applied to each item (after the mean subtraction) in training mode only (set by
    the tower warm-up stage, omniret.train.tower_warmup.TowerWarmup, for its `feature_augment`)."""

    modality = "audio"

    def __init__(self, bb: BackboneConfig, cfg: OmniRetConfig):
        super().__init__(bb, cfg)
        a = dict(num_mel_bins=40, channels=(64, 64), stride=2, cmn=False, kernel_size=3)
        a.update(bb.arch)
        c1, c2 = a["channels"]
        self.cmn = bool(a["cmn"])
        self.num_mel_bins = int(a["num_mel_bins"])
        self.stride = int(a["stride"])
        k = int(a["kernel_size"])
        if k < 1 or k % 2 == 0:
            raise ValueError(f"cnn_audio kernel_size must be odd and >= 1, got {k}")
        self.conv1 = nn.Conv1d(self.num_mel_bins, c1, k, stride=self.stride, padding=k // 2)
        self.conv2 = nn.Conv1d(c1, c2, k, stride=self.stride, padding=k // 2)
        self.norm = nn.LayerNorm(c2)
        self.out_dim = c2
        self.trainable = bool(bb.trainable)
        self.feature_augment = None

    def preprocess(self, raw, name: str = "audio") -> torch.Tensor:
        cfg = self.model_config
        return media.load_audio(raw, cfg.audio_sample_rate, cfg.audio_max_seconds, name=name)

    def encode(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model_config
        mels = []
        for wave in batch:
            if wave.shape[0] < cfg.audio_n_fft // 2 + 1:  # the centred STFT needs this many samples
                wave = F.pad(wave, (0, cfg.audio_n_fft // 2 + 1 - wave.shape[0]))
            mel = media.log_mel(wave.to(self.device), self.num_mel_bins, cfg.audio_n_fft, cfg.audio_hop_length,
                                cfg.audio_sample_rate)
            if self.cmn:
                mel = mel - mel.mean(dim=1, keepdim=True)
            if self.training and self.feature_augment is not None:
                mel = self.feature_augment(mel)
            mels.append(mel)
        frames = [max(1, m.shape[1]) for m in mels]
        x = torch.zeros(len(mels), self.num_mel_bins, max(frames), device=self.device, dtype=self.dtype)
        for i, m in enumerate(mels):
            x[i, :, : m.shape[1]] = m
        n1 = [(f - 1) // self.stride + 1 for f in frames]
        h = F.gelu(self.conv1(x))
        keep = torch.arange(h.shape[2], device=h.device)[None, :] < torch.tensor(n1, device=h.device)[:, None]
        h = h * keep[:, None, :].to(h.dtype)
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # (B, F2, C)
        n2 = [(f - 1) // self.stride + 1 for f in n1]
        pos = _sinusoid(h.shape[1], h.shape[2], h.device).to(h.dtype)
        h = self.norm(h + pos)
        return torch.cat([h[i, :n] for i, n in enumerate(n2)], dim=0), cu_seqlens_from_lengths(n2, h.device)


def build_encoder(bb: BackboneConfig, cfg: OmniRetConfig) -> MediaEncoder:
    from omniret.model.precomputed import PRECOMPUTED_KINDS, PrecomputedFeatureEncoder

    builders = {**dict.fromkeys(PRECOMPUTED_KINDS, PrecomputedFeatureEncoder), "siglip": SiglipImageEncoder,
                "cnn_image": CNNImageTower, "whisper": WhisperAudioEncoder, "qwen2_audio": WhisperAudioEncoder,
                "cnn_audio": CNNAudioTower}
    if bb.kind not in builders:
        raise ValueError(f"unknown encoder kind {bb.kind!r}; known: {sorted(builders)}")
    enc = builders[bb.kind](bb, cfg)
    enc.requires_grad_(bool(bb.trainable))
    return enc
