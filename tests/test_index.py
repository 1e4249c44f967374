"""The FAISS index bundle: exact search equals brute-force cosine, ANN recall is measured, save/load round trip."""
import json

import numpy as np
import pytest
import torch

from omniret.eval.index import SearchIndex, ann_recall, default_nlist
from omniret.eval.recall import top_k


def clustered(n, dim, seed, clusters=20):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_flat_index_is_exact_cosine():
    x = clustered(301, 24, 0) * np.random.default_rng(1).uniform(0.1, 5, size=(301, 1)).astype(np.float32)
    q = clustered(17, 24, 2)
    idx = SearchIndex.build(x, ids=[f"d{i}" for i in range(301)], kind="flat")
    scores, rows = idx.search(q, 7)
    ref_scores, ref_rows = top_k(torch.from_numpy(q).double(), torch.from_numpy(x).double(), 7)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5)
    # ties aside, the same rows in the same order
    same = rows == ref_rows.numpy()
    assert same.mean() > 0.99


@pytest.mark.parametrize("kind,params", [("ivf", {"nlist": 16, "nprobe": 16}), ("hnsw", {"m": 16, "ef_search": 200})])
def test_ann_with_full_search_budget_recovers_exact(kind, params):
    x, q = clustered(800, 32, 3), clustered(40, 32, 4)
    exact = SearchIndex.build(x, kind="flat")
    ann = SearchIndex.build(x, kind=kind, **params)
    # IVF probing every cell is exhaustive; HNSW with a wide beam on 800 points finds (almost) everything
    assert ann_recall(exact, ann, q, k=10) >= (1.0 if kind == "ivf" else 0.98)


def test_ivf_recall_drops_with_fewer_probes():
    x, q = clustered(2000, 32, 5, clusters=200), clustered(100, 32, 6, clusters=200)
    exact = SearchIndex.build(x, kind="flat")
    ivf = SearchIndex.build(x, kind="ivf", nlist=40, nprobe=1)
    low = ann_recall(exact, ivf, q, k=10)
    ivf.set_search_params(nprobe=40)
    assert ann_recall(exact, ivf, q, k=10) == 1.0
    assert low < 1.0


def test_bundle_round_trip(tmp_path):
    x = clustered(120, 8, 7)
    items = [{"modality": "image", "digit": i % 10, "path": f"img/{i}.png"} for i in range(120)]
    idx = SearchIndex.build(x, ids=[f"c{i}" for i in range(120)], items=items, kind="hnsw", m=8, ef_search=33,
                            model={"path": "model", "fingerprint": "abc"})
    idx.save(str(tmp_path / "bundle"))
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["kind"] == "hnsw" and meta["count"] == 120 and meta["model"]["fingerprint"] == "abc"
    back = SearchIndex.load(str(tmp_path / "bundle"))
    assert back.ids == idx.ids and back.items == items and back.params["ef_search"] == 33
    q = clustered(9, 8, 8)
    s1, r1 = idx.search(q, 5)
    s2, r2 = back.search(q, 5)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2)
    # saving again over an existing bundle replaces it
    SearchIndex.build(x[:10], kind="flat").save(str(tmp_path / "bundle"))
    assert len(SearchIndex.load(str(tmp_path / "bundle"))) == 10


def test_bad_inputs(tmp_path):
    x = clustered(50, 8, 9)
    with pytest.raises(ValueError, match="kind"):
        SearchIndex.build(x, kind="lsh")
    with pytest.raises(ValueError, match="embeddings"):
        SearchIndex.build(np.full((3, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        SearchIndex.build(np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="ids"):
        SearchIndex.build(x, ids=["a"] * 50)
    with pytest.raises(ValueError, match="nlist"):
        SearchIndex.build(x, kind="ivf", nlist=51)
    idx = SearchIndex.build(x)
    with pytest.raises(ValueError, match="queries"):
        idx.search(np.ones((2, 7), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="bundle"):
        SearchIndex.load(str(tmp_path))
    assert default_nlist(10) == 1 and default_nlist(100000) == int(4 * 100000 ** 0.5)
