"""The OmniRet model on the tiny preset (random small SigLIP / Whisper / Qwen2, byte tokenizer): every modality
alone and composed, interleaving, batch independence, save/load, LoRA training, the encode API."""
import warnings

import numpy as np
import pytest
import torch

from omniret.config import preset
from omniret.model import OmniRet, PreparedBatch
from omniret.model.composer import parse_item
from omniret_kernels import diversity_loss

warnings.filterwarnings("ignore", message=".*no fast backend.*")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = OmniRet.from_config("tiny")
    m.eval()
    return m


def _tone(n, freq, g):
    t = torch.arange(n) / 16000.0
    return 0.3 * torch.sin(2 * torch.pi * freq * t) + 0.02 * torch.randn(n, generator=g)


def _media(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(3, 40, 36, generator=g),
        "image2": torch.rand(3, 32, 32, generator=g),
        "audio": _tone(7000, 440 + 1500 * seed, g),  # < one window
        "audio_long": _tone(23000, 3000 - 1700 * seed, g),  # > two windows of the tiny Whisper (10240 samples)
        "video": torch.rand(6, 3, 32, 32, generator=g),  # more frames than video_num_frames = 4
        "video_short": torch.rand(2, 3, 24, 24, generator=g),
    }


def _items(m):
    return [
        "just some text",
        {"image": m["image"]},
        {"audio": m["audio"]},
        {"video": m["video"]},
        {"text": "a red square", "image": m["image2"]},
        {"text": "a dog barking", "audio": m["audio_long"]},
        {"image": m["image"], "audio": m["audio"]},
        {"text": "clip <video> with sound <audio>", "video": m["video_short"], "audio": m["audio"]},
        {"text": "two: <image> and <image>", "image": [m["image"], m["image2"]]},
    ]


def _embed(model, items, **kw):
    with torch.no_grad():
        return model(items, **kw)[0]


def test_every_modality_alone_and_composed(model):
    items = _items(_media())
    emb, aux = model(items)
    assert emb.shape == (len(items), model.config.num_slices)
    assert torch.isfinite(emb).all()
    assert aux["num_media"] == 11
    # each input's content matters: changing one part changes the embedding
    m2 = _media(seed=1)
    swapped = [{"image": m2["image"]}, {"audio": m2["audio"]}, {"video": m2["video"]},
               {"text": "a dog barking", "audio": m2["audio_long"]},
               {"text": "a cat barking", "audio": _media()["audio_long"]}]
    base = _embed(model, [items[1], items[2], items[3], items[5], items[5]])
    other = _embed(model, swapped)
    for i in range(len(swapped)):
        assert not torch.allclose(base[i], other[i], atol=1e-4), f"item {i} ignores a changed input"


def test_alone_equals_in_mixed_batch(model):
    items = _items(_media())
    batch = _embed(model, items)
    for i, item in enumerate(items):
        alone = _embed(model, [item])[0]
        torch.testing.assert_close(alone, batch[i], atol=2e-5, rtol=1e-4)


def test_interleaved_order(model):
    m = _media()
    placeholder = {"text": "<image>left of <audio>", "image": m["image"], "audio": m["audio"]}
    by_key_order = {"image": m["image"], "text": "left of ", "audio": m["audio"]}
    swapped = {"audio": m["audio"], "text": "left of ", "image": m["image"]}
    e = _embed(model, [placeholder, by_key_order, swapped])
    torch.testing.assert_close(e[0], e[1], atol=2e-5, rtol=1e-4)  # same sequence, two spellings
    assert not torch.allclose(e[0], e[2], atol=1e-4)  # other order, other embedding
    p = parse_item({"text": "a <video> b <image>", "video": "v", "image": ["i1", "i2"], "audio": "a"})
    assert [k for k, _ in p.segments] == ["text", "video", "text", "image", "image", "audio"]
    assert p.segments[4] == ("image", "i2")  # the unplaced image follows at its key's position


def test_instruction_template(model):
    m = _media()
    q = {"text": "a dog", "audio": m["audio"]}
    seq = model.composer.tokenize(parse_item(q, instruction="Find the sound"))
    text = bytes(b for k, v in seq if k == "ids" for b in v if b < 256).decode()
    assert text == "Instruct: Find the sound\nQuery: a dog"
    with_instr = _embed(model, [q], instruction="Find the sound")
    item_instr = _embed(model, [dict(q, instruction="Find the sound")])
    plain = _embed(model, [q])
    torch.testing.assert_close(with_instr, item_instr)
    assert not torch.allclose(with_instr, plain, atol=1e-4)


def test_diversity_aux(model):
    items = _items(_media())[:3]
    model.eval()
    _, plain = model(items)
    assert "diversity" not in plain and plain["num_media"] == 2  # eval computes no diversity term unless asked
    e1, a1 = model(items, diversity=True)
    e2, a2 = model(items, diversity=True)
    assert a1["diversity"].item() == a2["diversity"].item()  # eval: no dropout
    # eval value = the reference diversity loss without dropout over the resampled media tokens
    batch = model.prepare(items)
    res = []
    for mod in ("image", "video", "audio"):
        if batch.media[mod]:
            tok, cu = model.encode_media(mod, batch.media[mod])
            res.append(model.media_resampler(model._projector_for(mod)(tok), cu, modality=mod))
    want = diversity_loss(torch.cat(res), p=0.0, gamma=model.config.diversity_gamma)
    torch.testing.assert_close(a1["diversity"], want)
    model.train()
    try:
        torch.manual_seed(1)
        _, t1 = model(items)
        torch.manual_seed(2)
        _, t2 = model(items)
        assert t1["diversity"].item() != t2["diversity"].item()  # training: dropout masks differ
        assert t1["diversity"].requires_grad
        t1["diversity"].backward()
        assert model.media_resampler.latents.grad is not None
        model.zero_grad(set_to_none=True)
        _, no_div = model(items, diversity=False)
        assert "diversity" not in no_div
    finally:
        model.eval()
    _, a_text = model(["only text"], diversity=True)
    assert a_text["diversity"].item() == 0.0


def test_encode_api(model, tmp_path):
    from PIL import Image
    import soundfile

    m = _media()
    img_path = tmp_path / "x.png"
    Image.fromarray((m["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(img_path)
    wav_path = tmp_path / "x.wav"
    soundfile.write(str(wav_path), m["audio"].numpy(), 16000)
    items = _items(m) + [{"image": str(img_path)}, {"image": Image.open(img_path)}, {"audio": str(wav_path)}]
    out = model.encode_corpus(items, batch_size=3)
    assert out.dtype == torch.float32 and out.shape == (len(items), model.config.num_slices)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(items)))
    one_by_one = torch.cat([model.encode_corpus([it], batch_size=1) for it in items])
    torch.testing.assert_close(out, one_by_one, atol=2e-5, rtol=1e-4)  # sorting by length keeps the order
    torch.testing.assert_close(out[-3], out[-2])  # path and PIL image of the same file
    torch.testing.assert_close(out[-1], out[2], atol=1e-4, rtol=1e-3)  # wav file (16-bit) vs the waveform
    q = model.encode_queries(items[:4], instruction="Retrieve it", convert_to_numpy=True, show_progress_bar=True)
    assert isinstance(q, np.ndarray) and q.dtype == np.float32 and q.shape == (4, model.config.num_slices)
    assert not np.allclose(q, out[:4].numpy(), atol=1e-4)  # the instruction changes queries
    assert model.training is False


def test_bf16_autocast(model):
    items = _items(_media())[:5]
    a = model.encode_corpus(items)
    b = model.encode_corpus(items, bf16=True)
    assert b.dtype == torch.float32
    assert (a * b).sum(-1).min() > 0.9  # close in direction


def test_bad_inputs(model):
    m = _media()
    with pytest.raises(ValueError, match="image"):
        model([{"image": torch.rand(4, 8, 8)}])
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        model([{"image": torch.rand(3, 8, 8) * 16}])
    with pytest.raises(ValueError, match="placeholders"):
        model([{"text": "<image> <image>", "image": m["image"]}])
    with pytest.raises(ValueError, match="unknown keys"):
        model([{"txt": "typo"}])
    with pytest.raises(ValueError, match="empty"):
        model([{"text": ""}])
    with pytest.raises(ValueError, match="NaN"):
        model([{"audio": torch.full((100,), float("nan"))}])
    with pytest.raises(ValueError, match="audio"):
        model([{"audio": torch.randn(2, 3, 4)}])
    with pytest.raises(ValueError, match="video"):
        model([{"video": torch.rand(3, 8, 8)}])
    with pytest.raises(ValueError, match="items"):
        model.encode_corpus("a single string")
    with pytest.raises(ValueError, match="positions"):
        model(["x" * 100, {"text": "y" * 120, "image": [torch.rand(3, 8, 8)] * 100}])
    with pytest.raises(ValueError, match="no such image"):
        model([{"image": "/nonexistent/x.png"}])
    with pytest.raises(ValueError, match=r"items\[5\]\['image'\]\[0\]"):  # the caller's index, not the batch's
        model.encode_corpus(["a", "bb", "c", "dddd", "e", {"image": torch.rand(2, 8, 8)}], batch_size=2)


def test_no_audio_encoder_says_so():
    cfg = preset("tiny", audio_encoder=None)
    m = OmniRet.from_config(cfg)
    with pytest.raises(ValueError, match="no audio encoder"):
        m([{"audio": torch.randn(1000)}])


def test_save_load_round_trip_bit_identical(model, tmp_path):
    m = OmniRet.from_config("tiny")
    m.setup_stage(2)
    with torch.no_grad():  # make every trainable weight (LoRA B starts at zero) non-trivial
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.eval()
    m.save_pretrained(tmp_path / "ckpt")
    loaded = OmniRet.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.lora
    sd_a, sd_b = m.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    items = _items(_media())
    assert torch.equal(_embed(m, items), _embed(loaded, items))


def test_lora_trains_frozen_do_not(model):
    m = OmniRet.from_config("tiny")
    params = m.setup_stage(2)
    lora = {n: p for n, p in m.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    r = m.media_resampler.modality_latents
    assert torch.equal(r["video"], r["image"])  # stage 2 starts video latents from image latents
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if m.is_frozen_name(n)}
    assert frozen and not any(p.requires_grad for n, p in m.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    m.train()
    items = _items(_media())[:6]
    for _ in range(2):
        emb, aux = m(items)
        e = torch.nn.functional.normalize(emb, dim=-1)
        loss = -(e @ e.t()).logsumexp(-1).mean() * -1 + 0.1 * aux["diversity"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    changed = [n for n, p in m.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any(n.startswith("projectors.") for n in changed) and any(n.startswith("head.") for n in changed)
    assert any(n.startswith("media_resampler.") for n in changed)


def test_stage1_trainable_set():
    m = OmniRet.from_config("tiny")
    m.setup_stage(1)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.split(".")[0] in ("projectors", "media_resampler", "head") for n in names)
    assert not any("lora_" in n for n, _ in m.named_parameters())


@pytest.mark.parametrize("pooling,aswp_pooling", [("eos", "stm"), ("mean", "stm"), ("multi_vector", "stm"),
                                                  ("aswp", "max"), ("aswp", "mean"), ("aswp", "weighted")])
def test_table5_poolings(pooling, aswp_pooling):
    m = OmniRet.from_config(preset("tiny", pooling=pooling, aswp_pooling=aswp_pooling))
    m.setup_stage(1)
    items = _items(_media())[:4]
    emb, aux = m(items)
    dim = m.embedding_dim
    assert tuple(emb.shape) == ((4,) + dim if isinstance(dim, tuple) else (4, dim))
    (emb.float().pow(2).mean() + aux["diversity"]).backward()
    assert m.media_resampler.latents.grad is not None
    out = m.encode_corpus(items)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(out.shape[:-1]))
    s = OmniRet.similarity(out, out)
    assert s.shape == (4, 4)
    torch.testing.assert_close(s.diagonal(), torch.ones(4), atol=1e-5, rtol=0)


def test_feature_cache(tmp_path):
    m = OmniRet.from_config("tiny").eval()
    items = _items(_media())
    plain = m.encode_corpus(items)
    cache = m.enable_feature_cache(tmp_path / "cache")
    first = m.encode_corpus(items)
    assert cache.misses == 6 and cache.hits == 5  # 6 distinct media among the 11
    second = m.encode_corpus(items)
    assert cache.hits == 5 + 11
    torch.testing.assert_close(first, plain, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(second, first)
    files = list((tmp_path / "cache").rglob("*"))
    assert not any(f.name.endswith(".tmp") for f in files)
    entries = [f for f in files if f.suffix == ".safetensors"]
    entries[0].write_bytes(b"broken")  # a damaged entry is recomputed, not trusted
    third = m.encode_corpus(items)
    torch.testing.assert_close(third, first)
    # a changed encoder never reads the old entries: new weights loaded in place, or another model
    fp = m.encoders["image"].fingerprint()
    sd = {k: v + 0.01 for k, v in m.encoders["image"].state_dict().items()}
    m.encoders["image"].load_state_dict(sd)
    assert m.encoders["image"].fingerprint() != fp
    m2 = OmniRet.from_config(preset("tiny", seed=1)).eval()
    c2 = m2.enable_feature_cache(tmp_path / "cache")
    m2.encode_corpus(items[:2])
    assert c2.hits == 0


def test_prepared_batch_subset_and_precompute(tmp_path):
    m = OmniRet.from_config("tiny").eval()
    items = _items(_media())
    batch = m.prepare(items)
    idx = [8, 2, 7, 0]
    with torch.no_grad():
        sub = m(batch.subset(idx))[0]
        direct = m([items[i] for i in idx])[0]
    torch.testing.assert_close(sub, direct, atol=2e-5, rtol=1e-4)
    cache = m.enable_feature_cache(tmp_path / "c")
    assert m.precompute_media(items, batch_size=4) == 11
    assert cache.misses == 6
    m.encode_corpus(items)
    assert cache.hits == 5 + 11 and cache.misses == 6


def _count_encoder_items(m, monkeypatch) -> dict:
    """modality of each encoder -> media items its encode() has seen (videos go through the image encoder)."""
    seen = {name: 0 for name in m.encoders}
    for name, enc in m.encoders.items():
        def counted(batch, _run=enc.encode, _name=name):
            seen[_name] += len(batch)
            return _run(batch)
        monkeypatch.setattr(enc, "encode", counted)
    return seen


def test_frozen_features_are_computed_once_and_reused_by_subsets(monkeypatch):
    """encode_frozen_media runs each frozen encoder once over the batch; the model on subsets of that batch (what
    GradCache's chunks and replays are) reuses those tokens, runs no frozen encoder, and embeds as a fresh call."""
    m = OmniRet.from_config("tiny").double()
    m.setup_stage(2)
    m.eval()
    items = _items(_media())
    batch = m.prepare(items)
    seen = _count_encoder_items(m, monkeypatch)
    m.encode_frozen_media(batch)
    # 5 images, then the frames of 2 videos (4 sampled of 6, and a 2-frame clip) through the image tower
    assert seen == {"image": 5 + 4 + 2, "audio": 4}
    assert sorted(batch.features) == ["audio", "image", "video"]
    assert m.encode_frozen_media(batch) is batch and seen == {"image": 11, "audio": 4}  # already there: no rerun
    with torch.no_grad():
        direct = m([items[i] for i in [8, 2, 7, 0]])[0]
        seen.update(image=0, audio=0)
        for idx in ([8, 2, 7, 0], [1, 3, 5]):
            sub = batch.subset(idx)
            assert all(len(sub.features[mod]) == len(sub.media[mod]) for mod in sub.features)
            emb = m(sub)[0]
            if idx[0] == 8:
                torch.testing.assert_close(emb, direct, rtol=1e-9, atol=1e-10)
    assert seen == {"image": 0, "audio": 0}
    # without the preprocessed media (a step keeps one of the two), encoded at most 3 media per call, or prepared
    # in pieces and concatenated, the kept tokens still embed the same
    lean = m.encode_frozen_media(m.prepare(items), keep_media=False, max_media=3)
    assert all(x is None for mod in lean.features for x in lean.media[mod])
    pieces = PreparedBatch.concat([m.encode_frozen_media(m.prepare(items[a:b])) for a, b in ((0, 2), (2, 7), (7, 9))])
    assert pieces.media_offsets == batch.media_offsets and pieces.sequences == batch.sequences
    with torch.no_grad():
        for b in (lean, pieces):
            torch.testing.assert_close(m(b.subset([8, 2, 7, 0]))[0], direct, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="max_media"):
        m.encode_frozen_media(m.prepare(items), max_media=0)
    with pytest.raises(ValueError, match="image"):  # features for some pieces only: not one batch
        PreparedBatch.concat([m.prepare(items[1:2]), m.encode_frozen_media(m.prepare(items[1:2]))])


def test_trainable_towers_run_in_every_call(monkeypatch):
    """An encoder that takes gradient keeps no features: every call runs it with autograd, so its parameters
    get gradient; the frozen audio encoder's tokens are still reused."""
    cfg = preset("tiny")
    cfg.image_encoder.trainable = True
    m = OmniRet(cfg)
    m.setup_stage(1)
    m.train()
    assert m.takes_gradient("image") and m.takes_gradient("video") and not m.takes_gradient("audio")
    items = _items(_media())
    batch = m.encode_frozen_media(m.prepare(items))
    assert sorted(batch.features) == ["audio"]
    seen = _count_encoder_items(m, monkeypatch)
    emb, aux = m(batch.subset([1, 6]))
    assert seen == {"image": 2, "audio": 0}
    (emb.pow(2).mean() + aux["diversity"]).backward()
    grads = {n: p.grad for n, p in m.encoders["image"].named_parameters()}
    assert any("patch_embedding" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    # a tower whose parameters are all switched off is a fixed feature extractor too
    m.encoders["image"].requires_grad_(False)
    assert not m.takes_gradient("image")
    assert sorted(m.encode_frozen_media(m.prepare(items)).features) == ["audio", "image", "video"]


def test_config_is_not_mutated():
    cfg = preset("tiny", lora=True)  # a stage-2 config, as from_pretrained reads it
    before = cfg.to_dict()
    m = OmniRet(cfg)
    assert m.config.lora and any("lora_" in n for n, _ in m.named_parameters())
    assert cfg.to_dict() == before
    cfg = preset("tiny")
    m = OmniRet(cfg)
    m.setup_stage(2)
    assert m.config.lora and not cfg.lora
    cfg.diversity_p = 0.0  # the model keeps its own copy: later changes to the caller's config do not reach it
    assert m.config.diversity_p == preset("tiny").diversity_p
    assert m.composer.cfg is m.config and m.encoders["image"].model_config is m.config


def test_hidden_state_resampler_loads_old_key_names(tmp_path):
    """Checkpoints from before the rename (`head.resampler.*`) load into `head.hidden_state_resampler`, through
    load_state_dict and from_pretrained."""
    from safetensors.torch import load_file, save_file

    m = OmniRet.from_config("tiny")
    m.setup_stage(2)
    with torch.no_grad():
        for p in m.head.hidden_state_resampler.parameters():
            p.add_(torch.randn_like(p))
    new = m.state_dict()
    old = {k.replace("head.hidden_state_resampler.", "head.resampler."): v for k, v in new.items()}
    assert sum(k.startswith("head.resampler.") for k in old) > 4
    other = OmniRet.from_config(preset("tiny", seed=3))
    other.setup_stage(2)
    other.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in new.items())
    m.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    saved = load_file(str(weights))
    save_file({k.replace("head.hidden_state_resampler.", "head.resampler."): v for k, v in saved.items()},
              str(weights))
    loaded = OmniRet.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in new.items())


def test_setup_stage2_twice_keeps_video_latents():
    m = OmniRet.from_config("tiny")
    m.setup_stage(2)
    with torch.no_grad():
        m.media_resampler.modality_latents["video"].add_(1.0)
    trained = m.media_resampler.modality_latents["video"].detach().clone()
    m.setup_stage(2)  # e.g. a trainer resuming inside stage 2
    assert torch.equal(m.media_resampler.modality_latents["video"], trained)


def test_gradient_checkpointing_same_gradients():
    items = _items(_media())[:5]
    grads = []
    for ckpt in (False, True):
        m = OmniRet.from_config(preset("tiny", gradient_checkpointing=ckpt))
        m.setup_stage(2)
        torch.manual_seed(4)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        m.train()
        torch.manual_seed(5)
        emb, aux = m(items)
        (emb.pow(2).mean() + aux["diversity"]).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    # (the same config gives the same LoRA init, so the two models are identical)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["shared_no_latents", "separate", "none"])
def test_table5_media_resamplers(kind):
    m = OmniRet.from_config(preset("tiny", media_resampler=kind))
    m.setup_stage(2)
    if kind == "separate":  # stage 2 starts the video resampler as a copy of the image one
        sd_i, sd_v = m.media_resampler["image"].state_dict(), m.media_resampler["video"].state_dict()
        assert all(torch.equal(sd_i[k], sd_v[k]) for k in sd_i)
    items = _items(_media())[4:9]
    m.train()
    emb, aux = m(items)
    (emb.pow(2).mean() + aux["diversity"]).backward()
    if kind != "none":
        grads = [p.grad for n, p in m.named_parameters() if n.startswith("media_resampler.") and "latents" in n]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert aux["diversity"].item() > 0
    m.eval()
    batch = _embed(m, items)
    for i, it in enumerate(items):
        torch.testing.assert_close(_embed(m, [it])[0], batch[i], atol=2e-5, rtol=1e-4)
    if kind == "none":  # every encoder token reaches the LLM: 16 SigLIP patches per image
        seq_len = m.composer.build_inputs(*_inputs(m, [{"image": _media()["image"]}]))[0].shape[1]
        assert seq_len == 1 + 16 + 1


def _inputs(m, items):
    batch = m.prepare(items)
    resampled = {}
    for mod, xs in batch.media.items():
        if xs:
            tok, cu = m.encode_media(mod, xs)
            resampled[mod] = m.resample_media(mod, m._projector_for(mod)(tok), cu)
    return batch.sequences, batch.media_offsets, resampled


def _build_inputs_row_by_row(composer, sequences, media_offsets, resampled):
    """The obvious per-item construction build_inputs must equal (it gathers from one table instead)."""
    embed = composer.llm.get_input_embeddings()
    rows = []
    for seq, offsets in zip(sequences, media_offsets):
        parts = [embed(torch.tensor(v)) if k == "ids" else resampled[k][offsets[k] + v] for k, v in seq]
        rows.append(torch.cat(parts))
    T = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), T, rows[0].shape[1])
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


@pytest.mark.parametrize("kind", ["shared_no_latents", "none"])
def test_build_inputs_matches_row_by_row(kind):
    m = OmniRet.from_config(preset("tiny", media_resampler=kind))
    items = _items(_media())[::-1]  # the longest item first, text-only last: padding on several rows
    sequences, offsets, resampled = _inputs(m, items)
    leaves = {}
    for mod, x in resampled.items():  # fresh leaves, so the gradients of both constructions can be compared
        if isinstance(x, torch.Tensor):
            leaves[mod] = torch.randn_like(x).requires_grad_()
        else:
            leaves[mod] = [torch.randn_like(t).requires_grad_() for t in x]
    got, got_mask = m.composer.build_inputs(sequences, offsets, leaves)
    want, want_mask = _build_inputs_row_by_row(m.composer, sequences, offsets, leaves)
    assert torch.equal(got_mask, want_mask) and not got_mask.all()
    assert torch.equal(got, want)
    weight = torch.randn_like(want)
    flat = lambda v: [v] if isinstance(v, torch.Tensor) else list(v)
    params = [t for v in leaves.values() for t in flat(v)]
    g_got = torch.autograd.grad((got * weight).sum(), params)
    g_want = torch.autograd.grad((want * weight).sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert a.abs().sum() > 0


def test_bf16_frozen_backbones():
    """Frozen backbones in bfloat16 (how the paper-size model fits a GPU) with fp32 trainable parts."""
    cfg = preset("tiny")
    for bb in (cfg.llm, cfg.image_encoder, cfg.audio_encoder):
        bb.dtype = "bfloat16"
    m = OmniRet.from_config(cfg)
    assert m.composer.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    items = _items(_media())[4:8]
    ref = OmniRet.from_config("tiny").encode_corpus(items)
    out = m.encode_corpus(items)
    assert out.dtype == torch.float32 and (out * ref).sum(-1).min() > 0.9
    m.setup_stage(2)
    m.train()
    emb, aux = m(items)
    (emb.pow(2).mean() + aux["diversity"]).backward()
    lora = [p for n, p in m.named_parameters() if "lora_A" in n]
    assert lora and all(p.dtype == torch.float32 for p in m.trainable_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projectors.parameters())


def test_pool_instruction_false_pools_the_query_without_its_instruction():
    """pool_instruction=False: the LLM reads the instruction (it changes the query's token states) but the pooling
    head averages only the other tokens; candidates (no instruction) pool every token, as before."""
    m = OmniRet.from_config(preset("tiny", pooling="mean", pool_instruction=False)).eval()
    items = [{"text": "a small red apple", "instruction": "Find the drawing."}, "plain candidate text",
             {"text": "hello <image> there", "image": _media()["image"], "instruction": "Say it."}]
    batch = m.prepare(items)
    assert [k for k, _ in batch.sequences[0]].count("instruction") == 1
    assert all(k != "instruction" for k, _ in batch.sequences[1])
    sequences, offsets, resampled = _inputs(m, items)
    with torch.no_grad():
        embeds, mask = m.composer.build_inputs(sequences, offsets, resampled)
        hidden = m.composer(embeds, mask)
        got = m(items)[0]
    head_len = len(m.composer.tokenizer.encode(m.composer._template_head.format(instruction="Find the drawing.")))
    prefix = len(m.composer.tokenizer.prefix_ids)
    for i in range(len(items)):
        keep = mask[i].clone()
        if i != 1:  # the template's head sits after the prefix tokens
            n = head_len if i == 0 else len(m.composer.tokenizer.encode(
                m.composer._template_head.format(instruction="Say it.")))
            assert keep[prefix:prefix + n].all()
            keep[prefix:prefix + n] = False
        torch.testing.assert_close(got[i], hidden[i][keep].mean(0), rtol=1e-5, atol=1e-6)
    # the instruction still reaches the LLM: another instruction gives the query another embedding
    other = m([{"text": "a small red apple", "instruction": "Find a song."}])[0][0]
    assert not torch.allclose(other, got[0])
    # the paper's pooling (every token) differs for queries and is the same for the candidate
    paper = OmniRet.from_config(preset("tiny", pooling="mean")).eval()
    with torch.no_grad():
        full = paper(items)[0]
    assert not torch.allclose(full[0], got[0]) and torch.allclose(full[1], got[1], atol=1e-6)
