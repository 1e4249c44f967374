"""`omniret demo`'s flags: their defaults are DemoOptions', and they reach DemoOptions (no training here)."""
import dataclasses

import pytest

from omniret.cli import build_parser
from omniret.commands.demo import options_from_args
from omniret.demo.digits_demo import DemoOptions


def _options(*flags):
    return options_from_args(build_parser("demo").parse_args(["demo", "--output", "out", *flags]))


def _real_options(*flags):
    from omniret.commands.demo import real_options_from_args

    return real_options_from_args(build_parser("demo").parse_args(["demo", "--output", "out", *flags]))


def test_real_is_the_default_benchmark_and_its_flags_reach_its_options():
    from omniret.commands.demo import REAL_SMOKE
    from omniret.demo.real_demo import RealDemoOptions

    assert build_parser("demo").parse_args(["demo", "--output", "o"]).benchmark == "real"
    got, want = _real_options(), RealDemoOptions(output="out")
    for field in dataclasses.fields(RealDemoOptions):
        assert getattr(got, field.name) == getattr(want, field.name), field.name
    opts = _real_options("--steps", "7", "--lora-lr", "5e-4", "--no-baseline", "--max-items", "9", "--data-dir", "d",
                         "--feature-cache", "f", "--pooling", "mean")
    assert (opts.steps, opts.lora_lr, opts.baseline, opts.max_items, opts.data_dir, opts.feature_cache,
            opts.pooling) == (7, 5e-4, False, 9, "d", "f", "mean")
    smoke = _real_options("--smoke", "--steps", "999")
    for name, value in REAL_SMOKE.items():
        assert getattr(smoke, name) == value, name
    # the digits benchmark keeps its own defaults for the shared flags
    assert _options("--benchmark", "digits").steps == 450 and want.steps != 450


def test_configs_real_yaml_is_the_real_demos_recipe():
    import os

    from omniret.commands.train import load_config
    from omniret.demo.real_demo import RealDemoOptions, train_config
    from omniret.train.trainer import TrainConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "real.yaml"))
    want = train_config(RealDemoOptions(output="x"), "../runs/real-train")
    for key in ("resume", "progress_bar"):
        want.pop(key)
    assert cfg["train"] == want
    assert cfg["model"] == {"preset": "real"} and cfg["data"] == {"mbeir": "../data/real", "global_pool": True}
    TrainConfig.from_dict(cfg["train"])


def test_defaults_are_demo_options_defaults():
    got = _options()
    want = DemoOptions(output="out")
    for field in dataclasses.fields(DemoOptions):
        if field.name not in ("data", "build_index", "progress"):
            assert getattr(got, field.name) == getattr(want, field.name), field.name
    assert got.audio_speed == (0.8, 1.25) and got.audio_warp == (0.85, 1.2) and got.tower_warmup_epochs == 20


def test_flags_reach_the_options():
    opts = _options("--audio-speed", "0.9", "1.1", "--tower-warmup-epochs", "3", "--keep-graphs", "0",
                    "--no-source-negatives", "--lora-lr", "5e-4")
    assert opts.audio_speed == (0.9, 1.1) and opts.tower_warmup_epochs == 3 and opts.keep_graphs == 0
    assert opts.source_negatives is False and opts.lora_lr == 5e-4
    assert _options("--audio-speed", "1", "1").audio_speed is None
    opts = _options("--audio-warp", "0.9", "1.3", "--tower-lr", "0")
    assert opts.audio_warp == (0.9, 1.3) and opts.tower_lr == 0.0
    assert _options("--audio-warp", "1", "1").audio_warp is None
    opts = _options("--image-warmup-epochs", "7", "--no-image-affine")
    assert opts.image_warmup_epochs == 7 and opts.image_affine is False
    assert _options().image_warmup_epochs == 60 and _options().image_affine is True


def test_fixed_steps_by_default_and_the_budget_is_optional():
    opts = _options()
    assert opts.steps == 450 and opts.time_budget is None and opts.min_steps is None
    opts = _options("--time-budget", "60", "--min-steps", "5")
    assert opts.time_budget == 60.0 and opts.min_steps == 5


def test_smoke_sets_tiny_sizes():
    from omniret.commands.demo import SMOKE, SMOKE_DATA

    opts = _options("--smoke", "--steps", "999", "--seed", "3")
    for name, value in SMOKE.items():
        assert getattr(opts, name) == value, name
    assert opts.data.max_voices == SMOKE_DATA["max_voices"] and opts.data.seed == 3 and opts.seed == 3


def test_configs_demo_yaml_is_the_demos_recipe():
    """configs/demo.yaml (for `omniret train`) says what `omniret demo`'s defaults train, and both configs parse."""
    import os

    import yaml

    from omniret.commands.train import load_config
    from omniret.demo.digits_demo import train_config
    from omniret.train.trainer import TrainConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "demo.yaml"))
    want = train_config(DemoOptions(output="x"), "../runs/demo-train")
    for key in ("resume", "progress_bar"):
        want.pop(key)
    assert cfg["train"] == want
    assert cfg["model"] == {"preset": "demo"} and cfg["data"]["hard_negatives"] == 1
    TrainConfig.from_dict(cfg["train"])
    paper = load_config(os.path.join(root, "configs", "paper.yaml"))
    train = TrainConfig.from_dict(paper["train"])
    assert [s.batch_size for s in train.stages] == [2048, 3072] and train.stages[1].grad_accum == 2
    assert paper["model"] == {"preset": "paper"} and yaml.safe_dump(paper)


def test_a_run_cut_short_by_the_budget_says_so_and_fails_below_min_steps(monkeypatch, capsys):
    """run(): a time budget that stopped training before --min-steps is exit status 3 with one line on stderr; a
    cut run above it exits 0; results.md says in bold that the numbers are not the seeded run's."""
    import omniret.commands.demo as command
    import omniret.demo.digits_demo as demo
    from omniret.eval.evaluate import Results

    results = Results(tasks={"text->image": {"R@1": 0.5, "R@5": 0.9}},
                      details={"text->image": {"group": "textual binding", "queries": 60, "candidates": 719,
                                               "pool": "image", "primary": "R@5"}})

    def fake_run(opts, steps):
        info = {"steps": steps, "steps_planned": opts.steps, "stopped": "time_budget", "min_steps": 225,
                "too_few_steps": steps < 225}
        return {"results": results, "info": info, "history": []}

    monkeypatch.setattr(command, "missing_requirements", lambda: [])
    args = build_parser("demo").parse_args(["demo", "--benchmark", "digits", "--output", "out", "--time-budget", "5",
                                            "--no-index"])
    monkeypatch.setattr(demo, "run_demo", lambda opts: fake_run(opts, 12))
    assert command.run(args) == 3
    assert "stopped training after 12 of 450 steps, fewer than --min-steps 225" in capsys.readouterr().err
    monkeypatch.setattr(demo, "run_demo", lambda opts: fake_run(opts, 300))
    assert command.run(args) == 0
    text = demo.results_markdown(results, fake_run(DemoOptions(output="x"), 12)["info"])
    assert "**Training was cut short by the time budget: 12 of 450 steps.**" in text


def test_real_stage1_is_the_papers_warm_up_carved_from_the_steps():
    """--stage1-steps N: the first N of --steps train the new modules without LoRA on the single-modality tasks
    (stage 1), the rest every task with LoRA (stage 2); the dual encoder keeps --steps steps of every task."""
    import pytest

    from omniret.data.real_benchmark import COMPOSED_TASKS
    from omniret.demo.real_demo import baseline_train_config, task_counts, train_config

    opts = _real_options("--steps", "30", "--stage1-steps", "10", "--stage1-lr", "3e-4")
    stages = train_config(opts, None)["stages"]
    assert [(s["stage"], s["steps"]) for s in stages] == [(1, 10), (2, 20)]
    assert stages[0]["lr"] == 3e-4 and stages[1]["lr"] == opts.lr
    every = task_counts(opts)
    assert stages[1]["task_counts"] == every and len(every) == 7
    assert set(stages[0]["task_counts"]) == set(every) - {"image,text->image", "audio,text->image"}
    assert len(COMPOSED_TASKS) == 2
    assert [s.steps for s in baseline_train_config(opts, None).stages] == [30]
    assert [s["stage"] for s in train_config(_real_options("--steps", "30"), None)["stages"]] == [2]
    with pytest.raises(ValueError, match="stage1_steps"):
        train_config(_real_options("--steps", "10", "--stage1-steps", "10"), None)


@pytest.mark.parametrize("resampler", ["shared", "separate"])
def test_real_resampler_matrices_step_with_muon(resampler):
    """--muon-lr: exactly the resampler blocks' matrices (media and the pooling head's) form the Muon group at that
    rate; their latents, norms and ASWP's parameters stay on AdamW at --lr; --muon-lr 0 gives no Muon group."""
    from omniret.config import preset
    from omniret.demo.real_demo import train_config
    from omniret.model.omniret import OmniRet
    from omniret.train.optim import named_param_groups

    assert _real_options().muon_lr == 1e-3
    specs = train_config(_real_options("--muon-lr", "2e-3", "--lr", "3e-5", "--projector-muon-lr", "0"),
                         None)["param_groups"]
    model = OmniRet(preset("tiny", media_resampler=resampler))
    model.add_lora()
    params = model.trainable_parameters()
    groups = named_param_groups(model, params, specs, 3e-5, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g.get("optimizer") == "muon" for p in g["params"]}
    assert all(g["lr"] == 2e-3 for g in groups if g.get("optimizer") == "muon")
    blocks = {n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and "lora_" not in n
              and "resampler" in n and ".layers." in n}
    assert muon == blocks and any(n.startswith("media_resampler.") for n in muon)
    assert any(n.startswith("head.hidden_state_resampler.") for n in muon)
    rest = {names[id(p)]: g["lr"] for g in groups if g.get("optimizer") != "muon" for p in g["params"]}
    assert all(rate == 3e-5 for n, rate in rest.items() if "resampler" in n or n.startswith("head."))
    off = train_config(_real_options("--muon-lr", "0", "--projector-muon-lr", "0"), None)["param_groups"]
    assert not any(g.get("optimizer") == "muon" for g in off)


def test_real_projector_matrices_step_with_muon_and_their_biases_with_adamw():
    """--projector-muon-lr: the projectors' matrices (and only theirs, beside the resamplers' own Muon group) step
    with Muon at that rate; their biases keep AdamW at --projector-lr; 0 puts the matrices back on AdamW."""
    from omniret.config import preset
    from omniret.demo.real_demo import train_config
    from omniret.model.omniret import OmniRet
    from omniret.train.optim import named_param_groups

    assert _real_options().projector_muon_lr == 3e-3
    specs = train_config(_real_options("--projector-muon-lr", "4e-3", "--projector-lr", "2e-3", "--muon-lr", "1e-3"),
                         None)["param_groups"]
    model = OmniRet(preset("tiny"))
    model.add_lora()
    groups = named_param_groups(model, model.trainable_parameters(), specs, 3e-5, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    rate = {names[id(p)]: (g["lr"], g.get("optimizer", "adamw")) for g in groups for p in g["params"]}
    projector = {n: p for n, p in model.named_parameters() if n.startswith("projectors.") and p.requires_grad}
    assert projector and any(p.dim() == 2 for p in projector.values()) and any(p.dim() == 1 for p in projector.values())
    for n, p in projector.items():
        assert rate[n] == ((4e-3, "muon") if p.dim() == 2 else (2e-3, "adamw")), n
    assert {n for n, r in rate.items() if r == (4e-3, "muon")} == {n for n, p in projector.items() if p.dim() == 2}
    off = train_config(_real_options("--projector-muon-lr", "0"), None)["param_groups"]
    assert [g for g in off if "projectors." in g["match"]] == [{"match": ["projectors."], "lr": 1e-3}]


def test_real_projectors_learn_at_their_own_rate():
    """--projector-lr: the projectors' parameters (and only they) form a group at that rate; LoRA keeps its group,
    the resamplers and the head the stage's --lr."""
    from omniret.config import preset
    from omniret.demo.real_demo import train_config
    from omniret.model.omniret import OmniRet
    from omniret.train.optim import named_param_groups

    opts = _real_options("--projector-lr", "2e-3", "--lr", "3e-5", "--projector-muon-lr", "0")
    specs = train_config(opts, None)["param_groups"]
    assert {"match": ["projectors."], "lr": 2e-3} in specs
    assert _real_options().projector_lr == 1e-3
    model = OmniRet(preset("tiny"))
    model.add_lora()
    params = model.trainable_parameters()
    groups = named_param_groups(model, params, specs, 3e-5, 0.0)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict((id(p), n) for n, p in model.named_parameters())
    for p in params:
        name = names[id(p)]
        if "resampler" in name and ".layers." in name and p.dim() == 2:
            continue  # the Muon group (test_real_resampler_matrices_step_with_muon)
        want = 2e-3 if name.startswith("projectors.") else 1e-3 if "lora_" in name else 3e-5
        assert by_id[id(p)] == want, name
    assert any(n.startswith("projectors.") for n in map(names.get, map(id, params)))
