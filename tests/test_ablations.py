"""omniret/demo/ablations.py without training: the summary over seeds, the table and the report from records."""
import json

import pytest

from omniret.demo import ablations


def _record(variant, seed, r5):
    tasks = {"emoji_imagetext2image": {"R@1": r5 / 2, "R@5": r5, "R@10": min(1.0, r5 * 1.5)},
             "openclipart_text2image": {"R@1": r5 / 4, "R@5": r5 / 2, "R@10": r5}}
    return {"variant": variant, "seed": seed, "steps": 3, "stopped": "done", "tasks": tasks}


def test_summary_is_the_mean_and_spread_over_seeds():
    recs = [_record("omniret", 0, 0.5), _record("omniret", 1, 0.7), _record("dual_encoder", 0, 0.4)]
    summary = ablations.summarise(recs)
    cell = summary["omniret"]["emoji_imagetext2image"]["R@5"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(0.1414213, 1e-5)
    assert (cell["min"], cell["max"]) == (0.5, 0.7)
    text = ablations.table(summary, "R@5")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert "60.0 ± 14.1" in rows["omniret"]
    assert "± " not in rows["dual_encoder"]  # one seed: no spread is claimed
    # composed mean (the emoji task) and single mean (openclipart) as the last two cells
    assert rows["dual_encoder"].rstrip(" |").endswith("40.0 | 20.0")


def test_report_writes_table_summary_and_plot_from_records_only(tmp_path, capsys):
    for rec in (_record("omniret", 0, 0.5), _record("omniret", 1, 0.7), _record("no_triplet", 0, 0.3)):
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs" / f"{rec['variant']}-s{rec['seed']}.json").write_text(json.dumps(rec))
    status = ablations.main(["--output", str(tmp_path), "--report", "--variants", "omniret", "no_triplet",
                             "--seeds", "0", "1"])
    assert status == 1  # no_triplet seed 1 is missing: the report says so by its exit status
    table = (tmp_path / "table.md").read_text()
    assert "Seeds per variant: omniret 2, no_triplet 1." in table
    assert json.loads((tmp_path / "summary.json").read_text())["omniret"]["openclipart_text2image"]["R@5"]["n"] == 2
    assert (tmp_path / "ablations.png").stat().st_size > 5000
    assert not list((tmp_path / "logs").iterdir())  # nothing ran


def test_every_variant_is_a_valid_change_to_the_options_and_the_preset():
    """A variant's changes are RealDemoOptions fields, and its model overrides build a valid `real` config (a typo
    would only show after an hour of sweeping)."""
    import dataclasses

    from omniret.config import preset
    from omniret.demo.real_demo import RealDemoOptions

    fields = {f.name for f in dataclasses.fields(RealDemoOptions)}
    for name, (description, changes) in ablations.VARIANTS.items():
        assert description and set(changes) - {"baseline"} <= fields, name
        overrides = changes.get("model_overrides", {})
        cfg = preset("real", **overrides)
        for key, value in overrides.items():
            assert getattr(cfg, key) == value, (name, key)
    assert preset("real").output_latents == 4
    assert preset("real", **ablations.VARIANTS["output_latents_8"][1]["model_overrides"]).output_latents == 8
    assert preset("real").media_latents == 8
    assert preset("real", **ablations.VARIANTS["media_latents_4"][1]["model_overrides"]).media_latents == 4


def test_a_variant_with_other_training_files_builds_another_benchmark_once_and_beside_the_given_one(monkeypatch):
    """The reference-negative variants read a benchmark whose training files differ: under --data-dir it goes in a
    folder beside the given one, named by its build's key (never over it), and the sweep builds each benchmark
    once before its runs start, so two runs side by side never build one folder at the same time."""
    import argparse

    from omniret.demo import real_demo

    args = argparse.Namespace(output="/tmp/unused", steps=3, data_dir="/data/real/", feature_cache=None,
                              max_items=None, max_eval_queries=None)
    plain, base = ablations.variant_options("dual_encoder", 0, args)
    marked, marked_base = ablations.variant_options("dual_encoder_reference_negatives", 1, args)
    assert base and marked_base and plain.data_dir == "/data/real/"
    key = real_demo.benchmark_config(marked).key()
    assert key != real_demo.benchmark_config(plain).key()
    assert marked.data_dir == f"/data/real-{key}" and marked.hard_negatives == 1
    args.data_dir = None
    default, _ = ablations.variant_options("omniret_reference_negatives", 0, args)
    assert default.data_dir is None and real_demo.benchmark_config(default).reference_negatives

    built = []
    monkeypatch.setattr(real_demo, "ensure_benchmark", lambda opts, log=print: built.append(
        (opts.data_dir, real_demo.benchmark_config(opts).key())))
    todo = [(v, s) for s in (0, 1) for v in ("omniret", "dual_encoder", "omniret_reference_negatives",
                                               "dual_encoder_reference_negatives")]
    ablations.prepare(todo, args)
    assert len(built) == len(set(built)) == 2
