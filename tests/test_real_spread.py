"""omniret.demo.real_spread: the collapse diagnostic's numbers (mean pairwise cosine per stage)."""
import itertools

import pytest
import torch

from omniret.config import preset
from omniret.demo.real_spread import mean_pairwise_cosine, stage_spread, stage_vectors
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
    assert list(spread) == ["resampled", "llm_input", "llm_output", "embedding"]
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
