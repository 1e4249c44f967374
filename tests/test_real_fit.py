"""omniret.demo.real_fit: a task cut to a sample of its queries, searching the gallery of its positives."""
import pytest

from omniret.demo.real_fit import positives_gallery
from omniret.eval.evaluate import EvalTask, Pool


def _task(relevant, n_pool=11):
    pool = Pool("p", [f"c{i}" for i in range(n_pool)], [f"d{i}" for i in range(n_pool)])
    task = EvalTask("t", [f"q{i}" for i in range(len(relevant))], "p", relevant, ks=(1, 5), primary_k=5)
    return task, pool


def test_gallery_is_every_positive_and_relevance_follows_the_items():
    relevant = [[7], [2, 9], [7], [4], [10, 2]]
    task, pool = _task(relevant)
    sample, gallery = positives_gallery(task, pool, max_queries=3, seed=5)
    assert gallery.items == ["c2", "c4", "c7", "c9", "c10"] and gallery.ids == ["d2", "d4", "d7", "d9", "d10"]
    assert len(sample.queries) == 3 and len(set(sample.queries)) == 3 and sample.pool == gallery.name
    for q, rel in zip(sample.queries, sample.relevant):  # the same candidates, by item, as in the full pool
        i = int(q[1:])
        assert sorted(gallery.items[j] for j in rel) == sorted(pool.items[c] for c in relevant[i])
    again, _ = positives_gallery(task, pool, max_queries=3, seed=5)
    assert again.queries == sample.queries
    other = {tuple(positives_gallery(task, pool, max_queries=3, seed=s)[0].queries) for s in range(8)}
    assert len(other) > 1  # the seed draws the sample


def test_all_queries_when_fewer_than_asked_and_bad_input_refused():
    task, pool = _task([[1], [3]])
    sample, gallery = positives_gallery(task, pool, max_queries=50)
    assert sample.queries == ["q0", "q1"] and sample.relevant == [[0], [1]] and gallery.items == ["c1", "c3"]
    with pytest.raises(ValueError, match="no relevant candidate"):
        positives_gallery(*_task([[1], []]), max_queries=5)
    with pytest.raises(ValueError, match="max_queries"):
        positives_gallery(task, pool, max_queries=0)
