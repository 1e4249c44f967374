"""Recall@k, the evaluation loop, its embedding cache and the results table, with stand-in embeddings."""
import json

import pytest
import torch

from omniret.eval.cache import EmbeddingCache, fingerprint_items, fingerprint_model
from omniret.eval.evaluate import EvalTask, Pool, evaluate, write_results
from omniret.eval.recall import hits_at_k, primary_k, recall_at_k, relevance_mask, task_group, top_k


def brute_force_recall(q, c, relevant, k):
    """Recall@k written the slow, obvious way: rank every candidate by cosine, look at the first k."""
    hits = 0
    for i in range(q.shape[0]):
        sims = [float(torch.nn.functional.cosine_similarity(q[i], c[j], dim=0)) for j in range(c.shape[0])]
        order = sorted(range(c.shape[0]), key=lambda j: -sims[j])
        hits += any(j in relevant[i] for j in order[:k])
    return hits / q.shape[0]


@pytest.mark.parametrize("nq,nc,dim", [(7, 13, 5), (31, 50, 17), (3, 2, 4)])
def test_recall_matches_brute_force(nq, nc, dim):
    g = torch.Generator().manual_seed(nq * 100 + nc)
    q = torch.randn(nq, dim, generator=g, dtype=torch.float64) * 3
    c = torch.randn(nc, dim, generator=g, dtype=torch.float64) * torch.rand(nc, 1, generator=g, dtype=torch.float64)
    relevant = [set(torch.randperm(nc, generator=g)[: int(torch.randint(0, 4, (1,), generator=g))].tolist())
                for _ in range(nq)]
    ks = (1, 2, 5, 10)
    got = recall_at_k(q, c, relevant, ks, chunk=4)  # a chunk smaller than Q exercises the row blocks
    for k in ks:
        assert got[k] == pytest.approx(brute_force_recall(q, c, relevant, min(k, nc)))


def test_recall_is_a_hit_rate_not_a_fraction_of_relevant():
    # one query, three relevant candidates, one of them ranked first: R@1 is 1, not 1/3
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1], [-1.0, -0.1]])
    assert recall_at_k(q, c, [{0, 2, 3}], (1,))[1] == 1.0
    assert recall_at_k(q, c, [{2, 3}], (1, 2, 3))[3] == 1.0
    assert recall_at_k(q, c, [{2, 3}], (1, 2))[2] == 0.0


def test_recall_monotone_in_k_and_perfect_embeddings():
    labels = torch.arange(40) % 10
    emb = torch.nn.functional.one_hot(labels, 10).float() + 0.01 * torch.randn(40, 10)
    mask = labels[:, None] == labels[None, :]
    r = recall_at_k(emb, emb, mask, (1, 5))
    assert r[1] == 1.0 and r[5] == 1.0
    noisy = emb + 2 * torch.randn_like(emb)
    r = recall_at_k(noisy, emb, mask, (1, 3, 5, 40))
    assert r[1] <= r[3] <= r[5] <= r[40] == 1.0


def test_bad_inputs_raise_value_errors_naming_the_argument():
    q, c = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="query_emb"):
        recall_at_k(torch.randn(0, 4), c, [], (1,))
    with pytest.raises(ValueError, match="cand_emb"):
        recall_at_k(q, torch.full((5, 4), float("nan")), [[0]] * 3, (1,))
    with pytest.raises(ValueError, match="dim"):
        recall_at_k(q, torch.randn(5, 3), [[0]] * 3, (1,))
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(q, c, [[0]] * 2, (1,))
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(q, c, [[7]] * 3, (1,))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(q, c, [[0]] * 3, (0,))


def test_top_k_sorted_and_clamped():
    q, c = torch.randn(4, 6), torch.randn(3, 6)
    s, i = top_k(q, c, 10)
    assert s.shape == (4, 3) and (s[:, :-1] >= s[:, 1:]).all()
    assert torch.equal(torch.sort(i, dim=1).values, torch.arange(3).expand(4, 3))


def test_task_groups_and_primary_k():
    assert task_group("image", "image") == "uni-modality"
    assert task_group("text", "audio") == "textual binding"
    assert task_group("audio", "image") == "cross-media"
    assert task_group("image+text", "audio") == "composed"
    assert task_group("text", "image,text") == "composed"
    assert primary_k("fashioniq_task7") == 10 and primary_k("Fashion200K") == 10 and primary_k("cirr") == 5


class CountingEncoder:
    """A stand-in for encode_corpus / encode_queries: embeds `{"x": tensor}` items, counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, items):
        self.calls += 1
        return torch.stack([it["x"] for it in items])


def _toy_tasks(seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 16, generator=g)
    cand_labels = torch.arange(60) % 10
    cands = [{"x": centres[l] + 0.1 * torch.randn(16, generator=g)} for l in cand_labels]
    q_labels = torch.randint(0, 10, (25,), generator=g)
    good = [{"x": centres[l] + 0.1 * torch.randn(16, generator=g), "instruction": "find"} for l in q_labels]
    bad = [{"x": torch.randn(16, generator=g)} for _ in q_labels]
    mask = q_labels[:, None] == cand_labels[None, :]
    tasks = [EvalTask("good", good, "gallery", mask, (1, 5), group="textual binding"),
             EvalTask("random", bad, "gallery", mask, (1, 5), group="composed")]
    return tasks, {"gallery": Pool("gallery", cands)}


def test_evaluate_encodes_each_pool_once_and_caches_to_disk(tmp_path):
    tasks, pools = _toy_tasks()
    corpus, queries = CountingEncoder(), CountingEncoder()
    cache = EmbeddingCache(str(tmp_path / "cache"))
    res = evaluate(tasks, pools, queries, corpus, cache=cache, model_key="m1", log=lambda *a: None)
    assert corpus.calls == 1 and queries.calls == 2
    assert res.tasks["good"]["R@1"] == 1.0
    assert res.tasks["random"]["R@5"] < 0.9  # random queries: about 1 - (1 - 0.1)^5 = 0.41 expected
    # a second run with the same model key reads the pool embeddings from disk
    res2 = evaluate(tasks, pools, queries, corpus, cache=cache, model_key="m1", log=lambda *a: None)
    assert corpus.calls == 1 and cache.hits == 1
    assert res2.tasks == res.tasks
    # another model key (other weights) re-encodes
    evaluate(tasks, pools, queries, corpus, cache=cache, model_key="m2", log=lambda *a: None)
    assert corpus.calls == 2
    # the pool's content is part of the key too
    pools["gallery"].items[0] = {"x": torch.zeros(16) + 1}
    evaluate(tasks, pools, queries, corpus, cache=cache, model_key="m1", log=lambda *a: None)
    assert corpus.calls == 3


def test_results_json_and_markdown(tmp_path):
    tasks, pools = _toy_tasks(1)
    res = evaluate(tasks, pools, CountingEncoder(), CountingEncoder(), log=lambda *a: None)
    write_results(res, str(tmp_path / "r.json"), str(tmp_path / "r.md"), title="toy")
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["tasks"]) == {"good", "random"}
    assert set(data["tasks"]["good"]) == {"R@1", "R@5"}
    assert data["groups"]["composed"]["R@5"] == pytest.approx(data["tasks"]["random"]["R@5"])
    md = (tmp_path / "r.md").read_text()
    assert "| good | textual binding | 100.0 |" in md
    assert "| group |" in md


def test_evaluate_rejects_unknown_pool_and_empty_tasks():
    tasks, pools = _toy_tasks()
    with pytest.raises(ValueError, match="pools"):
        evaluate(tasks, {}, CountingEncoder(), CountingEncoder(), log=lambda *a: None)
    with pytest.raises(ValueError, match="tasks"):
        evaluate([], pools, CountingEncoder(), CountingEncoder(), log=lambda *a: None)


def test_fingerprints_change_with_content():
    m = torch.nn.Linear(3, 2)
    a = fingerprint_model(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert fingerprint_model(m) != a
    items = [{"text": "a", "x": torch.ones(2)}]
    assert fingerprint_items(items) == fingerprint_items([{"x": torch.ones(2), "text": "a"}])
    assert fingerprint_items(items) != fingerprint_items([{"text": "a", "x": torch.ones(2) * 2}])


def test_relevance_mask_from_lists():
    m = relevance_mask([[0, 2], [], [1]], 3, 4)
    assert m.tolist() == [[True, False, True, False], [False] * 4, [False, True, False, False]]
    h = hits_at_k(torch.eye(3, 4), torch.eye(4), m, (1,))
    assert h[1].tolist() == [True, False, False]  # query 2 ranks candidate 2 first, but only 1 is relevant


def test_eval_command_on_mbeir_files_with_the_tiny_preset(tmp_path, capsys):
    """`omniret eval` end to end: validate, encode pools (cached), score, write results.json/results.md."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from omniret.cli import main

    root = tmp_path / "mbeir"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    (root / "wav").mkdir()
    sf.write(root / "wav" / "a.wav", rng.normal(size=8000).astype(np.float32) * 0.1, 16000)

    def jsonl(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(root / "query" / "test" / "mbeir_toy_task0_test.jsonl", [
        {"qid": "3:1", "query_txt": "a photo", "query_img_path": None, "query_modality": "text",
         "pos_cand_list": ["3:10"], "neg_cand_list": []},
        {"qid": "3:2", "query_txt": "like this", "query_img_path": "img/0.png", "query_modality": "image,text",
         "pos_cand_list": ["3:11"], "neg_cand_list": []},
        {"qid": "3:3", "query_txt": None, "query_audio_path": "wav/a.wav", "query_modality": "audio",
         "pos_cand_list": ["3:12"], "neg_cand_list": []}])
    jsonl(root / "cand_pool" / "local" / "mbeir_toy_task0_cand_pool.jsonl",
          [{"did": f"3:{10 + i}", "txt": None, "img_path": f"img/{1 + i}.png", "modality": "image"} for i in range(5)])
    (root / "instructions").mkdir()
    (root / "instructions" / "query_instructions.tsv").write_text(
        "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\n"
        "text\timage\tToy\t3\tFind the image.\nimage,text\timage\tToy\t3\tEdit it.\naudio\timage\tToy\t3\tSee it.\n")
    out = tmp_path / "out"
    argv = ["eval", "--data", str(root), "--preset", "tiny", "--output", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    (metrics,) = data["tasks"].values()
    assert set(metrics) == {"R@1", "R@5"} and metrics["R@5"] == 1.0  # 5 candidates: top 5 holds everything
    assert data["details"]["toy_task0"]["queries"] == 3 and data["details"]["toy_task0"]["candidates"] == 5
    assert "| toy_task0 | composed |" in (out / "results.md").read_text()
    assert len(list((out / "embedding_cache").glob("*.npz"))) == 1
    # a broken file stops the run before any encoding, naming the line
    with open(root / "query" / "test" / "mbeir_toy_task0_test.jsonl", "a") as f:
        f.write("{oops\n")
    capsys.readouterr()
    assert main(argv) == 1
    assert "mbeir_toy_task0_test.jsonl:4: not valid JSON" in capsys.readouterr().err
    assert main(argv[:3] + ["--validate-only"]) == 1
