"""Sampler, checkpoints and the trainer, including a run killed with SIGKILL and resumed."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import torch.nn as nn

from omniret.train import CheckpointManager, StageConfig, TaskBalancedSampler, TrainConfig, Trainer
from omniret.train.checkpoint import atomic_write_bytes
from toy import ToyPairs, toy_dataset, toy_model
from omniret.train.trainer import warmup_cosine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py says why


def _groups(spec):
    """spec: {task: {dataset: n}} -> groups list."""
    out = []
    for task, dss in spec.items():
        for ds, n in dss.items():
            out += [(task, ds)] * n
    return out


# ----------------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------------
def test_sampler_batches_are_task_balanced():
    spec = {"t2i": {"a": 50, "b": 40, "c": 30}, "i2t": {"a": 60}, "t2a": {"x": 45, "y": 45},
            "a2t": {"x": 70}, "comp": {"z": 55, "w": 35}}
    groups = _groups(spec)
    s = TaskBalancedSampler(groups, batch_size=22, tasks_per_batch=3, seed=3)
    n_datasets_seen = Counter()
    for _ in range(40):
        batch = s.next_batch()
        assert len(batch) == 22 and len(set(batch)) == 22
        per_task = Counter(groups[i][0] for i in batch)
        assert len(per_task) == 3
        assert max(per_task.values()) - min(per_task.values()) <= 1
        for task in per_task:
            dss = {groups[i][1] for i in batch if groups[i][0] == task}
            assert 1 <= len(dss) <= 2
            n_datasets_seen[len(dss)] += 1
    assert n_datasets_seen[1] > 0 and n_datasets_seen[2] > 0  # one or two data sets per task both occur


def test_sampler_epochs_cover_each_dataset_before_repeating():
    groups = _groups({"t": {"a": 13}})
    s = TaskBalancedSampler(groups, batch_size=5, tasks_per_batch=1, seed=0)
    drawn = [i for _ in range(13) for i in s.next_batch()]  # 65 = five full epochs of 13
    for e in range(5):
        assert sorted(drawn[13 * e: 13 * (e + 1)]) == list(range(13))


def test_sampler_state_round_trip_and_task_filter():
    groups = _groups({"t2i": {"a": 20, "b": 9}, "i2t": {"a": 12}, "vid": {"v": 30}})
    s = TaskBalancedSampler(groups, 8, tasks_per_batch=2, tasks=["t2i", "i2t"], seed=5)
    for _ in range(7):
        s.next_batch()
    state = s.state_dict()
    want = [s.next_batch() for _ in range(10)]
    s2 = TaskBalancedSampler(groups, 8, tasks_per_batch=2, tasks=["t2i", "i2t"], seed=999)
    s2.load_state_dict(state)
    assert [s2.next_batch() for _ in range(10)] == want
    assert all(groups[i][0] != "vid" for b in want for i in b)
    with pytest.raises(ValueError, match="tasks"):
        TaskBalancedSampler(groups, 8, tasks=["nope"])
    with pytest.raises(ValueError, match="batch_size"):
        TaskBalancedSampler(groups, 0)


def test_sampler_small_dataset_gives_distinct_examples():
    groups = _groups({"t": {"a": 3}, "u": {"b": 40}})
    s = TaskBalancedSampler(groups, 20, tasks_per_batch=2, seed=1)
    for _ in range(10):
        b = s.next_batch()
        assert len(set(b)) == len(b)  # a data set smaller than its share is not repeated within a batch


# ----------------------------------------------------------------------------------------------------------
# schedule and checkpoints
# ----------------------------------------------------------------------------------------------------------
def test_warmup_cosine():
    vals = [warmup_cosine(s, 10, 3, 0.1) for s in range(11)]
    assert vals[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert vals[3] == pytest.approx(1.0) and vals[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals[3:], vals[4:]))


def test_checkpoint_atomic_and_falls_back_past_a_torn_file(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save({"step": step, "x": torch.full((3,), float(step))}, step)
    assert [p.name for p in mgr.list()] == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert mgr.load_latest()["step"] == 3
    # a torn newer file (as a writer without atomic rename would leave) is skipped
    (tmp_path / "ckpt-000000004.pt").write_bytes(b"\x80garbage")
    atomic_write_bytes(tmp_path / "latest", b"ckpt-000000004.pt")
    assert mgr.load_latest()["step"] == 3
    (tmp_path / "latest").unlink()
    assert mgr.load_latest()["step"] == 3


# ----------------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------------
def _cfg(out, **kw):
    base = dict(stages=[StageConfig(1, 4, 12, tasks=["text->image", "image->text", "text->audio"]),
                        StageConfig(2, 4, 12)],
                chunk_size=5, lr=3e-3, warmup_steps=2, tasks_per_batch=2, output_dir=str(out),
                checkpoint_every=3, progress_bar=False, seed=11)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


MUON_GROUPS = [{"match": ["head."], "lr": 3e-3, "optimizer": "muon"}]


@pytest.mark.parametrize("groups", [[], MUON_GROUPS], ids=["adamw", "muon"])
def test_two_stages_train_and_resume_in_process(tmp_path, groups):
    """A run stopped after 5 of 8 steps and resumed in a fresh model ends bit for bit where the whole run ends;
    with the head's matrices on Muon (omniret.train.optim.MultiOptimizer) too."""
    data = toy_dataset(per_dataset=10)
    full_model = toy_model(seed=1)
    before = _params(full_model)
    full = Trainer(full_model, _cfg(tmp_path / "full", param_groups=groups)).fit(data)
    assert full.steps == 8 and full.stopped == "done"
    after = _params(full_model)
    # stage 1 keeps the text table frozen; stage 2 trains it and starts audio latents from image latents
    assert not torch.equal(before["text.weight"], after["text.weight"])
    assert all(h["stage"] == 1 for h in full.history[:4]) and all(h["stage"] == 2 for h in full.history[4:])
    assert all(math_finite(h["loss"]) for h in full.history)

    part_model = toy_model(seed=1)
    part = Trainer(part_model, _cfg(tmp_path / "part", param_groups=groups)).fit(data, max_steps=5)
    assert part.stopped == "max_steps" and part.steps == 5
    resumed_model = toy_model(seed=1)  # a fresh process would build the model anew
    rest = Trainer(resumed_model, _cfg(tmp_path / "part", param_groups=groups)).fit(data)
    assert rest.steps == 8 and len(rest.history) == 3
    assert full.stage_steps == rest.stage_steps == {"stage0": 4, "stage1": 4} and part.stage_steps == {"stage0": 4,
                                                                                                      "stage1": 1}
    for k, v in after.items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    ref = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines] == [x["loss"] for x in ref]


def math_finite(x):
    return x == x and abs(x) != float("inf")


def test_gradient_accumulation_bf16_and_learnable_temperature(tmp_path):
    data = toy_dataset(per_dataset=10)
    model = toy_model(seed=2)
    cfg = _cfg(tmp_path, stages=[StageConfig(2, 3, 8)], grad_accum=2, bf16=True, learnable_temperature=True,
               lr=5e-2, checkpoint_every=0)
    res = Trainer(model, cfg).fit(data)
    assert res.steps == 3 and res.samples == 3 * 2 * 8
    assert all(math_finite(h["loss"]) for h in res.history)
    assert res.history[-1]["tau"] != pytest.approx(0.07, abs=1e-6)  # the temperature trained
    assert os.listdir(tmp_path / "tensorboard")


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    res = Trainer(toy_model(), _cfg(tmp_path)).fit(toy_dataset(per_dataset=6), time_budget_s=0.0)
    assert res.stopped == "time_budget" and res.steps == 0


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"lr": 1e-3, "lrr": 2})
    with pytest.raises(ValueError, match="stages\\[0\\]"):
        TrainConfig.from_dict({"stages": [{"stage": 1, "step": 3}]})
    cfg = TrainConfig.from_dict({"stages": [{"stage": 2, "steps": 3, "batch_size": 4}], "adam_betas": [0.8, 0.9]})
    assert cfg.stages[0].steps == 3 and cfg.adam_betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="name must be its own"):
        TrainConfig.from_dict({"stages": [{"name": "a"}, {"name": "a"}]})


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line(tmp_path):
    """Version-1 checkpoints (a sampler instead of the stage objective's state) are not resumed as if new."""
    from omniret.errors import InputError

    CheckpointManager(tmp_path / "checkpoints").save({"version": 1, "stage_index": 0, "stage_step": 2,
                                                      "global_step": 2, "samples": 24}, 2)
    with pytest.raises(InputError, match="version 1 was written by an older omniret"):
        Trainer(toy_model(), _cfg(tmp_path)).fit(toy_dataset(per_dataset=4))


# ----------------------------------------------------------------------------------------------------------
# kill -9 and resume: the same final weights as an unkilled run
# ----------------------------------------------------------------------------------------------------------
def _write_config(path, out_dir, yaml_format=False):
    cfg = {
        "model": {"factory": "toy:toy_model", "kwargs": {"seed": 4}},
        "data": {"factory": "toy:toy_dataset", "kwargs": {"per_dataset": 10}},
        "train": {"stages": [{"stage": 1, "steps": 5, "batch_size": 12}, {"stage": 2, "steps": 5, "batch_size": 12}],
                  "chunk_size": 5, "lr": 3e-3, "warmup_steps": 2, "tasks_per_batch": 2, "checkpoint_every": 1,
                  "output_dir": str(out_dir), "progress_bar": False, "seed": 5},
    }
    if yaml_format:
        import yaml
        path.write_text(yaml.safe_dump(cfg))
    else:
        path.write_text(json.dumps(cfg))
    return path


def _train_cmd(config):
    return [sys.executable, "-m", "omniret.cli", "train", "--config", str(config)]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _final_model(out_dir):
    state = CheckpointManager(out_dir / "checkpoints").load_latest()
    assert state is not None
    return state


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    # the unkilled run, in this process, through the same command entry point
    from omniret.cli import main
    assert main(["train", "--config", str(_write_config(tmp_path / "clean.json", tmp_path / "clean"))]) == 0
    clean = _final_model(tmp_path / "clean")
    assert clean["global_step"] == 10

    killed_cfg = _write_config(tmp_path / "killed.yaml", tmp_path / "killed", yaml_format=True)
    mgr = CheckpointManager(tmp_path / "killed" / "checkpoints")
    kills = 0
    for kill_after in (2, 6):  # once in stage 1, once in stage 2 (mid-step or mid-write: whatever it hits)
        proc = subprocess.Popen(_train_cmd(killed_cfg), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                latest = mgr.latest_path()
                if latest is not None and int(latest.name[5:14]) >= kill_after:
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert kills == 2, "the run finished before it could be killed; the test proves nothing"
    assert _final_model(tmp_path / "killed")["global_step"] < 10
    done = subprocess.run(_train_cmd(killed_cfg), env=_env(), timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _final_model(tmp_path / "killed")
    assert resumed["global_step"] == 10
    for k, v in clean["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for a, b in zip(clean["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    clean_lines = [json.loads(x) for x in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert [x["loss"] for x in lines] == [x["loss"] for x in clean_lines]


def test_a_non_finite_gradient_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    """A step whose gradient is not finite raises a FloatingPointError naming the step, before the optimizer
    turns the weights into NaN; the weights and the newest checkpoint are those of the step before."""
    from omniret.train.grad_cache import GradCache

    step, calls, before = GradCache.step, [], {}

    def poisoned(self, *args, **kw):
        stats = step(self, *args, **kw)
        calls.append(1)
        if len(calls) == 5:
            before.update(_params(model))
            p = next(p for p in self.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr(GradCache, "step", poisoned)
    model = toy_model(seed=3)
    cfg = _cfg(tmp_path, max_grad_norm=None, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"step 5: .*gradient norm nan.*step 4 \(newest checkpoint: step 4\)"):
        Trainer(model, cfg).fit(toy_dataset(per_dataset=10))
    after = _params(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    resumed = toy_model(seed=3)
    monkeypatch.setattr(GradCache, "step", step)
    res = Trainer(resumed, cfg).fit(toy_dataset(per_dataset=10), max_steps=0)
    assert res.steps == 4  # the run goes on from the last good step


def test_the_command_line_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    from omniret.cli import main

    monkeypatch.delenv("OMNIRET_DEBUG", raising=False)
    missing = tmp_path / "none.json"
    assert main(["train", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"omniret train: error: --config: no such file {missing}"
    monkeypatch.setenv("OMNIRET_DEBUG", "1")  # the traceback, for a developer
    with pytest.raises(ValueError, match="no such file"):
        main(["train", "--config", str(missing)])


# ----------------------------------------------------------------------------------------------------------
# the features the demo's recipe needs, used by config
# ----------------------------------------------------------------------------------------------------------
def test_negatives_mask_matches_a_direct_count():
    from omniret.train.trainer import negatives_mask

    gen = torch.Generator().manual_seed(0)
    kinds = [("image",), ("audio",), ("text",), ("image", "text")]
    media = lambda c: tuple(k for k in ("image", "audio", "video") if k in c) or ("text",)  # noqa: E731
    for trial in range(6):
        n_c = 7 + trial
        n_q = 4 + trial % 3
        cands = []
        for _ in range(n_c):
            kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
            cands.append({k: 0 for k in kind})
        ids = [int(torch.randint(6, (1,), generator=gen)) for _ in range(n_c)]
        relevant = [set(torch.randint(6, (2,), generator=gen).tolist()) for _ in range(n_q)]
        by_modality = trial % 2 == 0
        got = negatives_mask(cands, ids, relevant, n_q, by_modality)
        for i in range(n_q):
            for j in range(n_c):
                want = ids[i] == ids[j] or ids[j] in relevant[i] or (by_modality and media(cands[i]) != media(cands[j]))
                assert bool(got[i, j]) == want, (trial, i, j)


def test_param_groups_set_each_groups_rate_and_freeze_stops_parameters(tmp_path):
    """A group at lr 0 does not move (AdamW's decay is lr x weight_decay: none either); a frozen name neither,
    and it is not trainable; the default group trains."""
    model = toy_model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(tmp_path, stages=[StageConfig(1, 3, 12, freeze=["text."])], output_dir=None,
               param_groups=[{"match": ["projectors."], "lr": 0.0}])
    Trainer(model, cfg).fit(toy_dataset(per_dataset=6))
    after = dict(model.named_parameters())
    for name, p in after.items():
        same = torch.equal(p, before[name])
        if name.startswith(("projectors.", "text.")):
            assert same, name
        elif name.startswith("head."):
            assert not same, name
    assert not any(p.requires_grad for n, p in after.items() if n.startswith("text."))
    with pytest.raises(ValueError, match="param_groups\\[0\\]"):
        TrainConfig(param_groups=[{"match": "x"}]).validate()


def test_task_counts_fix_every_batch():
    groups = [("a", "d1")] * 10 + [("b", "d2")] * 7 + [("c", "d3")] * 9
    sampler = TaskBalancedSampler(groups, batch_size=99, task_counts={"a": 2, "c": 3}, seed=4)
    for _ in range(6):
        batch = sampler.next_batch()
        assert Counter(groups[i][0] for i in batch) == {"a": 2, "c": 3}
    with pytest.raises(ValueError, match="task_counts"):
        TaskBalancedSampler(groups, 4, task_counts={"a": 0})


def test_tower_augmentations_by_name():
    from omniret.train import augment
    from omniret.train.trainer import tower_augmentations

    items, features = tower_augmentations({"image": "random_affine", "audio": "speed_perturb:0.9:1.1",
                                           "audio_features": "warp_frequencies"})
    assert items["image"] is augment.random_affine and features["audio"] is augment.warp_frequencies
    assert items["audio"].func is augment.speed_perturb and items["audio"].keywords == {"low": 0.9, "high": 1.1}
    for bad in ({"image": "speed_perturb"}, {"video": "random_affine"}, {"audio": "speed_perturb:1"}):
        with pytest.raises(ValueError, match="augment"):
            tower_augmentations(bad)


def test_a_tower_warmup_stage_needs_epochs_and_labelled_data(tmp_path):
    with pytest.raises(ValueError, match="needs epochs"):
        TrainConfig(stages=[StageConfig(kind="tower_warmup")]).validate()
    cfg = _cfg(tmp_path, stages=[StageConfig(1, 0, 4, kind="tower_warmup", epochs={"image": 1})], output_dir=None)
    with pytest.raises(ValueError, match="labelled_media"):
        Trainer(toy_model(), cfg).fit(toy_dataset(per_dataset=4))


class _TinyTower(nn.Module):
    """A media tower as the warm-up stage needs one: preprocess, encode -> (packed tokens, cu_seqlens), out_dim."""

    def __init__(self, dim_in=12, out_dim=6):
        super().__init__()
        self.out_dim = out_dim
        self.lin = nn.Linear(dim_in, out_dim)

    @property
    def device(self):
        return self.lin.weight.device

    def preprocess(self, x, name):
        return torch.as_tensor(x, dtype=torch.float32)

    def encode(self, batch):
        x = self.lin(torch.stack(batch))
        tokens = torch.stack([x, 0.5 * x], dim=1).flatten(0, 1)  # two tokens per item
        return tokens, torch.arange(0, 2 * len(batch) + 1, 2, dtype=torch.int32)


class _DrawsAndLabels(ToyPairs):
    """Toy pairs that record each contrastive draw number and hold labelled images for a warm-up stage."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.draws = []

    def draw(self, i, n):
        self.draws.append(n)
        return self[i]

    def labelled_media(self, modalities):
        assert list(modalities) == ["image"]
        items = [self._media(self.image_protos, k, noise) for _, k, noise in self.examples]
        return {"image": (items, torch.tensor([k for _, k, _ in self.examples]))}


def test_a_warmup_stage_then_contrastive_stages_in_one_loop(tmp_path):
    """A tower warm-up stage, then two contrastive stages: every stage's optimizer steps are the run's (global_step,
    metrics, stage_steps), the warm-up's report is in the result, and the contrastive draw numbers count contrastive
    micro-batches only (0, 1, 2, then 3 x 2 + micro with accumulation 2): the warm-up leaves the data as it is."""
    model = toy_model(seed=5)
    model.encoders = nn.ModuleDict({"image": _TinyTower()})
    data = _DrawsAndLabels(per_dataset=6)
    stages = [StageConfig(2, kind="tower_warmup", name="warm", epochs={"image": 2}, batch_size=16),
              StageConfig(2, 3, 8), StageConfig(2, 2, 8, grad_accum=2)]
    tower_before = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
    result = Trainer(model, _cfg(tmp_path, stages=stages, checkpoint_every=0)).fit(data)
    warm_steps = 2 * math.ceil(len(data) / 16)
    assert result.stage_steps == {"warm": warm_steps, "stage1": 3, "stage2": 2}
    assert result.steps == warm_steps + 5 and [h["step"] for h in result.history] == list(range(1, result.steps + 1))
    assert [h["kind"] for h in result.history] == ["tower_warmup"] * warm_steps + ["contrastive"] * 5
    assert list(dict.fromkeys(data.draws)) == [0, 1, 2, 6, 7, 8, 9]  # (one call per example of a micro-batch)
    report = result.tower_warmup["warm"]["image"]
    assert report["epochs"] == 2 and 0 <= report["train_accuracy"] <= 1 and math.isfinite(report["final_loss"])
    assert any(not torch.equal(p, tower_before[n]) for n, p in model.encoders.named_parameters())
    assert result.samples == 3 * 8 + 2 * 2 * 8  # pairs of the contrastive steps only
