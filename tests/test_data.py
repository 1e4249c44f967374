"""The offline digits benchmark (a small subset, synthesised here) and the M-BEIR reader and validator."""
import json
import os

import numpy as np
import pytest
import torch

from omniret.data import digits, mbeir, tts

needs_tts = pytest.mark.skipif(bool(tts.missing_tools()), reason=f"needs espeak-ng and flite: {tts.INSTALL_HINT}")

SMALL = digits.DigitsConfig(max_voices=4, espeak_renderings={"train": 1, "test": 1}, flite_renderings=1,
                            max_images_per_class=6)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if tts.missing_tools():
        pytest.skip(f"needs espeak-ng and flite: {tts.INSTALL_HINT}")
    cache = str(tmp_path_factory.mktemp("digits"))
    return cache, digits.build(SMALL, cache_dir=cache, log=lambda *a: None)


# ------------------------------------------------------------------------------------------- digits

def test_image_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    tr, te = digits.split_images(labels, 0.4, seed=0)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(labels)
    for c in range(10):
        n = (labels == c).sum()
        assert (labels[te] == c).sum() == round(0.4 * n)
    tr2, te2 = digits.split_images(labels, 0.4, seed=0)
    assert np.array_equal(te, te2)
    assert not np.array_equal(te, digits.split_images(labels, 0.4, seed=1)[1])


@needs_tts
def test_voice_split_holds_out_whole_voices_of_both_engines():
    voices = tts.list_voices()
    assert sum(v.engine == "flite" for v in voices) >= 2 and sum(v.engine == "espeak-ng" for v in voices) >= 10
    split = digits.split_voices(voices, digits.DigitsConfig())
    train, test = {v.key for v in split["train"]}, {v.key for v in split["test"]}
    assert not train & test and train | test == {v.key for v in voices}
    for part in (split["train"], split["test"]):
        assert {v.engine for v in part} == {"espeak-ng", "flite"}
    # a test voice is unheard, but its kind of synthesis is trained on (kal, flite's only diphone voice, trains)
    assert {v.family for v in split["test"]} <= {v.family for v in split["train"]}
    assert "flite:kal" in train
    assert split == digits.split_voices(voices, digits.DigitsConfig())


def test_text_and_change_wordings_are_held_out():
    assert not set(digits.TEXT_TEMPLATES["train"]) & set(digits.TEXT_TEMPLATES["test"])
    for sign in (+1, -1):
        train = {w.format(k="two") for w in digits.CHANGE_WORDINGS["train"][sign]}
        test = {w.format(k="two") for w in digits.CHANGE_WORDINGS["test"][sign]}
        assert not train & test
    for d in range(10):
        for s, k in digits.valid_changes(d):
            assert 0 <= d + s * k <= 9


def test_benchmark_subset(small):
    _, bench = small
    tr, te = bench["train"], bench["test"]
    assert not set(tr.audio_voices) & set(te.audio_voices)  # no test voice is heard in training
    assert tr.images.shape[1:] == (8, 8) and 0 <= float(tr.images.min()) and float(tr.images.max()) <= 1
    assert tr.image_labels.bincount(minlength=10).tolist() == [6] * 10
    for split in (tr, te):
        assert sorted(set(split.audio_labels.tolist())) == list(range(10))
        for w in split.waves:
            assert w.dtype == np.float32 and w.ndim == 1 and 1600 < len(w) < 3 * tts.SAMPLE_RATE
            assert np.abs(w).max() == pytest.approx(0.9, abs=1e-3)
    item = te.image_item(0)
    assert item["image"].shape == (3, 8, 8)
    assert te.audio_item(0)["audio"].dtype == torch.float32


def test_cache_is_reused_and_deterministic(small, monkeypatch):
    cache, bench = small

    def forbidden(*a, **k):
        raise AssertionError("synthesised again although the cache holds the clips")

    monkeypatch.setattr(tts, "synthesize", forbidden)
    again = digits.build(SMALL, cache_dir=cache, log=lambda *a: None)
    for name in ("train", "test"):
        assert again[name].audio_voices == bench[name].audio_voices
        assert all(np.array_equal(a, b) for a, b in zip(again[name].waves, bench[name].waves))


@needs_tts
def test_synthesis_is_deterministic():
    r = tts.Rendering(tts.Voice("espeak-ng", "m3"), "en-gb", 1.1, 0.9)
    a, b = tts.synthesize("seven", r), tts.synthesize("seven", r)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, tts.synthesize("seven", tts.Rendering(r.voice, "en-gb", 0.8, 0.9)))


def test_eval_queries(small):
    _, bench = small
    te = bench["test"]
    for task in digits.TASKS:
        tq = digits.eval_queries(te, task)
        assert len(tq.items) == len(tq.targets) > 0
        assert all(it["instruction"] == digits.TASK_INSTRUCTIONS[task] for it in tq.items)
        assert tq.gallery == task.split("->")[1]
        assert ((tq.targets >= 0) & (tq.targets <= 9)).all()
    composed = digits.eval_queries(te, "image+text->audio")
    wordings = {w.format(k=n) for s in (1, -1) for w in digits.CHANGE_WORDINGS["test"][s] for n in ("one", "two", "three")}
    for item, target, label in zip(composed.items, composed.targets, te.image_labels):
        assert item["text"] in wordings
        assert set(item) == {"image", "text", "instruction"}
        assert target != label
    # the queries are the same on every call (seeded)
    again = digits.eval_queries(te, "image+text->audio")
    assert [i["text"] for i in again.items] == [i["text"] for i in composed.items]
    text = digits.eval_queries(te, "text->audio")
    assert len(text.items) == 10 * len(digits.TEXT_TEMPLATES["test"])


def test_missing_tools_message(monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None if name == "flite" else "/usr/bin/" + name)
    assert tts.missing_tools() == ["flite"]
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng flite"):
        tts.require_tools()


# ------------------------------------------------------------------------------------------- M-BEIR

def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_mbeir(root, broken=False):
    (root / "images").mkdir(parents=True)
    for i in range(4):
        (root / "images" / f"{i}.png").write_bytes(b"png")
    (root / "audio").mkdir()
    (root / "audio" / "a0.wav").write_bytes(b"wav")
    queries = [
        {"qid": "7:1", "query_txt": "a red dress", "query_img_path": None, "query_modality": "text",
         "pos_cand_list": ["7:10"], "neg_cand_list": []},
        {"qid": "7:2", "query_txt": "make it blue", "query_img_path": "images/0.png", "query_modality": "image,text",
         "pos_cand_list": ["7:11"], "neg_cand_list": []},
        {"qid": "7:3", "query_txt": None, "query_audio_path": "audio/a0.wav", "query_modality": "audio",
         "pos_cand_list": ["7:12"], "neg_cand_list": []},
    ]
    pool = [{"did": "7:10", "txt": None, "img_path": "images/1.png", "modality": "image"},
            {"did": "7:11", "txt": None, "img_path": "images/2.png", "modality": "image"},
            {"did": "7:12", "txt": None, "img_path": "images/3.png", "modality": "image"},
            {"did": "7:13", "txt": "a caption", "img_path": None, "modality": "text"}]
    qrels = ["7:1 0 7:10 1 0", "7:2 0 7:11 1 7", "7:2 0 7:10 1 7", "7:3 0 7:12 1 9"]
    if broken:
        queries.append("{not json")
        queries.append({"qid": "7:4", "query_txt": "x", "query_img_path": "images/missing.png",
                        "query_modality": "image,text", "pos_cand_list": ["7:10"], "neg_cand_list": []})
        qrels.append("7:4 0 7:99 1 7")
        qrels.append("7:4 0 7:10")
    _write_jsonl(root / "query" / "test" / "mbeir_shop_task7_test.jsonl", queries)
    _write_jsonl(root / "cand_pool" / "local" / "mbeir_shop_task7_cand_pool.jsonl", pool)
    _write_jsonl(root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl",
                 pool + [{"did": "8:1", "txt": "other", "img_path": None, "modality": "text"}])
    (root / "qrels" / "test").mkdir(parents=True)
    (root / "qrels" / "test" / "mbeir_shop_task7_test_qrels.txt").write_text("\n".join(qrels) + "\n")
    (root / "instructions").mkdir()
    rows = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3",
            "text\timage\tShop\t7\tFind the photo.\tShow the picture.\tRetrieve an image.",
            "text,image\timage\tShop\t7\tEdit and find.\t\t",
            "audio\timage\tShop\t7\tWhat makes this sound?\tFind its source.\t"]
    (root / "instructions" / "query_instructions.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_mbeir_reader(tmp_path):
    root = make_mbeir(tmp_path / "mbeir")
    problems, (tasks, pools, table) = mbeir.validate(str(root))
    assert problems == [], mbeir.format_report(problems)
    (task,) = tasks
    assert task.name == "shop_task7" and task.cand_modality == "image"
    assert task.relevant["7:2"] == {"7:11", "7:10"}  # qrels win over pos_cand_list
    assert [c.did for c in pools["shop_task7"]] == ["7:10", "7:11", "7:12", "7:13"]
    q2 = task.queries[1]
    assert q2.modality == "image,text" and q2.media["image"] == str(root / "images" / "0.png")
    item = mbeir.query_item(q2, table.choose(q2.qid, q2.modality, "image"))
    assert item == {"image": str(root / "images" / "0.png"), "text": "make it blue", "instruction": "Edit and find."}
    q3 = task.queries[2]
    assert set(mbeir.query_item(q3, None)) == {"audio"}
    assert mbeir.candidate_item(pools["shop_task7"][3]) == {"text": "a caption"}


def test_instruction_choice_is_seeded_per_query(tmp_path):
    root = make_mbeir(tmp_path / "mbeir")
    table = mbeir.InstructionTable.load(str(root / "instructions" / "query_instructions.tsv"))
    options = table.prompts("7", "text", "image")
    assert len(options) == 3
    picks = [table.choose(f"7:{i}", "text", "image", seed=0) for i in range(60)]
    assert set(picks) == set(options)  # all of them are used
    assert picks == [table.choose(f"7:{i}", "text", "image", seed=0) for i in range(60)]  # and reproducibly
    assert picks != [table.choose(f"7:{i}", "text", "image", seed=1) for i in range(60)]
    assert table.choose("7:1", "video", "text") is None


def test_validator_reports_every_problem_before_a_run(tmp_path):
    root = make_mbeir(tmp_path / "mbeir", broken=True)
    problems, _ = mbeir.validate(str(root))
    text = "\n".join(str(p) for p in problems)
    assert "not valid JSON" in text and ":5:" in text  # file and line of the malformed query
    assert "missing image file" in text and "missing.png" in text
    assert "7:99 is not in the shop_task7 pool" in text
    assert "expected `qid 0 did rel task_id`" in text
    assert len(problems) == 4
    report = mbeir.format_report(problems, limit=2)
    assert report.startswith("4 problem(s)") and "2 more" in report
    # file checks can be switched off for a quick syntax pass
    assert len(mbeir.validate(str(root), check_files=False)[0]) == 3


def test_validator_global_pool_and_missing_pieces(tmp_path):
    root = make_mbeir(tmp_path / "mbeir")
    problems, (tasks, pools, _) = mbeir.validate(str(root), use_global=True)
    assert problems == [] and tasks[0].pool_name == "union" and len(pools["union"]) == 5
    os.remove(root / "instructions" / "query_instructions.tsv")
    problems, _ = mbeir.validate(str(root), tasks=["shop_task7", "nope"])
    assert any("instruction table not found" in str(p) for p in problems)
    assert any("no query file for task 'nope'" in str(p) for p in problems)
    problems, _ = mbeir.validate(str(tmp_path / "empty"))
    assert any("no M-BEIR query files" in str(p) for p in problems)


# ----------------------------------------------------------------------------------------------------------
# training examples from M-BEIR-format files (omniret.data.mbeir_train)
# ----------------------------------------------------------------------------------------------------------
def test_train_set_draws_seeded_positives_negatives_and_instructions(tmp_path):
    from omniret.data.mbeir_train import MBEIRTrainSet

    root = make_mbeir(tmp_path / "mbeir")
    lines = (root / "query" / "test" / "mbeir_shop_task7_test.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["neg_cand_list"] = ["7:11", "7:12"]
    lines[0] = json.dumps(first)
    (root / "query" / "test" / "mbeir_shop_task7_test.jsonl").write_text("\n".join(lines) + "\n")
    data = MBEIRTrainSet(str(root), split="test", seed=3, hard_negatives=1)
    assert len(data) == 3 and data.groups == [("text->image", "7"), ("image,text->image", "7"), ("audio->image", "7")]
    assert data.tasks() == ["audio->image", "image,text->image", "text->image"]
    draws = [data.draw(0, step) for step in range(40)]
    assert {d["query"]["instruction"] for d in draws} == {"Find the photo.", "Show the picture.", "Retrieve an image."}
    assert all(d["candidate_id"] == "7:10" and d["candidate"] == {"image": str(root / "images" / "1.png")}
               for d in draws)
    assert {len(d["negatives"]) for d in draws} == {1}
    assert {d["negatives"][0]["image"] for d in draws} == {str(root / "images" / "2.png"), str(root / "images" / "3.png")}
    assert {data.draw(1, step)["candidate_id"] for step in range(40)} == {"7:10", "7:11"}  # every qrels positive
    assert draws == [data.draw(0, step) for step in range(40)]  # the same step draws the same
    assert [MBEIRTrainSet(str(root), split="test", seed=4).draw(0, s)["query"]["instruction"] for s in range(40)] != \
           [d["query"]["instruction"] for d in draws]
    assert data[2] == data.draw(2, 0) and data[2]["query"]["audio"] == str(root / "audio" / "a0.wav")
    assert data[1]["query"]["instruction"] == "Edit and find." and data[1]["query"]["text"] == "make it blue"


def test_train_set_reports_bad_input_before_training(tmp_path):
    """Missing media, unknown candidate ids (relevant or hard negative), a query without a positive: one
    ValueError listing every problem, raised when the data set is built (before any training)."""
    from omniret.commands.train import build_data
    from omniret.data.mbeir_train import MBEIRTrainSet

    root = make_mbeir(tmp_path / "mbeir", broken=True)
    path = root / "query" / "test" / "mbeir_shop_task7_test.jsonl"
    path.write_text(path.read_text() + json.dumps(
        {"qid": "7:5", "query_txt": "x", "query_modality": "text", "pos_cand_list": ["7:10"],
         "neg_cand_list": ["7:77"]}) + "\n" + json.dumps(
        {"qid": "7:6", "query_txt": "y", "query_modality": "text", "pos_cand_list": [], "neg_cand_list": []}) + "\n")
    with pytest.raises(ValueError) as err:
        MBEIRTrainSet(str(root), split="test")
    text = str(err.value)
    for needle in ("missing image file", "not valid JSON", "7:99 is not in the shop_task7 pool",
                   "hard negative '7:77'", "query 7:6 has no relevant candidate"):
        assert needle in text, needle
    with pytest.raises(ValueError, match="hard negative"):
        build_data({"mbeir": "mbeir", "split": "test"}, tmp_path, seed=0)
    with pytest.raises(ValueError, match="unknown keys"):
        build_data({"mbeir": "mbeir", "splitt": "test"}, tmp_path, seed=0)
    with pytest.raises(ValueError, match="no such directory"):
        build_data({"mbeir": "nope"}, tmp_path, seed=0)
    with pytest.raises(ValueError, match="hard_negatives"):
        MBEIRTrainSet(str(root), hard_negatives=-1)
