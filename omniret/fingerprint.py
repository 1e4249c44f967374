"""The one definition of a model's weight fingerprint: a digest of every parameter and buffer (name, dtype, shape,
bytes). The embedding cache keys on it, index bundles record it (and `omniret search` checks it), and each
encoder's feature-cache identity is built on it."""
from __future__ import annotations

import hashlib
from typing import Iterable, Tuple

import torch

__all__ = ["hash_tensors", "fingerprint_model"]


def hash_tensors(h, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Feed `(name, tensor)` pairs, in name order, into the hashlib object `h`."""
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_model(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: any change of weights gives another fingerprint."""
    h = hashlib.sha256()
    hash_tensors(h, model.state_dict().items())
    return h.hexdigest()[:24]
