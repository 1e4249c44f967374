"""The promises of issue #21 (files, commands and data; the kernels' part is tests/test_kernel_hardening.py), one
test each, written to fail on the code before the fix.

No code runs from a file: checkpoints load with weights_only=True, `latest` names only a checkpoint of its own
directory, and a model directory cannot make us import a module. Nothing is lost: every write is atomic (a kill or
a full disk leaves the old file and no temporary one), a directory output replaces only our own bundle and never
loses the old one, and a run directory has one writer. Nothing is silently wrong: unloadable checkpoints, a bundle
of another model and a cache that does not fit its pool are an error or a recompute. Every expected failure of a
command is one line on stderr with exit status 2, and M-BEIR media paths never leave the data root.
"""
from __future__ import annotations

import errno
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# ------------------------------------------------------------------------------------------------------------
# shared fixtures: two tiny models (different weights, same dimension) saved with save_pretrained, a text corpus
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from omniret.config import preset
    from omniret.model.omniret import OmniRet

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):  # the seed sets the random weights
        OmniRet.from_config(preset("tiny", seed=seed)).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document number {i}"}) + "\n" for i in range(6)))
    return path


@pytest.fixture(scope="module")
def bundle(models, corpus, tmp_path_factory):
    from omniret.cli import main

    out = tmp_path_factory.mktemp("bundles") / "index"
    assert main(["index", "--model", str(models["a"]), "--corpus", str(corpus), "--output", str(out)]) == 0
    return out


def run_cli(argv, capsys):
    """(exit status, stderr) of `omniret ARGV` run in this process."""
    from omniret.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, command):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith(f"omniret {command}: error: "), err
    assert "Traceback" not in err


def temp_leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if ".tmp" in p.name or ".old-" in p.name]


def checkpoint_state(step):
    return {"global_step": step, "x": torch.full((3,), float(step))}


# ------------------------------------------------------------------------------------------------------------
# 1. no code execution from files
# ------------------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls exec(): what a hostile ckpt-*.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_hostile_pickle_checkpoint_does_not_run_code(tmp_path):
    """A ckpt-*.pt whose unpickling would run code is refused (an error naming it), and the code never runs."""
    from omniret.train.checkpoint import CheckpointManager

    marker = tmp_path / "marker"
    torch.save({"global_step": 7, "payload": _RunsCode(marker)}, tmp_path / "ckpt-000000007.pt")
    with pytest.raises(ValueError, match="ckpt-000000007.pt"):
        CheckpointManager(tmp_path).load_latest()
    assert not marker.exists()


def test_latest_pointer_only_names_a_checkpoint_of_its_own_directory(tmp_path):
    """`latest` holding a path (`../elsewhere/ckpt-*.pt`, an absolute path) is ignored: the newest checkpoint of
    the directory itself is loaded."""
    from omniret.train.checkpoint import CheckpointManager

    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    CheckpointManager(run).save(checkpoint_state(1), 1)
    CheckpointManager(elsewhere).save(checkpoint_state(99), 99)
    for pointer in ("../elsewhere/ckpt-000000099.pt", str(elsewhere / "ckpt-000000099.pt")):
        (run / "latest").write_text(pointer)
        with pytest.warns(UserWarning, match="latest"):
            assert CheckpointManager(run).load_latest()["global_step"] == 1


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """The RNG states a checkpoint holds (torch, Python, numpy) are tensors and plain data: they load with
    weights_only=True and restore every stream exactly."""
    from omniret.train.checkpoint import CheckpointManager, capture_rng, restore_rng

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.normal()  # numpy holds a cached gaussian
    CheckpointManager(tmp_path).save({"rng": capture_rng()}, 1)
    expected = (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    state = torch.load(tmp_path / "ckpt-000000001.pt", weights_only=True)
    restore_rng(state["rng"])
    assert (random.random(), np.random.normal(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_model_directory_cannot_import_a_module_it_names(tmp_path, monkeypatch):
    """A backbone path `pkg:<module>` imports only the built-in weight packages; any other module name is refused
    before it is imported (a model directory's config.json must not run code)."""
    from omniret.config import BackboneConfig
    from omniret.model.backbones import resolve_backbone_path

    marker = tmp_path / "imported"
    (tmp_path / "evil_weights.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\ndef get_model_path():\n    return {str(tmp_path)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="evil_weights"):
        resolve_backbone_path(BackboneConfig(kind="llm", path="pkg:evil_weights"), "llm")
    assert not marker.exists() and "evil_weights" not in sys.modules


# ------------------------------------------------------------------------------------------------------------
# 2. no data loss
# ------------------------------------------------------------------------------------------------------------
def test_index_output_that_is_not_a_bundle_is_refused_not_deleted(tmp_path, monkeypatch):
    """`omniret index --output DIR` on a directory that holds no bundle.json (the current directory included) is
    refused, and nothing in it is deleted."""
    from omniret.eval.index import SearchIndex

    idx = SearchIndex.build(np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32))
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not an index bundle"):
        idx.save(str(mine))
    assert (mine / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(mine)
    with pytest.raises(ValueError):
        idx.save(".")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert temp_leftovers(tmp_path) == []


def test_index_replacement_killed_before_the_rename_keeps_the_old_bundle(tmp_path, monkeypatch):
    """A bundle is replaced by building the new one beside it, moving the old one aside, renaming the new one in
    place and only then deleting the old one: a kill at the final rename leaves the old bundle whole."""
    from omniret.eval.index import SearchIndex

    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    out = tmp_path / "bundle"
    SearchIndex.build(x, ids=[f"old{i}" for i in range(8)]).save(str(out))
    real_rename = os.rename

    def killed_at_the_swap(src, dst, *a, **k):
        if "tmp" in os.path.basename(str(src)):  # the new bundle moving into place
            raise KeyboardInterrupt
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", killed_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        SearchIndex.build(x[:5], ids=[f"new{i}" for i in range(5)]).save(str(out))
    monkeypatch.undo()
    assert SearchIndex.load(str(out)).ids == [f"old{i}" for i in range(8)]
    assert temp_leftovers(tmp_path) == []


def test_encode_on_a_full_disk_keeps_the_previous_file(models, corpus, tmp_path, capsys, monkeypatch):
    """`omniret encode` that hits ENOSPC mid-write leaves the previous .npz intact (and no temporary file), and
    says so in one line with exit status 2."""
    import numpy.lib.format as npformat

    out = tmp_path / "emb.npz"
    assert run_cli(["encode", "--model", models["a"], "--input", corpus, "--output", out], capsys)[0] == 0
    before = dict(np.load(out))
    real_write_array = npformat.write_array

    def disk_full(fp, array, *args, **kwargs):
        fp.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(npformat, "write_array", disk_full)
    rc, err = run_cli(["encode", "--model", models["a"], "--input", corpus, "--output", out], capsys)
    monkeypatch.setattr(npformat, "write_array", real_write_array)
    assert_one_line_error(rc, err, "encode")
    assert "No space left on device" in err
    after = dict(np.load(out))
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert temp_leftovers(tmp_path) == []


def test_results_json_interrupted_mid_write_keeps_the_old_file(tmp_path):
    """results.json is written atomically: an error in the middle of writing it leaves the previous, valid file."""
    from omniret.eval.evaluate import Results, write_results

    path = tmp_path / "results.json"
    results = Results(tasks={"t": {"R@1": 0.5}}, details={"t": {"group": "g", "primary": "R@1"}})
    write_results(results, str(path))
    good = path.read_text()
    with pytest.raises(TypeError):  # the last field cannot be serialised: the write fails half-way
        write_results(results, str(path), zz_last=object())
    assert path.read_text() == good and json.loads(good)["tasks"]["t"]["R@1"] == 0.5
    assert temp_leftovers(tmp_path) == []


def test_a_data_cache_directory_is_published_whole_once(tmp_path):
    """Data caches (the digits audio, the digits M-BEIR files) appear whole or not at all: a build that fails
    half-way leaves no directory and no temporary one; when another process published first, its copy is kept."""
    from omniret.files import publish_directory_once

    root = tmp_path / "cache"

    def half_then_fail(tmp):
        Path(tmp, "half.npy").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_directory_once(str(root), half_then_fail)
    assert not root.exists() and list(tmp_path.iterdir()) == []

    publish_directory_once(str(root), lambda tmp: Path(tmp, "first").write_text("1"))
    publish_directory_once(str(root), lambda tmp: Path(tmp, "second").write_text("2"))  # a later publisher
    assert sorted(p.name for p in root.iterdir()) == ["first"] and list(tmp_path.iterdir()) == [root]


def test_checkpoint_write_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A checkpoint write that fails (ENOSPC at fsync, as delayed allocation reports a full disk) removes its
    temporary file; the previous checkpoint and `latest` are untouched."""
    from omniret.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path)
    mgr.save(checkpoint_state(1), 1)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        mgr.save(checkpoint_state(2), 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt", "latest"]
    assert mgr.load_latest()["global_step"] == 1


def test_two_trainers_cannot_share_an_output_dir(tmp_path):
    """A run directory takes a lock: a second trainer on the same output_dir is refused (naming the holder's
    PID) before it reads or writes anything; once the first is done the directory is free again."""
    from omniret.files import RunLock
    from omniret.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(output_dir=str(tmp_path), progress_bar=False, tensorboard=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with RunLock(tmp_path):  # the first trainer (its lock; another process in real life)
        with pytest.raises(ValueError, match=f"PID {os.getpid()}"):
            Trainer(torch.nn.Linear(2, 2), cfg).fit([])
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    with RunLock(tmp_path):
        pass


@pytest.mark.parametrize("which", ["real", "digits"])
def test_two_demos_cannot_share_an_output_folder(tmp_path, which, capsys):
    """`omniret demo` locks its output folder for the whole run (not only while a trainer writes train/): a
    second demo there stops before it builds, trains or writes anything, naming the holder's PID; the CLI prints
    that as one line and exits 2."""
    from omniret.cli import main
    from omniret.errors import RunLockedError
    from omniret.files import RunLock

    if which == "real":
        from omniret.demo.real_demo import RealDemoOptions, run_real_demo as run
        opts = RealDemoOptions(output=str(tmp_path), steps=1, data_dir=str(tmp_path / "no-data"))
    else:
        from omniret.demo.digits_demo import DemoOptions, run_demo as run
        opts = DemoOptions(output=str(tmp_path), steps=1)
    (tmp_path / "results.json").write_text("{}")
    with RunLock(tmp_path):  # the first demo (another process in real life)
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            run(opts, log=lambda *a: pytest.fail("the locked-out demo started"))
        if which == "digits":  # the command line: one line on stderr, exit status 2
            assert main(["demo", "--benchmark", "digits", "--output", str(tmp_path), "--steps", "1"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "another process" in err[0] and f"PID {os.getpid()}" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "results.json"]
    assert (tmp_path / "results.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------------------
# 3. no silent wrong answers
# ------------------------------------------------------------------------------------------------------------
def test_checkpoints_present_but_none_loadable_is_an_error_not_a_restart(tmp_path):
    """Checkpoint files of which none loads stop the run with an error naming them, before the metrics history
    is touched (a silent restart at step 0 would erase it)."""
    from omniret.train.trainer import TrainConfig, Trainer

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "ckpt-000000005.pt").write_bytes(b"\x80garbage")
    history = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(history)
    dataset = [{"query": {"text": "q"}, "candidate": {"text": "c"}, "task": "t", "dataset": "d"}]
    cfg = TrainConfig(output_dir=str(tmp_path), progress_bar=False, tensorboard=False)
    with pytest.raises(ValueError, match="ckpt-000000005.pt"):
        Trainer(torch.nn.Linear(2, 2), cfg).fit(dataset)
    assert (tmp_path / "metrics.jsonl").read_text() == history


def test_search_refuses_a_bundle_built_by_another_model(models, bundle, capsys):
    """`omniret search` with a model whose weight fingerprint differs from the bundle's (same dimension) is
    refused in one line; --allow-model-mismatch searches anyway with a warning; the right model searches."""
    query = ["search", "--index", bundle, "--text", "document number 3", "-k", "2"]
    rc, err = run_cli(query + ["--model", models["b"]], capsys)
    assert_one_line_error(rc, err, "search")
    assert "fingerprint" in err
    rc, err = run_cli(query + ["--model", models["b"], "--allow-model-mismatch"], capsys)
    assert rc == 0 and "warning" in err
    rc, err = run_cli(query, capsys)
    assert rc == 0 and err == ""


def _cached_pool(tmp_path):
    from omniret.eval.cache import EmbeddingCache, fingerprint_items
    from omniret.eval.evaluate import Pool

    pool = Pool("gallery", [{"x": torch.full((3,), float(i))} for i in range(4)], ids=[f"c{i}" for i in range(4)])
    cache = EmbeddingCache(str(tmp_path / "cache"), **({"notify": lambda m: None} if _takes_notify() else {}))
    key = f"gallery-model-{fingerprint_items(pool.items)}"
    return pool, cache, key


def _takes_notify():
    import inspect

    from omniret.eval.cache import EmbeddingCache

    return "notify" in inspect.signature(EmbeddingCache).parameters


def test_embedding_cache_that_does_not_fit_its_pool_is_recomputed(tmp_path):
    """A cached embedding file with another number of rows than the pool (or unreadable: 0 bytes) is recomputed
    and replaced, never used."""
    from omniret.eval.evaluate import encode_pool

    pool, cache, key = _cached_pool(tmp_path)
    calls = []

    def encode(items):
        calls.append(len(items))
        return torch.stack([it["x"] for it in items])

    cache.put(key, torch.zeros(10, 3))  # a stale file: 10 rows for a pool of 4
    emb = encode_pool(pool, encode, cache, "model")
    assert emb.shape == (4, 3) and calls == [4]
    assert encode_pool(pool, encode, cache, "model").shape == (4, 3) and calls == [4]  # the fixed file is used
    Path(cache.path(key)).write_bytes(b"")  # a 0-byte file
    assert encode_pool(pool, encode, cache, "model").shape == (4, 3) and calls == [4, 4]


def test_embedding_cache_with_other_ids_is_recomputed(tmp_path):
    """A cached file whose row ids are not the pool's (same count) is recomputed, with a one-line notice."""
    from omniret.eval.evaluate import encode_pool

    pool, cache, key = _cached_pool(tmp_path)
    notices = []
    cache.notify = notices.append
    cache.put(key, torch.zeros(4, 3), ids=["x0", "x1", "x2", "x3"])
    emb = encode_pool(pool, lambda items: torch.stack([it["x"] for it in items]), cache, "model")
    assert emb[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert len(notices) == 1 and "ids" in notices[0] and "\n" not in notices[0]


def test_torn_last_line_of_metrics_is_dropped_and_a_damaged_one_names_the_file(tmp_path):
    """metrics.jsonl whose last line a kill tore is resumed without it (a warning); a damaged line elsewhere is
    an error naming the file, not a bare JSONDecodeError."""
    from omniret.train.trainer import _Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="torn"):
        _Metrics(tmp_path, tensorboard=False, resume_step=5, enabled=True).close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        _Metrics(tmp_path, tensorboard=False, resume_step=5, enabled=True)


# ------------------------------------------------------------------------------------------------------------
# 4. one clear line per expected failure
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all"], ids=["0-byte", "garbage"])
def test_corrupt_model_weights_are_one_line(models, corpus, tmp_path, capsys, content):
    """A model directory whose safetensors file is empty or damaged: one line naming the file, exit 2."""
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(models["a"], bad)
    (bad / "model.safetensors").write_bytes(content)
    rc, err = run_cli(["encode", "--model", bad, "--input", corpus, "--output", tmp_path / "e.npz"], capsys)
    assert_one_line_error(rc, err, "encode")
    assert "model.safetensors" in err


def test_corrupt_faiss_index_is_one_line(bundle, tmp_path, capsys):
    """A bundle whose index.faiss is damaged: one line naming the file, exit 2."""
    import shutil

    bad = tmp_path / "index"
    shutil.copytree(bundle, bad)
    (bad / "index.faiss").write_bytes(b"\x00" * 64)
    rc, err = run_cli(["search", "--index", bad, "--text", "x"], capsys)
    assert_one_line_error(rc, err, "search")
    assert "index.faiss" in err


@pytest.mark.parametrize("name,text,expected", [
    ("wrong_type.json", json.dumps({"train": {"stages": [{"steps": "10"}]}, "data": {}}), "steps"),
    ("wrong_type_lr.json", json.dumps({"train": {"lr": "fast"}, "data": {}}), "lr"),
    ("unknown_key.json", json.dumps({"train": {"learning_rate": 1e-3}, "data": {}}), "learning_rate"),
    ("no_module.json", json.dumps({"data": {"factory": "no_such_module_h21:make"}}), "no_such_module_h21"),
    ("bad.yaml", "train: [unclosed\n  stages: {", "bad.yaml"),
    ("bad.json", "{\"train\": ", "bad.json"),
], ids=["stage-steps-type", "lr-type", "unknown-key", "unknown-factory-module", "bad-yaml", "bad-json"])
def test_bad_train_configs_are_one_line(tmp_path, capsys, name, text, expected):
    """`omniret train` with a config of the wrong types, unknown keys, an unknown factory module, bad YAML or
    JSON: one line naming the field or file, exit 2."""
    config = tmp_path / name
    config.write_text(text)
    rc, err = run_cli(["train", "--config", config, "--output-dir", tmp_path / "run", "--no-progress"], capsys)
    assert_one_line_error(rc, err, "train")
    assert expected in err


@pytest.mark.parametrize("config,expected", [
    ({"media_latents": "eight"}, "media_latents"), ([1, 2], "mapping"), ({"llm": 5}, "llm"),
    ({"llm": {"kind": "llm", "pathh": "x"}}, "pathh"), ({"llm": {"path": "x"}}, "llm.kind"),
], ids=["wrong-type", "not-a-mapping", "backbone-not-a-mapping", "unknown-backbone-key", "missing-kind"])
def test_bad_model_configs_are_one_line(tmp_path, capsys, config, expected):
    """A model config (`omniret info --config`, a model directory's config.json) with a field of the wrong type,
    an unknown or missing key: one line naming the field, exit 2."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    rc, err = run_cli(["info", "--config", path], capsys)
    assert_one_line_error(rc, err, "info")
    assert expected in err


def test_non_image_file_and_directory_as_file_are_one_line(models, bundle, corpus, tmp_path, capsys):
    """A text file given as --image, and a directory given as --input: one line each, exit 2."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    rc, err = run_cli(["search", "--index", bundle, "--image", notes], capsys)
    assert_one_line_error(rc, err, "search")
    assert "notes.txt" in err
    rc, err = run_cli(["encode", "--model", models["a"], "--input", tmp_path, "--output", tmp_path / "e.npz"], capsys)
    assert_one_line_error(rc, err, "encode")


def test_read_only_output_directory_is_one_line(models, corpus, tmp_path, capsys, monkeypatch):
    """An output directory the process may not write (EACCES; simulated, since tests may run as root): one
    line, exit 2."""
    import builtins
    import io

    locked = tmp_path / "read_only"
    locked.mkdir()
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and str(file).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    rc, err = run_cli(["encode", "--model", models["a"], "--input", corpus, "--output", locked / "e.npz"], capsys)
    monkeypatch.undo()
    assert_one_line_error(rc, err, "encode")
    assert "Permission denied" in err and "read_only" in err


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    """OMNIRET_DEBUG=1: the same failure raises with its traceback instead of the one line."""
    from omniret.cli import main

    config = tmp_path / "bad.json"
    config.write_text("{\"train\": ")
    monkeypatch.setenv("OMNIRET_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["train", "--config", str(config)])


# ------------------------------------------------------------------------------------------------------------
# 5. reads stay inside the data root
# ------------------------------------------------------------------------------------------------------------
def test_mbeir_media_paths_outside_the_root_are_refused(tmp_path):
    """M-BEIR media paths that are absolute, climb with `..`, or go through a symlink leading out of the root are
    reported by the validator and never become paths to open; a path inside the root is fine."""
    from omniret.data import mbeir

    root = tmp_path / "mbeir"
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok.png").write_bytes(b"png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private")
    (root / "img" / "link.png").symlink_to(secret)
    pool = root / "pool.jsonl"
    rows = [("1:1", "img/ok.png"), ("1:2", "../secret.png"), ("1:3", str(secret)), ("1:4", "img/link.png"),
            ("1:5", "img/../../secret.png")]
    pool.write_text("".join(json.dumps({"did": d, "txt": None, "img_path": p, "modality": "image"}) + "\n"
                            for d, p in rows))
    problems: list = []
    cands = mbeir.load_pool(str(pool), str(root), problems)
    flagged = {p.line for p in problems}
    assert flagged == {2, 3, 4, 5}, mbeir.format_report(problems)
    opened = [c.media.get("image") for c in cands if c.media.get("image")]
    assert opened == [os.path.join(str(root), "img/ok.png")]


def test_damaged_audio_cache_is_made_again(tmp_path, monkeypatch):
    """A damaged entry of the demo's speech cache (a 0-byte .npy) is synthesised again with a notice, not a
    traceback. (Synthesis is stubbed: the cache logic is what is tested.)"""
    from types import SimpleNamespace

    from omniret.data import digits

    monkeypatch.setattr(digits.tts, "require_tools", lambda: None)
    monkeypatch.setattr(digits.tts, "list_voices", lambda: [])
    monkeypatch.setattr(digits.tts, "tool_versions", lambda: {})
    clip = (3, SimpleNamespace(voice=SimpleNamespace(key="v"), accent=None, speed=1.0, pitch=50))
    monkeypatch.setattr(digits, "_audio_plan", lambda split, cfg: {"test": [clip]})
    made = []
    monkeypatch.setattr(digits, "_synthesize_all",
                        lambda clips, workers, progress: made.append(1) or [np.ones(10, np.float32) for _ in clips])
    cfg, logged = digits.DigitsConfig(), []
    digits.build_audio(cfg, cache_dir=str(tmp_path), log=logged.append)
    (waves,) = list(tmp_path.glob("audio-*/test_waves.npy"))
    waves.write_bytes(b"")
    out = digits.build_audio(cfg, cache_dir=str(tmp_path), log=logged.append)
    assert made == [1, 1] and out["test"]["waves"][0].tolist() == [1.0] * 10
    assert any("damaged" in line for line in logged)
