"""omniret.demo.real_compose: a query's text effect, against a direct computation on a toy encoder."""
import pytest
import torch

from omniret.demo.real_compose import text_effect, without_text


def test_without_text_keeps_media_and_instruction_and_refuses_text_only():
    q = {"image": "a.png", "text": "as a woman", "instruction": "Find it."}
    assert without_text(q) == {"image": "a.png", "instruction": "Find it."}
    with pytest.raises(ValueError, match="needs media"):
        without_text({"text": "only words"})


def test_text_effect_against_a_direct_computation():
    """A toy encoder: image vector + w * text vector. w = 0 gives cosine 1 and equal recall with and without the
    text; w > 0 moves the query, and the recalls are what a direct top-k gives."""
    g = torch.Generator().manual_seed(0)
    images = {f"i{k}": torch.randn(9, generator=g, dtype=torch.float64) for k in range(7)}
    texts = {f"t{k}": torch.randn(9, generator=g, dtype=torch.float64) for k in range(3)}
    queries = [{"image": f"i{k % 7}", "text": f"t{k % 3}"} for k in range(11)]
    cands = torch.randn(13, 9, generator=g, dtype=torch.float64)
    relevant = [[k % 13, (5 * k) % 13] for k in range(11)]

    def encoder(w):
        return lambda qs: torch.stack([images[q["image"]] + (w * texts[q["text"]] if "text" in q else 0) for q in qs])

    same = text_effect(encoder(0.0), queries, cands, relevant)
    assert abs(same["cosine"] - 1.0) < 1e-6 and same["with"] == same["without"]
    moved = text_effect(encoder(2.0), queries, cands, relevant, ks=(1, 5))
    full = torch.nn.functional.normalize(encoder(2.0)(queries), dim=1)
    bare = torch.nn.functional.normalize(encoder(0.0)(queries), dim=1)
    want_cos = float((full * bare).sum(1).mean())
    assert abs(moved["cosine"] - want_cos) < 1e-5 and moved["cosine"] < 0.99
    for name, q in (("with", full), ("without", bare)):
        for k in (1, 5):
            top = (q @ torch.nn.functional.normalize(cands, dim=1).T).topk(k, dim=1).indices
            hit = sum(bool(set(top[i].tolist()) & set(relevant[i])) for i in range(len(queries))) / len(queries)
            assert abs(moved[name][f"R@{k}"] - hit) < 1e-6, (name, k)
