"""Candidate embeddings cached on disk, keyed by the model and the exact pool, so a second evaluation (or the
index build after an evaluation) does not re-encode a large pool. Writes go through omniret.files (atomic); a
cached file is used only when its rows and ids are the pool's."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch

from omniret.files import atomic_savez
from omniret.fingerprint import fingerprint_model  # noqa: F401  (the cache key of a model; defined once there)


def _describe(value) -> object:
    """A JSON-able description of an item field: tensors and arrays by content digest, paths with mtime+size."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    if isinstance(value, np.ndarray):
        return ["array", str(value.dtype), list(value.shape), hashlib.sha1(value.tobytes()).hexdigest()]
    if isinstance(value, str) and os.path.isfile(value):
        st = os.stat(value)
        return ["file", os.path.abspath(value), st.st_size, int(st.st_mtime)]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in sorted(value.items())}
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def fingerprint_items(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(_describe(item), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


class EmbeddingCache:
    """`{root}/{key}.npz` holding `embeddings` (rows, dim) float32 and `ids` (one string per row). A file whose
    rows or ids disagree with the pool asked for, or that does not load (0 bytes, torn, foreign), is recomputed
    with a one-line notice (`notify`), never used."""

    def __init__(self, root: str, notify: Callable[[str], None] = _notice):
        self.root = root
        self.notify = notify
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.npz")

    def get(self, key: str, ids: Sequence | None = None) -> torch.Tensor | None:
        """The cached embeddings of `key`, or None when there are none that fit `ids` (the pool's row ids)."""
        p = self.path(key)
        if not os.path.exists(p):
            return None
        try:
            with np.load(p, allow_pickle=False) as f:
                emb, stored = f["embeddings"], [str(i) for i in f["ids"].tolist()]
            if emb.ndim != 2 or len(stored) != emb.shape[0]:
                raise ValueError(f"embeddings of shape {emb.shape} with {len(stored)} ids")
        except Exception as exc:  # 0 bytes, torn, a foreign file: recompute (and overwrite it)
            self.notify(f"embedding cache {p}: unreadable ({type(exc).__name__}: {exc}); recomputing")
            return None
        if ids is not None and stored != [str(i) for i in ids]:
            self.notify(f"embedding cache {p}: holds {len(stored)} rows whose ids do not match the pool's "
                        f"{len(ids)}; recomputing")
            return None
        self.hits += 1
        return torch.from_numpy(emb)

    def put(self, key: str, emb: torch.Tensor, ids: Sequence | None = None) -> None:
        emb = emb.detach().cpu().float().numpy()
        ids = [str(i) for i in (range(emb.shape[0]) if ids is None else ids)]
        if len(ids) != emb.shape[0]:
            raise ValueError(f"ids: {len(ids)} for {emb.shape[0]} embedding rows")
        atomic_savez(self.path(key), embeddings=emb, ids=np.array(ids, dtype=str))

    def get_or_compute(self, key: str, compute, ids: Sequence | None = None) -> torch.Tensor:
        """Cached embeddings for `key` whose ids are `ids`, else `compute()` (stored for next time)."""
        emb = self.get(key, ids)
        if emb is None:
            self.misses += 1
            emb = torch.as_tensor(compute()).float()
            if ids is not None and emb.shape[0] != len(ids):
                raise ValueError(f"the encoder returned {emb.shape[0]} embeddings for {len(ids)} items")
            self.put(key, emb, ids)
        return emb
