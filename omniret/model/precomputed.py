"""Media encoders whose tokens were computed ahead of time by a frozen pretrained network (the `real` preset).

The paper keeps its media encoders frozen, so their tokens are a fixed function of the file: the real benchmark
runs EfficientNet-Lite0 (images, 49 x 1280) and Whisper tiny.en's encoder (audio, T x 384) once per file
(omniret.data.frozen_features) and a training step only reads the result. `preprocess(path)` looks a file's
tokens up in the process's FeatureStore (computing and caching them on a miss); `encode` packs them. There is
no second cache: the model's own FeatureCache (omniret.model.cache) is skipped for these encoders (`cacheable`).

An item may also give the tokens themselves, a (T, width) array or tensor, for features extracted elsewhere.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from omniret.config import BackboneConfig, OmniRetConfig
from omniret.data.frozen_features import ENCODERS as FROZEN_ENCODERS, feature_store
from omniret.model.encoders import MediaEncoder, cu_seqlens_from_lengths

__all__ = ["PrecomputedFeatureEncoder", "PRECOMPUTED_KINDS"]

# kind -> (modality, token width), from the frozen encoders that compute the features
PRECOMPUTED_KINDS = {kind: (encoder.modality, encoder.width) for kind, encoder in FROZEN_ENCODERS.items()}


class PrecomputedFeatureEncoder(MediaEncoder):
    """kind "efficientnet_lite0" (image), "whisper_tiny_en" or "speech_embedding" (audio): PRECOMPUTED_KINDS.
    `BackboneConfig.path`: the feature cache directory (None: $OMNIRET_CACHE/features, default
    ~/.cache/omniret/features)."""

    trainable = False
    cacheable = False  # the features come from a cache already

    def __init__(self, bb: BackboneConfig, cfg: OmniRetConfig):
        super().__init__(bb, cfg)
        if bb.kind not in PRECOMPUTED_KINDS:
            raise ValueError(f"unknown precomputed encoder kind {bb.kind!r}; known: {sorted(PRECOMPUTED_KINDS)}")
        if bb.trainable:
            raise ValueError(f"{bb.kind}: precomputed features cannot train (trainable must be false)")
        self.modality, self.out_dim = PRECOMPUTED_KINDS[bb.kind]
        self.cache_dir = bb.path
        # no weights: a buffer carries the device and dtype the packed tokens move to
        self.register_buffer("_anchor", torch.zeros((), dtype=torch.float32), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def _store(self):
        return feature_store(self.modality, self.cache_dir, kind=self.backbone_config.kind)

    def preload(self, paths: list, progress: bool = True) -> None:
        """Look up (or compute) the features of many files at once, batched: before training or evaluation."""
        self._store().preload([os.fspath(p) for p in paths], progress=progress)

    def preprocess(self, raw, name: str = "media") -> torch.Tensor:
        if isinstance(raw, (str, os.PathLike)):
            path = os.fspath(raw)
            if not os.path.isfile(path):
                raise ValueError(f"{name}: no such {self.modality} file {path!r}")
            feats = self._store().get(path)
        elif isinstance(raw, (np.ndarray, torch.Tensor)):
            feats = raw
        else:
            raise ValueError(f"{name}: the {self.backbone_config.kind} encoder takes a file path or its (tokens, "
                             f"{self.out_dim}) features, got {type(raw).__name__}")
        x = torch.as_tensor(feats).to(torch.float32)
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != self.out_dim:
            raise ValueError(f"{name}: features of shape {tuple(x.shape)}; the {self.backbone_config.kind} encoder "
                             f"gives (tokens >= 1, {self.out_dim})")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: its {self.modality} features hold NaN or Inf")
        return x

    def encode(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch:
            raise ValueError("encode: empty batch")
        tokens = torch.cat([x.to(self.device, self.dtype) for x in batch], dim=0)
        return tokens, cu_seqlens_from_lengths([x.shape[0] for x in batch], self.device)
