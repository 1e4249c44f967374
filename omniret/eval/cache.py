"""Candidate embeddings cached on disk, keyed by the model and the exact pool, so a second evaluation (or the
index build after an evaluation) does not re-encode a large pool. Writes are atomic (temporary file, rename)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import torch


def fingerprint_model(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: any change of weights gives another cache key."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.state_dict().items()), key=lambda kv: kv[0]):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


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


class EmbeddingCache:
    def __init__(self, root: str):
        self.root = root
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.npy")

    def get(self, key: str):
        p = self.path(key)
        if os.path.exists(p):
            self.hits += 1
            return torch.from_numpy(np.load(p))
        return None

    def put(self, key: str, emb: torch.Tensor) -> None:
        os.makedirs(self.root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb.detach().cpu().float().numpy())
            os.replace(tmp, self.path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get_or_compute(self, key: str, compute):
        emb = self.get(key)
        if emb is None:
            self.misses += 1
            emb = torch.as_tensor(compute()).float()
            self.put(key, emb)
        return emb
