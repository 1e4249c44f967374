"""omniret.demo.real_spread: the collapse diagnostic's numbers (mean pairwise cosine per stage)."""
import itertools

import numpy as np
import pytest
import torch

from omniret.config import preset
from omniret.demo.real_spread import (effective_rank, mean_pairwise_cosine, plot_ranks, stage_spread, stage_summary,
                                      stage_vectors)
from omniret.model.omniret import OmniRet


def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 5, generator=g) + 0.3
    flat = x.reshape(7, -1).double()
    pairs = [torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0) for i, j in itertools.permutations(range(7), 2)]
    assert mean_pairwise_cosine(x) == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-12)
    assert mean_pairwise_cosine(torch.ones(4, 6) * 3) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_stage_spread_reads_every_stage_and_sees_a_collapse():
    model = OmniRet(preset("tiny"))
    model.train()
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 32, 32, generator=g)} for _ in range(5)]
    texts = [{"text": f"item number {i} of {w}"} for i, w in enumerate(["a", "bb", "ccc", "dddd"])]
    spread = stage_spread(model, images)
    assert list(spread) == ["projected", "resampled", "llm_input", "llm_output", "embedding"]
    assert all(-1.0 <= v <= 1.0 for v in spread.values())
    assert model.training  # the mode is given back
    assert list(stage_spread(model, texts)) == ["llm_input", "llm_output", "embedding"]
    # a head that gives every item the same embedding: the embedding stage reads 1, the others do not
    model.head.forward = lambda hidden, mask: torch.ones(hidden.shape[0], 8)
    collapsed = stage_spread(model, texts)
    assert collapsed["embedding"] == pytest.approx(1.0)
    assert collapsed["llm_output"] < 0.9999


def test_stage_vectors_leave_the_padding_out():
    """An item's LLM means are the same in a batch padded to a longer item as alone."""
    model = OmniRet(preset("tiny"))
    items = [{"text": "ab"}, {"text": "a much longer text than the first, to pad it"}, {"text": "cd e"}]
    batch = stage_vectors(model, items)
    for i, item in enumerate(items):
        alone = stage_vectors(model, [item])
        for key in ("llm_input", "llm_output", "embedding"):
            assert torch.allclose(batch[key][i], alone[key][0], atol=1e-5), (key, i)


def test_effective_rank_counts_the_directions_items_spread_along():
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    # items at +-1 along k orthonormal directions (centred by construction): rank exactly k
    for k in (1, 3, 6):
        x = torch.cat([basis[:k], -basis[:k]]) * 2.5 + torch.randn(9, generator=g, dtype=torch.float64)
        assert effective_rank(x) == pytest.approx(k, abs=1e-9)
    # unequal spread: the participation ratio of the centred rows' singular values, computed with numpy
    x = torch.randn(12, 4, 3, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)[:, None, None]
    flat = x.reshape(12, -1).numpy()
    s = np.linalg.svd(flat - flat.mean(0), compute_uv=False) ** 2
    assert effective_rank(x) == pytest.approx(s.sum() ** 2 / (s ** 2).sum(), rel=1e-10)
    assert effective_rank(torch.ones(5, 4)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        effective_rank(torch.ones(1, 3))


def test_projected_stage_is_each_items_mean_projected_token():
    """The projector's output averaged over each item's tokens, in item order, and the method given back."""
    model = OmniRet(preset("tiny"))
    g = torch.Generator().manual_seed(1)
    images = [{"image": torch.rand(3, 32, 32, generator=g)} for _ in range(3)]
    seen = stage_vectors(model, images)
    assert "resample_media" not in vars(model)  # the instance's wrapper is removed
    model.eval()
    for i, item in enumerate(images):
        batch = model.prepare([item])
        tokens, _ = model._media_tokens(batch, "image")
        want = model._projector_for("image")(tokens.to(torch.float32)).mean(dim=0)
        assert torch.allclose(seen["projected"][i], want, atol=1e-5), i
    summary = stage_summary(model, images)
    assert set(summary["embedding"]) == {"cosine", "rank"} and 0.0 <= summary["projected"]["rank"] <= 2.0 + 1e-9


def test_plot_ranks_draws_every_series(tmp_path):
    row = {"projected": {"cosine": 0.5, "rank": 30.0}, "embedding": {"cosine": 0.7, "rank": 8.0}}
    text = {"embedding": {"cosine": 0.3, "rank": 19.0}}
    path = tmp_path / "ranks.png"
    plot_ranks({"before": {"image": row, "text": text}, "run/model": {"image": row, "text": text}}, str(path))
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
