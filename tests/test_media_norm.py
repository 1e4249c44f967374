"""Per-channel standardisation of frozen media tokens (omniret/model/media_norm.py): the moments, the module,
the fit before training (OmniRet and the dual encoder, through the Trainer) and what is saved."""
import warnings

import numpy as np
import pytest
import torch

from omniret.model.media_norm import (MediaStandardizer, fit_indices, media_paths_by_modality, media_paths_of,
                                      token_moments)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_moments_equal_numpy_in_float64():
    rng = np.random.default_rng(7)
    sets = [rng.standard_normal((n, 13)) * rng.uniform(0.1, 9, 13) + rng.uniform(-40, 40, 13) for n in (1, 5, 17, 3)]
    mean, std, count = token_moments(torch.from_numpy(x).half() if i == 0 else torch.from_numpy(x)
                                     for i, x in enumerate(sets))
    rows = np.concatenate([sets[0].astype(np.float16).astype(np.float64)] + sets[1:])
    assert count == 26 and mean.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), rows.std(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        token_moments([])
    with pytest.raises(ValueError, match="widths differ"):
        token_moments([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match=r"\(tokens >= 1, D\)"):
        token_moments([torch.zeros(0, 3)])


def test_standardizer_warns_until_fitted_then_standardises():
    norm = MediaStandardizer(5, "audio encoder")
    x = torch.randn(3, 4, 5) * 7 + 2
    with pytest.warns(UserWarning, match="audio encoder tokens are not standardised"):
        assert torch.equal(norm(x), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        norm(x)
    mean, std = torch.tensor([1.0, -2, 3, 0, 5]), torch.tensor([2.0, 0.5, 1, 0.0, 4])
    norm.set_stats(mean, std)
    assert bool(norm.fitted) and float(norm.std[3]) > 0  # a dead channel is not divided by zero
    want = (x - mean) / std.clamp_min(1e-3)
    torch.testing.assert_close(norm(x), want)
    torch.testing.assert_close(norm(x.double()), want.double())
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        norm.set_stats(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm.set_stats(torch.full((5,), float("nan")), torch.ones(5))
    state = norm.state_dict()
    assert set(state) == {"mean", "std", "fitted"}
    again = MediaStandardizer(5)
    again.load_state_dict(state)
    assert bool(again.fitted) and torch.equal(again(x), norm(x))


def test_media_paths_of_a_dataset_are_distinct_and_cover_negatives():
    data = [{"query": {"image": "a.png", "text": "x"}, "candidate": {"image": "b.png"},
             "negatives": [{"image": ["c.png", "a.png"]}, "just text"]},
            {"query": {"audio": "s.wav"}, "candidate": "text", "negatives": []}]
    assert media_paths_of(data, "image") == ["a.png", "b.png", "c.png"]
    assert media_paths_of(data, "audio") == ["s.wav"]


class CountingDraws:
    """A trainer dataset of `n` examples, one image each (example i: f"{i}.png"), that records what was drawn."""

    def __init__(self, n):
        self.n, self.drawn = n, []

    def __len__(self):
        return self.n

    def draw(self, i, step):
        self.drawn.append(i)
        return {"query": {"image": f"{i}.png", "text": "q"}, "candidate": {"audio": f"{i % 3}.wav"}, "negatives": []}


def test_a_large_training_set_fits_the_statistics_on_a_seeded_sample_of_its_examples():
    small = CountingDraws(50)
    both = media_paths_by_modality(small, ("image", "audio"), max_examples=50)
    assert both == {"image": [f"{i}.png" for i in range(50)], "audio": ["0.wav", "1.wav", "2.wav"]}
    assert small.drawn == list(range(50))  # one pass for both modalities, every example at the cap
    large = CountingDraws(1000)
    paths = media_paths_of(large, "image", max_examples=64)
    assert len(large.drawn) == 64 == len(set(large.drawn)) and large.drawn == sorted(large.drawn)
    assert paths == [f"{i}.png" for i in large.drawn]
    assert max(large.drawn) > 500  # drawn across the set, not its first 64
    assert media_paths_of(CountingDraws(1000), "image", max_examples=64) == paths  # the same draw every time
    assert fit_indices(1000, 64) == large.drawn and fit_indices(7, 64) == list(range(7))
    with pytest.raises(ValueError, match="max_examples"):
        fit_indices(10, 0)


def test_fit_standardizers_reads_the_tokens_of_the_sampled_examples_only(monkeypatch):
    from omniret.model import media_norm

    monkeypatch.setattr(media_norm, "MAX_FIT_EXAMPLES", 64)
    read = {}

    def tokens_of(modality, paths):
        read[modality] = list(paths)
        for p in paths:
            yield torch.full((2, 3), float(p.split(".")[0]))

    norms = {"image": MediaStandardizer(3), "audio": MediaStandardizer(3)}
    media_norm.fit_standardizers(norms, CountingDraws(1000), tokens_of)
    assert read["image"] == [f"{i}.png" for i in fit_indices(1000, 64)]
    assert sorted(read["audio"]) == ["0.wav", "1.wav", "2.wav"]
    want = torch.tensor([float(i) for i in fit_indices(1000, 64)], dtype=torch.float64).mean()
    torch.testing.assert_close(norms["image"].mean, torch.full((3,), want.item()))


# ------------------------------------------------------------------------------------------------ OmniRet
class FakeFeatures:
    """A frozen encoder's tokens with a large per-channel offset (as Whisper's and EfficientNet's have)."""

    def __init__(self, width, tokens):
        self.width, self.tokens = width, tokens
        self.offset = np.random.default_rng(0).uniform(-20, 20, width).astype(np.float32)

    def __call__(self, path):
        seed = sum(path.encode())
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((self.tokens + seed % 3, self.width)) + self.offset).astype(np.float32)


@pytest.fixture
def real_omniret(tmp_path):
    """The real preset (standardize_media=True) on the tiny LLM, fed features given as arrays by path."""
    from omniret.config import preset
    from omniret.model.omniret import OmniRet

    tiny = preset("tiny")
    cfg = preset("real").replace(llm=tiny.llm, tokenizer="byte", append_eos=True, num_slices=32, output_latents=4,
                                 media_latents=4, resampler_heads=2)
    model = OmniRet.from_config(cfg)
    feats = {"image": FakeFeatures(1280, 6), "audio": FakeFeatures(384, 9)}
    table = {}

    def lookup(modality, path):
        return table.setdefault((modality, path), feats[modality](path))

    for modality, enc in model.encoders.items():
        enc.preprocess = lambda raw, name="media", m=modality: torch.from_numpy(lookup(m, raw))
    return model, lookup


def _dataset():
    return [{"query": {"image": f"img{i}.png", "text": "with a hat"}, "candidate": {"image": f"img{i + 10}.png"},
             "task": "image,text->image", "dataset": "d"} for i in range(4)] + \
           [{"query": {"audio": f"clip{i}.wav"}, "candidate": f"caption {i}", "task": "audio->text", "dataset": "d"}
            for i in range(3)]


def test_omniret_fits_the_statistics_of_the_training_media_and_saves_them(real_omniret, tmp_path):
    from omniret.model.omniret import OmniRet

    model, lookup = real_omniret
    model.eval()
    item = [{"image": "img1.png", "text": "with a hat"}]
    with pytest.warns(UserWarning, match="not standardised"):
        before = model.encode_queries(item)
    model.before_training(_dataset())
    for modality, paths in (("image", [f"img{i}.png" for i in (0, 10, 1, 11, 2, 12, 3, 13)]),
                            ("audio", [f"clip{i}.wav" for i in range(3)])):
        rows = np.concatenate([lookup(modality, p) for p in paths]).astype(np.float64)
        norm = model.media_norms[modality]
        assert bool(norm.fitted)
        np.testing.assert_allclose(norm.mean.numpy(), rows.mean(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(norm.std.numpy(), rows.std(0), rtol=1e-4, atol=1e-4)
    after = model.encode_queries(item)
    assert not torch.allclose(before, after, atol=1e-3)
    # a second call leaves fitted statistics alone
    mean = model.media_norms["image"].mean.clone()
    model.before_training(_dataset()[:1])
    assert torch.equal(model.media_norms["image"].mean, mean)
    model.save_pretrained(tmp_path / "m")
    loaded = OmniRet.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.media_norms["image"].mean, mean) and bool(loaded.media_norms["audio"].fitted)
    with pytest.raises(ValueError, match="no audio media"):
        model.media_norms["audio"].fitted.fill_(False)
        model.before_training(_dataset()[:4])


# ------------------------------------------------------------------------------------------ dual encoder
def test_the_trainer_fits_the_dual_encoder_on_a_fresh_run_and_a_resume_keeps_it(tmp_path, monkeypatch):
    from test_dual_encoder import FakeMedia, _pairs

    from omniret.baselines.dual_encoder import DualEncoder, DualEncoderConfig, dual_encoder_train_config
    from omniret.train import Trainer

    fake = FakeMedia()
    model = DualEncoder(DualEncoderConfig(standardize_media=True), media_features=fake, seed=0)
    data = _pairs(ks=(0,))
    cfg = dict(batch_size=16, tasks_per_batch=2, seed=0, output_dir=str(tmp_path / "run"), progress_bar=False,
               tensorboard=False, checkpoint_every=2)
    Trainer(model, dual_encoder_train_config(steps=2, **cfg)).fit(data)
    for modality in ("image", "audio"):
        paths = media_paths_of(data, modality)
        rows = torch.cat([f.double() for f in FakeMedia()(modality, paths)])
        torch.testing.assert_close(model.media_norms[modality].mean, rows.mean(0).float(), rtol=1e-5, atol=1e-4)
    # pooled media enter the head standardised: the mean of the standardised tokens
    path = media_paths_of(data, "image")[0]
    norm = model.media_norms["image"]
    want = ((fake("image", [path])[0].float() - norm.mean) / norm.std).mean(0)
    torch.testing.assert_close(model._frozen("image", [path])[0], want, rtol=1e-5, atol=1e-5)
    # a resume loads the statistics from the checkpoint and fits nothing
    resumed = DualEncoder(DualEncoderConfig(standardize_media=True), media_features=FakeMedia(), seed=0)
    monkeypatch.setattr(DualEncoder, "before_training", lambda self, d: pytest.fail("fitted again on resume"))
    Trainer(resumed, dual_encoder_train_config(steps=4, resume=True, **cfg)).fit(data)
    assert torch.equal(resumed.media_norms["image"].mean, model.media_norms["image"].mean)
