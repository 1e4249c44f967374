"""Recall@k as a hit rate (the M-BEIR protocol, SPEC section 6): a query scores 1 when any relevant candidate is
among its top k by cosine similarity, averaged over the task's queries."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

# FashionIQ and Fashion200K report Recall@10, every other M-BEIR task Recall@5 (paper section 5.1).
FASHION_DATASETS = ("fashioniq", "fashion200k")


def primary_k(dataset_name: str) -> int:
    name = dataset_name.lower().replace("-", "").replace("_", "")
    return 10 if any(f in name for f in FASHION_DATASETS) else 5


def _as_embeddings(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (count, dim) array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: nothing to search with or in")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t.float()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def relevance_mask(relevant, num_queries: int, num_candidates: int) -> torch.Tensor:
    """(Q, C) bool from a bool mask or from one iterable of relevant candidate indices per query."""
    if isinstance(relevant, torch.Tensor) and relevant.dtype == torch.bool:
        if tuple(relevant.shape) != (num_queries, num_candidates):
            raise ValueError(f"relevant must have shape ({num_queries}, {num_candidates}), got {tuple(relevant.shape)}")
        return relevant
    rows = list(relevant)
    if len(rows) != num_queries:
        raise ValueError(f"relevant must list the relevant candidates of each of the {num_queries} queries, "
                         f"got {len(rows)} lists")
    mask = torch.zeros(num_queries, num_candidates, dtype=torch.bool)
    for i, row in enumerate(rows):
        idx = torch.as_tensor(list(row), dtype=torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_candidates):
            raise ValueError(f"relevant[{i}] names a candidate outside 0..{num_candidates - 1}")
        mask[i, idx] = True
    return mask


def top_k(query_emb, cand_emb, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: (scores (Q, k'), indices (Q, k')) with k' = min(k, C), best first."""
    q = normalize(_as_embeddings(query_emb, "query_emb"))
    c = normalize(_as_embeddings(cand_emb, "cand_emb"))
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query_emb has dim {q.shape[1]} but cand_emb has dim {c.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, c.shape[0])
    scores, indices = [], []
    for r in range(0, q.shape[0], chunk):
        s, i = torch.topk(q[r:r + chunk] @ c.T, k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def hits_at_k(query_emb, cand_emb, relevant, ks: Sequence[int] = (1, 5), chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Per query and k: whether a relevant candidate is among the top k. {k: (Q,) bool}."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    q = _as_embeddings(query_emb, "query_emb")
    c = _as_embeddings(cand_emb, "cand_emb")
    mask = relevance_mask(relevant, q.shape[0], c.shape[0])
    _, idx = top_k(q, c, ks[-1], chunk)
    found = torch.gather(mask, 1, idx)  # (Q, k'): is the r-th ranked candidate relevant
    return {k: found[:, :k].any(dim=1) for k in ks}


def recall_at_k(query_emb, cand_emb, relevant, ks: Sequence[int] = (1, 5), chunk: int = 1024) -> dict[int, float]:
    """Recall@k hit rate for each k: {k: fraction of queries with a relevant candidate in their top k}."""
    return {k: float(h.float().mean()) for k, h in hits_at_k(query_emb, cand_emb, relevant, ks, chunk).items()}


def modality_set(modalities: str | Iterable[str]) -> frozenset:
    if isinstance(modalities, str):
        modalities = modalities.replace("+", ",").split(",")
    return frozenset(m.strip() for m in modalities if m.strip())


def task_group(query_modalities, candidate_modalities) -> str:
    """The columns of the paper's Table 2 (and Table 4's audio-visual tasks):
    uni-modality (same single modality), textual binding (text <-> one other modality), cross-media (two
    non-text modalities, e.g. audio -> image) and composed (several modalities on either side)."""
    q, c = modality_set(query_modalities), modality_set(candidate_modalities)
    if len(q) > 1 or len(c) > 1:
        return "composed"
    if q == c:
        return "uni-modality"
    if "text" in q | c:
        return "textual binding"
    return "cross-media"
