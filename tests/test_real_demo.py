"""`omniret demo` on the real benchmark (omniret/demo/real_demo.py), end to end at smoke sizes: a seeded subset
built from the installed packages, the frozen features, OmniRet and the dual-encoder baseline trained by the
Trainer, both evaluated, the index and one search. Skipped, with the reason, when a source is not installed."""
import json

import pytest
import torch

from omniret.data import real_benchmark


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    missing = {k: v for k, v in real_benchmark.source_status().items() if v}
    if missing:
        pytest.skip(f"real benchmark sources not installed: {missing}")
    from omniret.cli import main

    root = tmp_path_factory.mktemp("real_demo")
    out = root / "out"
    args = ["demo", "--smoke", "--output", str(out), "--data-dir", str(root / "data"),
            "--feature-cache", str(root / "features"), "--threads", "2"]
    status = main(args)
    return status, out, root, args


def test_smoke_run_writes_ours_and_the_baseline_for_every_task(smoke_run):
    status, out, root, _ = smoke_run
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    tasks = payload["tasks"]
    assert len(tasks) == len(real_benchmark.TASKS)
    base = payload["baselines"]["dual_encoder"]
    assert set(base) == set(tasks)
    for task, metrics in tasks.items():
        assert set(metrics) == {"R@1", "R@5", "R@10"} and set(base[task]) == {"R@1", "R@5", "R@10"}
        for m in (metrics, base[task]):
            assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1.0
    info = payload["info"]
    assert info["steps"] == info["steps_planned"] == 4 and info["stopped"] == "done"
    assert set(info["goals"]) == {"composed", "single"}
    for c in info["goals"].values():
        assert c["met"] == (c["difference"] >= c["needed"])
    assert (out / "results.png").stat().st_size > 10_000
    assert "dual encoder" in (out / "results.md").read_text()
    # the search ran against the index of the test galleries' images and recordings, with the query's own text
    hits = info["search"]["hits"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(("image" in h) != ("audio" in h) and "text" not in h for h in hits)
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(4))
    assert info["index"]["count"] >= len(hits)


def test_the_trained_models_load_and_search_from_the_command_line(smoke_run, capsys):
    status, out, _, _ = smoke_run
    from omniret.baselines.dual_encoder import DualEncoder
    from omniret.cli import main

    assert DualEncoder.from_pretrained(str(out / "baseline_model")) is not None
    query = json.loads((out / "results.json").read_text())["info"]["search"]["query"]
    capsys.readouterr()
    assert main(["search", "--index", str(out / "index"), "--text", query["text"], "-k", "3", "--json",
                 "--instruction", query["instruction"]]) == 0
    hits = json.loads(capsys.readouterr().out)
    first = json.loads((out / "results.json").read_text())["info"]["search"]["hits"][0]
    assert hits[0]["id"] == first["id"]  # the command line finds what the demo found


def test_a_second_run_reuses_the_benchmark_and_features_and_gives_the_same_numbers(smoke_run, tmp_path, capsys):
    status, out, root, args = smoke_run
    from omniret.cli import main

    again = tmp_path / "again"
    capsys.readouterr()
    assert main([a if a != str(out) else str(again) for a in args]) == 0
    log = capsys.readouterr().out
    assert "(cached)" in log and "0 encoded now" in log
    first, second = (json.loads((d / "results.json").read_text()) for d in (out, again))
    assert first["tasks"] == second["tasks"]
    assert first["baselines"] == second["baselines"]


class _Killed(Exception):
    """Stands for a kill: raised right after a checkpoint is written."""


def test_a_run_killed_mid_training_resumes_to_the_unkilled_runs_numbers(smoke_run, tmp_path, monkeypatch):
    """`omniret demo --resume` after a crash: killed right after OmniRet's step-2 checkpoint, the run goes on
    from it (steps 1-2 are not rerun, and the metrics log holds each of steps 1-4 once) and ends with the
    uninterrupted run's recall, the baseline's included."""
    import dataclasses

    from omniret.cli import build_parser
    from omniret.commands.demo import real_options_from_args
    from omniret.demo.real_demo import run_real_demo
    from omniret.train.checkpoint import CheckpointManager

    status, out, _, args = smoke_run
    again = tmp_path / "again"
    argv = [a if a != str(out) else str(again) for a in args]
    opts = dataclasses.replace(real_options_from_args(build_parser("demo").parse_args(argv)), checkpoint_every=2)
    save = CheckpointManager.save

    def save_then_die(self, state, step):
        path = save(self, state, step)
        if step == 2:
            raise _Killed(f"killed after {path.name}")
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_then_die)
    with pytest.raises(_Killed):
        run_real_demo(opts, log=lambda *a: None)
    monkeypatch.undo()
    assert not (again / "results.json").exists()
    before = (again / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2]

    run_real_demo(dataclasses.replace(opts, resume=True), log=lambda *a: None)
    after = (again / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4]
    assert after[:2] == before  # not rerun: a rerun step logs its own throughput
    first, resumed = (json.loads((d / "results.json").read_text()) for d in (out, again))
    assert resumed["info"]["steps"] == 4
    assert resumed["tasks"] == first["tasks"]
    assert resumed["baselines"] == first["baselines"]


def test_the_untrained_models_are_the_runs_start(smoke_run, tmp_path):
    """real_compose --untrained: the run's two models before their first step. Their media statistics are fitted as
    the Trainer fits them (buffers training never changes: equal to the trained models' to the bit); the weights
    that train differ from the trained ones; a run without its results.json is refused, naming the file."""
    _, out, root, _ = smoke_run
    from omniret.demo.real_compose import untrained_models
    from omniret.demo.real_demo import load_run_models

    trained = load_run_models(str(out), "test")
    start = untrained_models(str(out), str(root / "data"))
    assert set(start) == {"omniret_untrained", "dual_encoder_untrained"}
    for name in ("omniret", "dual_encoder"):
        before, after = start[f"{name}_untrained"].state_dict(), trained[name].state_dict()
        stats = [k for k in after if k.endswith((".mean", ".std", ".fitted")) and "media_norms" in k]
        assert stats, name
        for k in stats:
            assert torch.equal(before[k], after[k]), (name, k)
        assert bool(before[stats[0].rsplit(".", 1)[0] + ".fitted"])
        moved = [k for k in after if ("projector" in k or "head" in k) and k.endswith("weight")
                 and not torch.equal(before[k], after[k])]
        assert moved, name
    with pytest.raises(SystemExit, match="results.json"):
        untrained_models(str(tmp_path), str(root / "data"))


def test_the_analysis_tools_read_the_runs_own_benchmark_and_features(smoke_run, tmp_path, monkeypatch, capsys):
    """real_fit and real_compose read a run back with the options it ran with: its --data-dir, --feature-cache and
    subset, not the default benchmark under $OMNIRET_CACHE (which they would otherwise build, or read, and score the
    run's models on data it never saw); real_spread takes the same flags as `omniret demo`. A run without
    results.json is refused, naming the file."""
    _, out, root, _ = smoke_run
    from omniret.demo import real_compose, real_fit, real_spread
    from omniret.demo.real_demo import run_options

    opts = run_options(str(out), "test")
    saved = json.loads((out / "results.json").read_text())["info"]["options"]
    assert opts.data_dir == str(root / "data") and opts.feature_cache == str(root / "features")
    assert opts.max_items == saved["max_items"] is not None
    assert (opts.output, opts.progress) == (str(out), False)
    default_cache = tmp_path / "default_cache"
    monkeypatch.setenv("OMNIRET_CACHE", str(default_cache))
    report = real_fit.main(["--run", str(out), "--queries", "4", "--threads", "1"])
    assert set(report) == set(saved_tasks := json.loads((out / "results.json").read_text())["tasks"])
    for task in saved_tasks:
        assert report[task]["omniret"]["test"] == saved_tasks[task]
        assert 1 <= report[task]["omniret"]["train_queries"] <= 4
    composed = real_compose.main(["--run", str(out), "--threads", "1"])
    assert set(composed) == set(real_benchmark.COMPOSED_TASKS)
    scored = {"omniret": saved_tasks, "dual_encoder": json.loads((out / "results.json").read_text())["baselines"]
              ["dual_encoder"]}
    for task, rows in composed.items():  # the run's own models on the run's own queries: the run's recall
        assert set(rows) == {"omniret", "dual_encoder"}
        for name, row in rows.items():
            assert row["with"]["R@5"] == pytest.approx(scored[name][task]["R@5"]), (task, name)
    spread = real_spread.main(["--model", str(out / "model"), "--items", "4", "--threads", "1",
                               "--data-dir", opts.data_dir, "--feature-cache", opts.feature_cache,
                               "--max-items", str(opts.max_items)])
    assert set(spread["models"]) == {str(out / "model")}
    assert not default_cache.exists()  # nothing built or encoded under the default root
    with pytest.raises(SystemExit, match="results.json"):
        run_options(str(tmp_path), "test")
