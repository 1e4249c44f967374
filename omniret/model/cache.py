"""On-disk cache of frozen-encoder features: one safetensors file per item, keyed by the hash of the item's
preprocessed content and the encoder's fingerprint (architecture + weights), so a changed input or encoder never
reads a stale entry. Writes go through omniret.files.atomic_path (temporary file in the same directory, fsync,
rename): an interrupted run leaves either a whole entry or none. An unreadable entry is recomputed."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch

from omniret.files import atomic_path

__all__ = ["FeatureCache", "content_key"]


def content_key(encoder_fingerprint: str, kind: str, x: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha256()
    for part in (encoder_fingerprint, kind, extra, str(x.dtype), str(tuple(x.shape))):
        h.update(part.encode())
        h.update(b"\0")
    h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    def __init__(self, root):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Optional[torch.Tensor]:
        from safetensors.torch import load_file

        f = self._file(key)
        if not f.is_file():
            return None
        try:
            return load_file(str(f))["features"]
        except Exception:  # a foreign or damaged file: recompute and overwrite it
            return None

    def put(self, key: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        with atomic_path(self._file(key)) as tmp:
            save_file({"features": features.detach().to("cpu").contiguous()}, str(tmp))

    def get_or_compute(self, keys: list, compute: Callable[[list], list]) -> list:
        """Features for each key; `compute(indices)` returns the features of the missing items (in order)."""
        found = [self.get(k) for k in keys]
        first = {}  # each missing key is computed once, even when the batch repeats an item
        for i, f in enumerate(found):
            if f is None:
                first.setdefault(keys[i], i)
        missing = list(first.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = {}
            for i, feats in zip(missing, compute(missing)):
                self.put(keys[i], feats)
                computed[keys[i]] = feats.detach().to("cpu")
            found = [computed[k] if f is None else f for k, f in zip(keys, found)]
        return found
