"""A FAISS index over `encode_corpus` embeddings, saved as one directory bundle:

    bundle.json    format version, index kind and parameters, dimension, count, the model reference
    index.faiss    the FAISS index (inner product on L2-normalised vectors = cosine similarity)
    ids.json       the id of every row, in order
    items.jsonl    one metadata record per row (what `search` prints: text, media paths, labels ...)

Kinds: "flat" (exact), "ivf" (inverted lists, `nlist` cells, `nprobe` searched) and "hnsw" (graph, `m`
links, `ef_search`). `ann_recall` measures an approximate index against exact search on the same vectors.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from omniret.errors import InputError
from omniret.files import (atomic_path, atomic_write_json, atomic_write_text, dumps_lines, interrupted_replacements,
                           replace_directory)

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a declared dependency
        raise RuntimeError("the index needs faiss: pip install faiss-cpu") from exc
    return faiss


def _check_vectors(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (count, dim) array, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dim {x.shape[1]} but the index has dim {dim}")
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero row, which has no direction to compare")
    return x / norms


def default_nlist(count: int) -> int:
    """About 4 sqrt(N) cells, but at least 39 training points per cell (FAISS's own rule of thumb)."""
    return max(1, min(int(4 * math.sqrt(count)), count // 39))


@dataclass
class SearchIndex:
    kind: str = "flat"
    params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # e.g. {"path": ..., "preset": ..., "fingerprint": ...}
    ids: list = field(default_factory=list)
    items: list = field(default_factory=list)
    index: object = None
    dim: int = 0

    @classmethod
    def build(cls, embeddings, ids=None, items=None, kind: str = "flat", model: dict | None = None,
              nlist: int | None = None, nprobe: int | None = None, m: int = 32, ef_search: int = 64,
              seed: int = 0) -> "SearchIndex":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        x = _check_vectors(embeddings, "embeddings")
        n, dim = x.shape
        ids = list(range(n)) if ids is None else list(ids)
        items = [{} for _ in range(n)] if items is None else list(items)
        if len(ids) != n or len(items) != n:
            raise ValueError(f"ids ({len(ids)}) and items ({len(items)}) must have one entry per embedding ({n})")
        if len(set(map(str, ids))) != n:
            raise ValueError("ids must be unique")
        faiss = _faiss()
        params: dict = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = default_nlist(n) if nlist is None else int(nlist)
            if not 1 <= nlist <= n:
                raise ValueError(f"nlist must be in 1..{n} (the number of vectors), got {nlist}")
            nprobe = max(1, nlist // 8) if nprobe is None else int(nprobe)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(x)
            index.nprobe = min(nprobe, nlist)
            params = {"nlist": nlist, "nprobe": int(index.nprobe)}
        else:
            index = faiss.IndexHNSWFlat(dim, int(m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = int(ef_search)
            params = {"m": int(m), "ef_search": int(ef_search)}
        index.add(x)
        return cls(kind=kind, params=params, model=dict(model or {}), ids=ids, items=items, index=index, dim=dim)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), row indices (Q, k)), best first; rows are -1 where fewer than k were found."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _check_vectors(queries, "queries", self.dim)
        scores, rows = self.index.search(q, min(k, len(self)))
        return scores, rows

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None and self.kind == "ivf":
            self.index.nprobe = int(nprobe)
            self.params["nprobe"] = int(nprobe)
        if ef_search is not None and self.kind == "hnsw":
            self.index.hnsw.efSearch = int(ef_search)
            self.params["ef_search"] = int(ef_search)

    def save(self, path: str) -> None:
        """Write the bundle into a new directory beside `path`, then swap it in (omniret.files.replace_directory:
        the old bundle is deleted only once the new one is in place). An existing `path` that is not a bundle
        (no bundle.json) is refused, not deleted."""
        faiss = _faiss()

        def write(tmp) -> None:
            with atomic_path(tmp / "index.faiss") as f:
                faiss.write_index(self.index, str(f))
            atomic_write_json(tmp / "ids.json", self.ids)
            atomic_write_text(tmp / "items.jsonl", dumps_lines(self.items))
            # the manifest last: a directory with bundle.json is a complete bundle
            atomic_write_json(tmp / MANIFEST, {
                "format_version": FORMAT_VERSION, "kind": self.kind, "params": self.params, "dim": self.dim,
                "count": len(self), "metric": "cosine (inner product, L2-normalised)", "model": self.model},
                indent=2)

        replace_directory(path, write, MANIFEST, what="an index bundle")

    @classmethod
    def load(cls, path: str) -> "SearchIndex":
        meta_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(meta_path):
            old = interrupted_replacements(path)
            hint = (f"; an interrupted write left the previous bundle at {old[-1]}" if old else
                    "; build one with `omniret index`")
            raise FileNotFoundError(f"{path} is not an index bundle (no {MANIFEST}){hint}")
        meta = _read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise InputError(f"{path}: bundle format {version} is not {FORMAT_VERSION}")
        faiss_path = os.path.join(path, "index.faiss")
        if not os.path.isfile(faiss_path):
            raise InputError(f"{faiss_path}: missing; rebuild the bundle with `omniret index`")
        try:
            index = _faiss().read_index(faiss_path)
        except RuntimeError as exc:  # FAISS reports a damaged file as a RuntimeError with its C++ trace
            raise InputError(f"{faiss_path}: not a readable FAISS index ({str(exc).splitlines()[-1][:200]}); "
                             "rebuild the bundle with `omniret index`") from None
        ids = _read_json(os.path.join(path, "ids.json"))
        items = []
        items_path = os.path.join(path, "items.jsonl")
        with open(items_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except ValueError as exc:
                        raise InputError(f"{items_path}:{n}: not valid JSON ({exc})") from None
        if not isinstance(ids, list) or index.ntotal != len(ids) or len(items) != len(ids):
            count = len(ids) if isinstance(ids, list) else "no list of"
            raise InputError(f"{path}: index holds {index.ntotal} vectors but {count} ids and {len(items)} items")
        try:
            out = cls(kind=meta["kind"], params=meta.get("params", {}), model=meta.get("model", {}), ids=ids,
                      items=items, index=index, dim=int(meta["dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{meta_path}: bad field {exc}") from None
        out.set_search_params(nprobe=out.params.get("nprobe"), ef_search=out.params.get("ef_search"))
        return out

    def check_model(self, fingerprint: str, allow_mismatch: bool = False, warn=None) -> None:
        """Refuse to search with a model other than the one whose embeddings the bundle holds: its scores would
        be meaningless (same dimension or not). `allow_mismatch` turns the refusal into a `warn` call."""
        stored = self.model.get("fingerprint")
        if stored is None:
            problem = "records no model fingerprint, so the model cannot be checked"
        elif stored != fingerprint:
            problem = f"was built by a model with weight fingerprint {stored}, not this one ({fingerprint})"
        else:
            return
        if allow_mismatch or stored is None:
            if warn is not None:
                warn(f"warning: the index bundle {problem}")
            return
        raise InputError(f"the index bundle {problem}; search with the model that built it (--model), rebuild "
                         "the bundle, or pass --allow-model-mismatch")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def ann_recall(exact: SearchIndex, approximate: SearchIndex, queries, k: int = 10) -> float:
    """Share of the exact top-k rows that the approximate index also returns in its top k (recall of ANN
    against exact search, averaged over queries)."""
    if len(exact) != len(approximate):
        raise ValueError(f"the indexes hold different numbers of vectors: {len(exact)} vs {len(approximate)}")
    _, truth = exact.search(queries, k)
    _, found = approximate.search(queries, k)
    per_query = [len(set(t[t >= 0]) & set(f[f >= 0])) / max(1, int((t >= 0).sum())) for t, f in zip(truth, found)]
    return float(np.mean(per_query))
