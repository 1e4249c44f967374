"""The `real` preset's precomputed-feature encoders and the per-process feature store behind them
(omniret/model/precomputed.py, omniret/data/frozen_features.py FeatureStore). A fake frozen encoder stands in
for EfficientNet-Lite0 / the speech embedding, so these run without the real packages."""
import numpy as np
import pytest
import torch

from omniret.config import BackboneConfig, preset
from omniret.data import frozen_features
from omniret.data.frozen_features import FeatureStore


class FakeImageEncoder:
    """Features determined by the file's bytes (as a frozen network's are); counts the files it encodes."""

    modality = "image"
    id = "fake-image-v1"

    def __init__(self, width=1280, tokens=49):
        self.calls, self.width, self.tokens = 0, width, tokens

    def __call__(self, paths):
        out = []
        for p in paths:
            seed = int.from_bytes(open(p, "rb").read()[:8].ljust(8, b"\0"), "little") % (2 ** 32)
            out.append(np.random.default_rng(seed).standard_normal((self.tokens, self.width)).astype(np.float32))
            self.calls += 1
        return out


def _files(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(bytes([i + 1]) * 16)
        paths.append(str(p))
    return paths


def test_store_encodes_each_file_once_and_recomputes_a_changed_file(tmp_path):
    enc = FakeImageEncoder()
    store = FeatureStore("image", str(tmp_path / "cache"), encoder=enc)
    paths = _files(tmp_path, 3)
    store.preload(paths, progress=False)
    assert enc.calls == 3
    first = store.get(paths[1])
    assert first.shape == (49, 1280) and first.dtype == np.float16
    store.get(paths[1])
    store.preload(paths, progress=False)
    assert enc.calls == 3  # the table answered
    # a second store over the same disk cache reads, never encodes
    enc2 = FakeImageEncoder()
    again = FeatureStore("image", str(tmp_path / "cache"), encoder=enc2)
    np.testing.assert_array_equal(again.get(paths[1]), first)
    assert enc2.calls == 0
    # new bytes in the same file: a new entry
    with open(paths[1], "wb") as f:
        f.write(b"\x77" * 20)
    changed = store.get(paths[1])
    assert enc.calls == 4 and not np.array_equal(changed, first)


def test_store_keeps_its_table_under_max_bytes_and_reads_evicted_features_back(tmp_path, monkeypatch):
    """A table over its budget drops the least recently used features; asking for them again reads the disk cache
    (no encoder call, no second hash of the file) and gives the same array. Same bytes in two files: one entry."""
    enc = FakeImageEncoder(width=1280, tokens=3)
    entry = 3 * 1280 * 2  # float16
    store = FeatureStore("image", str(tmp_path / "cache"), encoder=enc, max_bytes=2 * entry + 1)
    paths = _files(tmp_path, 5)
    twin = tmp_path / "twin.png"
    twin.write_bytes(open(paths[4], "rb").read())
    hashed = []
    real_sha = frozen_features.file_sha256
    monkeypatch.setattr(frozen_features, "file_sha256", lambda p: hashed.append(p) or real_sha(p))
    store.preload(paths, progress=False, chunk=2)
    assert enc.calls == 5 and store.nbytes == 2 * entry and len(store._table) == 2
    full = FeatureStore("image", str(tmp_path / "cache"), encoder=FakeImageEncoder(tokens=3), max_bytes=1 << 30)
    expected = [full.get(p).copy() for p in paths]
    hashed.clear()
    np.testing.assert_array_equal(store.get(paths[3]), expected[3])  # still held
    assert store.misses == 0
    np.testing.assert_array_equal(store.get(paths[0]), expected[0])  # left the table: read back
    assert store.misses == 1 and enc.calls == 5 and hashed == []
    store.get(paths[3])  # used again: 0 is now the oldest, and leaves when 1 comes back
    np.testing.assert_array_equal(store.get(paths[1]), expected[1])
    assert set(store._table) == {store._digest(paths[3]), store._digest(paths[1])} and store.nbytes == 2 * entry
    np.testing.assert_array_equal(store.get(str(twin)), expected[4])
    assert enc.calls == 5 and store.misses == 3 and hashed == [str(twin)]
    # a budget of 0 keeps nothing and still answers
    empty = FeatureStore("image", str(tmp_path / "cache"), encoder=FakeImageEncoder(tokens=3), max_bytes=0)
    np.testing.assert_array_equal(empty.get(paths[2]), expected[2])
    assert empty.nbytes == 0 and not empty._table


@pytest.mark.parametrize("raw, expected", [(None, 8 << 30), ("", 8 << 30), ("0.5", 1 << 29), ("0", 0),
                                           ("-1", None), ("lots", None), ("nan", None),
                                           ("inf", None)])
def test_feature_memory_budget_from_the_environment(monkeypatch, tmp_path, raw, expected):
    if raw is None:
        monkeypatch.delenv("OMNIRET_FEATURE_MEMORY_GB", raising=False)
    else:
        monkeypatch.setenv("OMNIRET_FEATURE_MEMORY_GB", raw)
    if expected is None:
        with pytest.raises(ValueError, match="OMNIRET_FEATURE_MEMORY_GB must be a number of GiB >= 0"):
            FeatureStore("image", str(tmp_path), encoder=FakeImageEncoder())
    else:
        assert FeatureStore("image", str(tmp_path), encoder=FakeImageEncoder()).max_bytes == expected
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        FeatureStore("image", str(tmp_path), encoder=FakeImageEncoder(), max_bytes=-1)


def test_store_refuses_features_of_the_wrong_width_and_unknown_modalities(tmp_path):
    store = FeatureStore("image", str(tmp_path / "cache"), encoder=FakeImageEncoder(width=96))
    with pytest.raises(ValueError, match=r"expected \(tokens, 1280\)"):
        store.preload(_files(tmp_path, 1), progress=False)
    with pytest.raises(ValueError, match="no frozen encoder for modality 'video'"):
        FeatureStore("video", str(tmp_path))
    with pytest.raises(ValueError, match="cannot read this media file"):
        store.get(str(tmp_path / "missing.png"))


@pytest.fixture
def real_model(tmp_path, monkeypatch):
    """The real preset whose image store is the fake encoder's, in a cache of its own."""
    from omniret.model.omniret import OmniRet

    cache = str(tmp_path / "features")
    enc = FakeImageEncoder()
    monkeypatch.setattr(frozen_features, "_STORES", {})
    store = frozen_features.feature_store("image", cache)
    store._cache = frozen_features.FeatureCache(store.cache_dir, enc)
    cfg = preset("real").replace(image_encoder=BackboneConfig(kind="efficientnet_lite0", path=cache),
                                 audio_encoder=BackboneConfig(kind="speech_embedding", path=cache))
    return OmniRet.from_config(cfg), enc


def test_real_preset_reads_files_through_the_store_and_equals_given_features(real_model, tmp_path):
    model, enc = real_model
    model.eval()
    paths = _files(tmp_path, 2)
    items = [{"image": p} for p in paths]
    by_path = model.encode_corpus(items)
    assert enc.calls == 2
    feats = [frozen_features.feature_store("image", model.encoders["image"].cache_dir).get(p) for p in paths]
    by_array = model.encode_corpus([{"image": f} for f in feats])
    torch.testing.assert_close(by_path, by_array, rtol=0, atol=0)
    # composed: an audio clip's features given as an array beside text
    audio = np.random.default_rng(0).standard_normal((7, 96)).astype(np.float32)
    q = model.encode_queries([{"audio": audio, "text": "as a woman"}], instruction="Find it.")
    assert q.shape == (1, model.embedding_dim) and torch.isfinite(q).all()


def test_real_preset_skips_the_models_own_feature_cache(real_model, tmp_path):
    model, _ = real_model
    cache = model.enable_feature_cache(tmp_path / "model_cache")
    model.eval()
    model.encode_corpus([{"image": p} for p in _files(tmp_path, 2)])
    assert cache.hits == 0 and cache.misses == 0  # the features come from a cache already: no second copy


def test_precomputed_encoder_errors_name_the_item(real_model, tmp_path):
    model, _ = real_model
    with pytest.raises(ValueError, match=r"items\[0\]\['image'\]\[0\].*\(tokens >= 1, 1280\)"):
        model.encode_corpus([{"image": np.zeros((4, 96), np.float32)}])
    bad = np.zeros((3, 1280), np.float32)
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.encode_corpus([{"image": bad}])
    with pytest.raises(ValueError, match="no such image file"):
        model.encode_corpus([{"image": str(tmp_path / "nope.png")}])
    with pytest.raises(ValueError, match="takes a file path"):
        model.encode_corpus([{"image": 3}])


def test_real_preset_config_rules():
    cfg = preset("real")
    assert cfg.image_encoder.kind == "efficientnet_lite0" and cfg.audio_encoder.kind == "whisper_tiny_en"
    assert cfg.video is False
    with pytest.raises(ValueError, match="video=True"):
        cfg.replace(video=True)
    with pytest.raises(ValueError, match="cannot train"):
        from omniret.model.precomputed import PrecomputedFeatureEncoder

        PrecomputedFeatureEncoder(BackboneConfig(kind="efficientnet_lite0", trainable=True), cfg)
