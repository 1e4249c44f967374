"""The real-media benchmark on a small subset of what the Debian and npm packages ship (skipped, with the
reason, when a source is not installed: `bash scripts/setup.sh` as root installs them)."""
import json
import os
import shutil

import numpy as np
import pytest

from omniret.data import mbeir, real_benchmark
from omniret.data.sources.common import is_test, normalize_text

SMALL = real_benchmark.RealConfig(max_items=8, workers=2)


def _missing() -> str:
    missing = [m for m in real_benchmark.source_status().values() if m]
    return "; ".join(missing)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(f"real benchmark sources not installed: {missing}")
    root = str(tmp_path_factory.mktemp("real"))
    manifest = real_benchmark.build(root, SMALL, log=lambda *a: None)
    return root, manifest


def _records(root: str, split: str) -> tuple:
    queries, pool = [], []
    for name in real_benchmark.TASKS:
        with open(os.path.join(root, "query", split, f"mbeir_{name}_{split}.jsonl")) as f:
            queries += [dict(json.loads(line), task=name) for line in f]
    with open(mbeir.global_pool_path(root, split)) as f:
        pool = [json.loads(line) for line in f]
    return queries, pool


# ------------------------------------------------------------------------------------------- no packages needed

def test_split_is_seeded_order_free_and_near_the_fraction():
    keys = [f"caption {i}" for i in range(4000)]
    test = [k for k in keys if is_test(k, 0, 0.4)]
    assert abs(len(test) / len(keys) - 0.4) < 0.03
    assert test == [k for k in reversed(keys) if is_test(k, 0, 0.4)][::-1]  # order does not matter
    assert test != [k for k in keys if is_test(k, 1, 0.4)]  # the seed does
    assert not [k for k in keys if is_test(k, 0, 0.0)] and len([k for k in keys if is_test(k, 0, 1.0)]) == len(keys)


def test_change_wordings_are_held_out():
    for kind in ("tone", "gender"):
        for value in ("dark", "light", "woman", "man"):
            train = {normalize_text(w.format(v=value)) for w in real_benchmark.CHANGE_WORDINGS["train"][kind]}
            test = {normalize_text(w.format(v=value)) for w in real_benchmark.CHANGE_WORDINGS["test"][kind]}
            assert train and test and not train & test


# ------------------------------------------------------------------------------------------- the built subset

def test_subset_passes_the_validator_and_has_every_task(built):
    root, manifest = built
    for split, use_global in (("test", False), ("train", True)):
        problems, (tasks, pools, table) = mbeir.validate(root, split, use_global=use_global)
        assert problems == [], mbeir.format_report(problems)
        assert sorted(t.name for t in tasks) == sorted(real_benchmark.TASKS)
        for t in tasks:
            qmod, cmod = real_benchmark.TASKS[t.name][2:4]
            assert {q.modality for q in t.queries} == {qmod} and t.cand_modality == cmod
    assert manifest["counts"]["emoji_imagetext2image"]["test"]["queries"] > 0
    composed = [q for q in _records(root, "test")[0] if q["task"] in real_benchmark.COMPOSED_TASKS]
    assert {q["query_modality"] for q in composed} == {"image,text", "audio,text"}


def test_splits_share_no_media_voice_or_wording(built):
    root, manifest = built
    media, texts, voices = {}, {}, {}
    for split in ("train", "test"):
        queries, pool = _records(root, split)
        files = set()
        for rec in queries + pool:
            files.update(rec.get(k) for k in ("query_img_path", "query_audio_path", "img_path", "audio_path"))
        files.discard(None)
        media[split] = {_content(root, p) for p in files}  # by content: a copy under another name counts
        texts[split] = {normalize_text(q["query_txt"]) for q in queries if q.get("query_txt")}
        texts[split] |= {normalize_text(c["txt"]) for c in pool if c.get("txt")}
        voices[split] = {q["speaker"] for q in queries if q.get("speaker") not in (None, "human")}
        if split == "train":
            assert not any(q.get("speaker") == "human" for q in queries)  # people's recordings are test queries
    assert media["train"] and media["test"] and not media["train"] & media["test"]
    assert not texts["train"] & texts["test"]
    assert voices["train"] and voices["test"] and not voices["train"] & voices["test"]
    assert not set(manifest["voices"]["train"]) & set(manifest["voices"]["test"])


def _content(root: str, rel: str) -> str:
    import hashlib

    with open(os.path.join(root, rel), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_media_are_in_the_benchmark_format(built):
    import soundfile as sf
    from PIL import Image

    root, _ = built
    queries, pool = _records(root, "test")
    image = next(c["img_path"] for c in pool if c.get("img_path"))
    with Image.open(os.path.join(root, image)) as img:
        assert img.size == (224, 224) and img.mode == "RGB"
    audio = next(q["query_audio_path"] for q in queries if q.get("query_audio_path"))
    info = sf.info(os.path.join(root, audio))
    assert info.samplerate == 16000 and info.channels == 1


def test_a_malformed_file_is_reported_with_its_line(built, tmp_path):
    root, _ = built
    copy = str(tmp_path / "real")
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("media"))  # the records only
    path = os.path.join(copy, "query", "test", "mbeir_asterisk_text2audio_test.jsonl")
    assert mbeir.validate(copy, "test", check_files=False)[0] == []
    with open(path, "a") as f:
        f.write('{"qid": "4:x", "query_modality": "text"\n')
    problems, _ = mbeir.validate(copy, "test", check_files=False)
    assert any(p.path == path and p.line > 0 and "not valid JSON" in p.message for p in problems)


def test_records_are_deterministic_and_the_seed_moves_the_split():
    missing = _missing()
    if missing:
        pytest.skip(f"real benchmark sources not installed: {missing}")
    from omniret.data import digits, tts

    def records(seed: int) -> dict:
        cfg = real_benchmark.RealConfig(seed=seed, max_items=30)
        builder = real_benchmark.Builder("unused", cfg, log=lambda *a: None)
        builder.voices = digits.split_voices(tts.list_voices(), digits.DigitsConfig(seed=seed))
        builder.add_tuxpaint()
        builder.add_asterisk()
        return {name: {s: (d.queries, d.pool) for s, d in splits.items()} for name, splits in builder.tasks.items()}

    first, again, other = records(0), records(0), records(1)
    assert first == again
    stamps = lambda recs: {q["query_img_path"] for q in recs["tuxpaint_image2text"]["test"][0]}
    assert stamps(first) != stamps(other)


def test_reference_negatives_name_the_unchanged_emoji_in_training_only():
    """RealConfig(reference_negatives=True): each emoji training query lists, as its one hard negative, the
    candidate of its own task whose image is the unchanged emoji (the image query's own image; for the spoken query
    added beside it, the same emoji). Test queries and every other field stay as the default build writes them."""
    missing = _missing()
    if missing:
        pytest.skip(f"real benchmark sources not installed: {missing}")
    from omniret.data import digits, tts

    def emoji_tasks(reference_negatives: bool) -> dict:
        cfg = real_benchmark.RealConfig(max_items=30, reference_negatives=reference_negatives)
        builder = real_benchmark.Builder("unused", cfg, log=lambda *a: None)
        builder.voices = digits.split_voices(tts.list_voices(), digits.DigitsConfig(seed=0))
        builder.add_emoji()
        return builder.tasks

    plain, marked = emoji_tasks(False), emoji_tasks(True)
    image_task, audio_task = real_benchmark.COMPOSED_TASKS
    for task in (image_task, audio_task):
        for split in real_benchmark.SPLITS:
            assert marked[task][split].pool == plain[task][split].pool
            strip = lambda qs: [{k: v for k, v in q.items() if k != "neg_cand_list"} for q in qs]  # noqa: E731
            assert strip(marked[task][split].queries) == strip(plain[task][split].queries)
            assert all(q["neg_cand_list"] == [] for q in plain[task][split].queries)
        assert marked[task]["test"].queries and all(q["neg_cand_list"] == [] for q in marked[task]["test"].queries)
    pool_image = {c["did"]: c["img_path"] for task in (image_task, audio_task) for c in marked[task]["train"].pool}
    image_queries, audio_queries = marked[image_task]["train"].queries, marked[audio_task]["train"].queries
    assert image_queries and len(image_queries) == len(audio_queries)
    for iq, aq in zip(image_queries, audio_queries):  # added in pairs: one change, spoken and shown
        assert iq["pos_cand_list"][0].split(":")[1] == aq["pos_cand_list"][0].split(":")[1]
        for q, task_id in ((iq, "6"), (aq, "7")):
            (negative,) = q["neg_cand_list"]
            assert negative.split(":")[0] == task_id and negative not in q["pos_cand_list"]
            assert pool_image[negative] == iq["query_img_path"]


def test_sibling_negatives_are_the_other_variants_of_the_same_change():
    """RealConfig(sibling_negatives=True): an emoji training query lists, as hard negatives, the other variants its
    emoji takes under the same kind of change (the other skin tones; the other gender), never its target, in its
    own task; with reference_negatives too, the unchanged emoji comes first. Test queries carry none."""
    missing = _missing()
    if missing:
        pytest.skip(f"real benchmark sources not installed: {missing}")
    from omniret.data import digits, tts
    from omniret.data.sources import emoji

    def emoji_tasks(**negatives) -> dict:
        cfg = real_benchmark.RealConfig(max_items=30, **negatives)
        builder = real_benchmark.Builder("unused", cfg, log=lambda *a: None)
        builder.voices = digits.split_voices(tts.list_voices(), digits.DigitsConfig(seed=0))
        builder.add_emoji()
        return builder.tasks

    _, pairs = emoji.read_emoji()
    unified = lambda path: os.path.basename(path)[:-len(".png")]  # noqa: E731  media/emoji/<unified>.png
    kinds = {(p.base.unified, p.target.unified): p.kind for p in pairs}
    variants: dict = {}
    for p in pairs:
        variants.setdefault((p.base.unified, p.kind), set()).add(p.target.unified)
    siblings, both = emoji_tasks(sibling_negatives=True), emoji_tasks(sibling_negatives=True, reference_negatives=True)
    image_task, audio_task = real_benchmark.COMPOSED_TASKS
    pool_image = {c["did"]: unified(c["img_path"]) for c in siblings[image_task]["train"].pool}
    pool_image.update({c["did"]: unified(c["img_path"]) for c in siblings[audio_task]["train"].pool})
    image_queries = siblings[image_task]["train"].queries
    assert image_queries and len(image_queries) == len(siblings[audio_task]["train"].queries)
    seen_tone = seen_gender = False
    for task, task_id in ((image_task, "6"), (audio_task, "7")):
        assert siblings[task]["test"].queries and all(q["neg_cand_list"] == [] for q in siblings[task]["test"].queries)
        for iq, q, q_both in zip(image_queries, siblings[task]["train"].queries, both[task]["train"].queries):
            base, (target,) = unified(iq["query_img_path"]), [pool_image[d] for d in q["pos_cand_list"]]
            kind = kinds[base, target]
            got = [pool_image[d] for d in q["neg_cand_list"]]
            assert all(d.split(":")[0] == task_id for d in q["neg_cand_list"])
            assert sorted(got) == sorted(variants[base, kind] - {target}) and len(got) == len(set(got))
            assert q_both["neg_cand_list"] == [q_both["neg_cand_list"][0]] + q["neg_cand_list"]
            assert pool_image[q_both["neg_cand_list"][0]] == base
            seen_tone |= kind == "tone" and len(got) >= 4
            seen_gender |= kind == "gender" and len(got) == 1
    assert seen_tone and seen_gender


def test_a_benchmark_built_before_a_later_field_keeps_its_folder_and_is_not_rebuilt(tmp_path):
    """A field added to RealConfig later leaves the default build's name (its folder) and a manifest written
    without it as they were; set away from its default, it names another build. The worker count names none."""
    from dataclasses import asdict

    from omniret.demo import real_demo

    cfg = real_benchmark.RealConfig(max_items=8)
    assert not {"reference_negatives", "sibling_negatives"} & set(cfg.identity()) and set(cfg.identity()) < set(asdict(cfg))
    assert real_benchmark.RealConfig(reference_negatives=True).key() != real_benchmark.RealConfig().key()
    assert real_benchmark.RealConfig(sibling_negatives=True).key() not in (
        real_benchmark.RealConfig().key(), real_benchmark.RealConfig(reference_negatives=True).key())
    assert real_benchmark.RealConfig(workers=1).key() == real_benchmark.RealConfig().key()
    assert real_benchmark.RealConfig.from_manifest({"seed": 0, "no such field": 1}) is None
    assert real_benchmark.RealConfig.from_manifest(None) is None
    before = {k: v for k, v in asdict(cfg).items() if k not in real_benchmark.LATER_FIELDS}
    before["workers"] = 1  # built with one rendering process
    (tmp_path / real_benchmark.MANIFEST).write_text(json.dumps({"config": before}))
    logs = []
    opts = real_demo.RealDemoOptions(output=str(tmp_path / "out"), data_dir=str(tmp_path), max_items=8)
    assert real_demo.ensure_benchmark(opts, log=logs.append) == str(tmp_path)
    assert logs == [f"benchmark: {tmp_path} (cached)"]


# ------------------------------------------------------------------------------------------- frozen features

def _encoders():
    from omniret.data import frozen_features as ff

    try:
        return ff, ff.EfficientNetLite0(threads=1), ff.SpeechEmbedding(threads=1), ff.WhisperTinyEn(threads=1)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def test_feature_cache_computes_once_and_returns_the_same(built, tmp_path):
    ff, image_encoder, speech_encoder, whisper_encoder = _encoders()
    root, _ = built
    files = ff.media_files(root)
    images, audio = files["image"][:3], files["audio"][:3]
    for encoder, paths, dim in ((image_encoder, images, ff.IMAGE_DIM), (speech_encoder, audio, ff.SPEECH_EMBEDDING_DIM),
                                (whisper_encoder, audio, ff.WHISPER_DIM)):
        assert encoder.width == dim and ff.ENCODERS[encoder.kind] is type(encoder)
        cache = ff.FeatureCache(str(tmp_path), encoder)
        first = cache.get(paths, progress=False)
        assert encoder.calls == len(set(map(ff.file_sha256, paths)))
        again = ff.FeatureCache(str(tmp_path), encoder).get(paths, progress=False)
        assert encoder.calls == len(set(map(ff.file_sha256, paths)))  # nothing recomputed
        for a, b in zip(first, again):
            assert a.dtype == np.float16 and a.shape[1] == dim and np.isfinite(a.astype(np.float32)).all()
            assert np.array_equal(a, b)
    assert first[0].shape[0] >= 1 and all(f.shape == (ff.IMAGE_TOKENS, ff.IMAGE_DIM)
                                           for f in ff.FeatureCache(str(tmp_path), image_encoder).get(images, progress=False))


def test_media_listing_names_a_malformed_line(tmp_path):
    from omniret.data import frozen_features as ff

    (tmp_path / "query" / "test").mkdir(parents=True)
    (tmp_path / "query" / "test" / "mbeir_x_test.jsonl").write_text('{"qid": "1:1"}\n{"qid": \n')
    with pytest.raises(ValueError, match=r"mbeir_x_test.jsonl:2: not valid JSON"):
        ff.media_files(str(tmp_path))


def test_feature_cache_names_a_damaged_entry(tmp_path):
    from omniret.data import frozen_features as ff

    path = str(tmp_path / "ab" / "abc.npy")
    ff.save_features(path, np.ones((3, 4), dtype=np.float16))
    assert ff.load_features(path).shape == (3, 4)
    with open(path, "wb") as f:
        f.write(b"not an npy file")
    with pytest.raises(ValueError, match="abc.npy"):
        ff.load_features(path)


def test_speech_embedding_gives_one_token_per_80_ms():
    ff, _, audio_encoder, _ = _encoders()
    for seconds, tokens in ((0.2, 3), (1.0, 3), (3.0, 28)):  # padded to 1 s; then 12.5 per second
        wave = np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * 16000)).astype(np.float32)
        out = audio_encoder.embed_wave(wave)
        assert out.shape[1] == ff.SPEECH_EMBEDDING_DIM
        assert abs(out.shape[0] - tokens) <= 1, (seconds, out.shape)


def test_whisper_gives_one_token_per_40_ms_and_depends_on_the_sound():
    ff, _, _, audio_encoder = _encoders()
    rng = np.random.default_rng(0)
    outs = {}
    for seconds, tokens in ((0.2, 25), (1.0, 25), (3.0, 75), (20.0, 300)):  # padded to 1 s, cut at 12 s; 25 a second
        wave = rng.uniform(-0.3, 0.3, int(seconds * 16000)).astype(np.float32)
        out = audio_encoder.embed_wave(wave)
        assert out.shape == (tokens, ff.WHISPER_DIM) and np.isfinite(out).all(), (seconds, out.shape)
        outs[seconds] = out
    again = audio_encoder.embed_wave(rng.uniform(-0.3, 0.3, 3 * 16000).astype(np.float32))
    assert np.array_equal(audio_encoder.embed_wave(np.zeros(16000, np.float32)),
                          audio_encoder.embed_wave(np.zeros(16000, np.float32)))  # deterministic
    assert not np.allclose(again, outs[3.0], atol=1e-3)  # another sound, other features


def test_efficientnet_channels_last_gives_the_contiguous_features(built):
    import copy

    import torch

    from omniret.model.media import load_image

    ff, image_encoder, _, _ = _encoders()
    root, _ = built
    paths = ff.media_files(root)["image"][:2]
    fast = image_encoder(paths)
    reference = copy.deepcopy(image_encoder.model).to(memory_format=torch.contiguous_format)
    batch = torch.stack([load_image(p, ff.IMAGE_SIZE) for p in paths]) * (255.0 / 128.0) - (127.0 / 128.0)
    with torch.inference_mode():
        fmap = reference.extract_features(batch.contiguous())
    for got, want in zip(fast, fmap):
        np.testing.assert_allclose(got, want.flatten(1).T.numpy(), rtol=1e-4, atol=1e-4)
