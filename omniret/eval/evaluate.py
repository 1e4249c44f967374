"""Run retrieval tasks end to end: encode each candidate pool once (cached on disk), encode each task's
queries, score Recall@k per task and per task group, and render the results as JSON and markdown."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from omniret.eval.cache import EmbeddingCache, fingerprint_items
from omniret.files import atomic_write_json, atomic_write_text
from omniret.eval.recall import hits_at_k, relevance_mask

Encoder = Callable[[list], torch.Tensor]


@dataclass
class Pool:
    """A candidate pool: items as `encode_corpus` takes them."""
    name: str
    items: list
    ids: list | None = None


@dataclass
class EvalTask:
    name: str
    queries: list  # items as `encode_queries` takes them (each may carry its `instruction`)
    pool: str  # name of the Pool searched
    relevant: object  # (Q, C) bool tensor, or one iterable of relevant candidate indices per query
    ks: Sequence[int] = (1, 5)
    group: str = "all"
    primary_k: int = 5


@dataclass
class Results:
    tasks: dict = field(default_factory=dict)  # task -> {"R@1": .., "R@5": ..}
    details: dict = field(default_factory=dict)  # task -> {"group", "queries", "candidates", "pool", "primary"}
    hits: dict = field(default_factory=dict)  # task -> {k: (Q,) bool}, for analysis (not serialised)
    query_embeddings: dict = field(default_factory=dict)  # task -> (Q, E), kept for index checks (not serialised)
    pool_embeddings: dict = field(default_factory=dict)  # pool -> (C, E) (not serialised)

    def groups(self) -> dict:
        """Mean of each metric over the tasks of a group, and of each task's primary metric."""
        out: dict = {}
        for task, metrics in self.tasks.items():
            g = self.details[task]["group"]
            bucket = out.setdefault(g, {"tasks": [], "metrics": {}})
            bucket["tasks"].append(task)
            for name, v in metrics.items():
                bucket["metrics"].setdefault(name, []).append(v)
            bucket["metrics"].setdefault("primary", []).append(metrics[self.details[task]["primary"]])
        return {g: {"tasks": b["tasks"], **{m: sum(v) / len(v) for m, v in b["metrics"].items()}}
                for g, b in out.items()}

    def to_json(self, **extra) -> dict:
        return {"tasks": self.tasks, "groups": self.groups(), "details": self.details, **extra}

    def to_markdown(self, title: str | None = None) -> str:
        metrics = sorted({m for v in self.tasks.values() for m in v}, key=lambda m: int(m.split("@")[1]))
        lines = [f"## {title}", ""] if title else []
        lines += ["| task | group | " + " | ".join(metrics) + " | queries | candidates |",
                  "|---|---|" + "---:|" * len(metrics) + "---:|---:|"]
        for task, vals in self.tasks.items():
            d = self.details[task]
            cells = [f"{100 * vals[m]:.1f}" if m in vals else "-" for m in metrics]
            lines.append(f"| {task} | {d['group']} | " + " | ".join(cells) + f" | {d['queries']} | {d['candidates']} |")
        groups = self.groups()
        if len(groups) > 1 or any(len(g["tasks"]) > 1 for g in groups.values()):
            lines += ["", "| group | tasks | " + " | ".join(metrics) + " | primary |",
                      "|---|---:|" + "---:|" * len(metrics) + "---:|"]
            for g, vals in groups.items():
                cells = [f"{100 * vals[m]:.1f}" if m in vals else "-" for m in metrics]
                lines.append(f"| {g} | {len(vals['tasks'])} | " + " | ".join(cells) + f" | {100 * vals['primary']:.1f} |")
        lines.append("")
        lines.append("Recall@k in percent: share of queries with a relevant candidate in their top k "
                     "(cosine similarity). Primary: R@10 for fashion sets, R@5 otherwise.")
        return "\n".join(lines) + "\n"


def encode_pool(pool: Pool, encode_corpus: Encoder, cache: EmbeddingCache | None, model_key: str) -> torch.Tensor:
    if not pool.items:
        raise ValueError(f"pool {pool.name!r} is empty")
    if cache is None:
        return torch.as_tensor(encode_corpus(pool.items)).float()
    key = f"{pool.name.replace('/', '_')}-{model_key}-{fingerprint_items(pool.items)}"
    ids = pool.ids if pool.ids is not None else range(len(pool.items))
    return cache.get_or_compute(key, lambda: encode_corpus(pool.items), ids=list(ids))


def evaluate(tasks: Sequence[EvalTask], pools: dict, encode_queries: Encoder, encode_corpus: Encoder,
             cache: EmbeddingCache | None = None, model_key: str = "", log=print) -> Results:
    """Recall@k for every task. Each pool is encoded once however many tasks search it."""
    if not tasks:
        raise ValueError("tasks is empty: nothing to evaluate")
    missing = sorted({t.pool for t in tasks} - set(pools))
    if missing:
        raise ValueError(f"tasks search pools that were not given: {missing}")
    pool_emb = {}
    results = Results()
    for task in tasks:
        if task.pool not in pool_emb:
            t0 = time.perf_counter()
            pool_emb[task.pool] = encode_pool(pools[task.pool], encode_corpus, cache, model_key)
            log(f"pool {task.pool}: {len(pools[task.pool].items)} candidates in {time.perf_counter() - t0:.1f}s")
        if not task.queries:
            raise ValueError(f"task {task.name!r} has no queries")
        cand = pool_emb[task.pool]
        q = torch.as_tensor(encode_queries(task.queries)).float()
        mask = relevance_mask(task.relevant, q.shape[0], cand.shape[0])
        ks = sorted(set(task.ks) | {task.primary_k})
        hits = hits_at_k(q, cand, mask, ks)
        results.tasks[task.name] = {f"R@{k}": float(h.float().mean()) for k, h in hits.items()}
        results.details[task.name] = {"group": task.group, "queries": int(q.shape[0]), "candidates": int(cand.shape[0]),
                                      "pool": task.pool, "primary": f"R@{task.primary_k}",
                                      "queries_without_relevant": int((~mask.any(dim=1)).sum())}
        results.hits[task.name] = hits
        results.query_embeddings[task.name] = q
    results.pool_embeddings = pool_emb
    return results


def write_results(results: Results, json_path: str | None = None, md_path: str | None = None,
                  title: str | None = None, **extra) -> None:
    """results.json and results.md, each written atomically (a kill or a full disk leaves the old file)."""
    if json_path:
        atomic_write_json(json_path, results.to_json(**extra), indent=2)
    if md_path:
        atomic_write_text(md_path, results.to_markdown(title))
