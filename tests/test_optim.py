"""Parameter groups by name and the optimizers behind them: AdamW, and Muon for the matrices of a group that asks
for it (omniret.train.optim)."""
import copy

import pytest
import torch
import torch.nn as nn

from omniret.train import TrainConfig
from omniret.train.optim import MultiOptimizer, build_optimizer, named_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed):
    torch.manual_seed(seed)
    return nn.ModuleDict({"attn": nn.Sequential(nn.LayerNorm(7), nn.Linear(7, 5), nn.Linear(5, 7, bias=False)),
                          "proj": nn.Linear(3, 7), "latents": nn.Embedding(4, 7)})


SPECS = [{"match": ["attn."], "lr": 2e-2, "optimizer": "muon"}, {"match": ["attn.0."], "lr": 5e-3},
         {"match": ["proj."], "lr": 1e-2}]


def _groups(model):
    return named_param_groups(model, list(model.parameters()), SPECS, 1e-3, 0.01)


def _by_name(model, group):
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for p in group["params"])


def test_a_muon_group_takes_the_matrices_it_matches_and_its_vectors_go_on():
    model = _model(0)
    groups = _groups(model)
    muon = [g for g in groups if g.get("optimizer") == "muon"]
    assert len(muon) == 1 and _by_name(model, muon[0]) == ["attn.1.weight", "attn.2.weight"]
    assert muon[0]["lr"] == 2e-2 and muon[0]["weight_decay"] == 0.01
    rates = {n: g["lr"] for g in groups for n in _by_name(model, g)}
    # the LayerNorm's vectors reach the next spec that matches them; the Linear's bias the default group
    assert rates["attn.0.weight"] == rates["attn.0.bias"] == 5e-3
    assert rates["attn.1.bias"] == 1e-3 and rates["latents.weight"] == 1e-3
    assert rates["proj.weight"] == rates["proj.bias"] == 1e-2
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert "optimizer" not in groups[0]  # the default group first: metrics log its rate


def _loss(model, x):
    h = model["attn"](model["proj"](x) + model["latents"].weight.sum(0))
    return (h.sin() ** 2).sum()


def test_muon_and_adamw_step_as_their_own_optimizers_would():
    """MultiOptimizer's step equals AdamW over the other groups and Muon over the marked ones, run apart, on
    fresh random data over several steps with a schedule; nothing leaks between the two."""
    a, b = _model(1), _model(1)
    opt, sched = build_optimizer(_groups(a), (0.9, 0.95), lambda step: 1.0 / (1 + step))
    assert isinstance(opt, MultiOptimizer) and [type(o).__name__ for o in opt.optimizers] == ["AdamW", "Muon"]
    gb = _groups(b)
    adam = torch.optim.AdamW([g for g in gb if g.get("optimizer") != "muon"], betas=(0.9, 0.95))
    muon = torch.optim.Muon([g for g in gb if g.get("optimizer") == "muon"], adjust_lr_fn="match_rms_adamw")
    ref_sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (adam, muon)]
    start = {n: p.detach().clone() for n, p in a.named_parameters()}
    for step in range(4):
        x = torch.randn(6, 3)
        for model, opts in ((a, [opt]), (b, [adam, muon])):
            for o in opts:
                o.zero_grad()
            _loss(model, x).backward()
            for o in opts:
                o.step()
        sched.step()
        for s in ref_sched:
            s.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in adam.param_groups + muon.param_groups]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        assert not torch.equal(p, start[n]), n  # every parameter moved


def test_muons_update_is_orthogonal_where_adamws_is_rank_one():
    """Why the resamplers' matrices step with Muon: a gradient that is the same rank-1 direction every step moves
    AdamW's weight by a rank-1 matrix whose norm grows with the width; Muon's update of the same RMS spreads over
    every singular direction (with match_rms_adamw its RMS is AdamW's)."""
    width, lr, steps = 64, 1e-3, 5
    u, v = torch.randn(width, 1, dtype=torch.float64), torch.randn(1, width, dtype=torch.float64)
    spectral = {}
    for name in ("adamw", "muon"):
        w = nn.Parameter(torch.zeros(width, width, dtype=torch.float64))
        opt = (torch.optim.AdamW([w], lr=lr, weight_decay=0.0) if name == "adamw"
               else torch.optim.Muon([w], lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"))
        for _ in range(steps):
            w.grad = (u @ v) * (1 + 0.01 * torch.randn(width, width, dtype=torch.float64))
            opt.step()
        spectral[name] = float(torch.linalg.matrix_norm(w.detach(), ord=2))
    # AdamW: every entry moves ~lr per step along sign(u v^T): spectral norm ~ lr * width * steps
    assert spectral["adamw"] > 0.5 * lr * width * steps
    assert spectral["muon"] < 0.25 * spectral["adamw"]


def test_a_checkpointed_state_resumes_and_another_recipe_is_refused():
    a = _model(2)
    opt, _ = build_optimizer(_groups(a), (0.9, 0.999), lambda step: 1.0)
    for _ in range(2):
        opt.zero_grad()
        _loss(a, torch.randn(5, 3)).backward()
        opt.step()
    b = copy.deepcopy(a)
    saved = copy.deepcopy(opt.state_dict())
    opt_b, _ = build_optimizer(_groups(b), (0.9, 0.999), lambda step: 1.0)
    opt_b.load_state_dict(saved)
    assert len(opt_b.state) == len(list(b.parameters()))
    x = torch.randn(5, 3)
    for model, o in ((a, opt), (b, opt_b)):
        o.zero_grad()
        _loss(model, x).backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    plain, _ = build_optimizer(named_param_groups(b, list(b.parameters()), [], 1e-3, 0.0), (0.9, 0.999),
                               lambda step: 1.0)
    with pytest.raises(ValueError, match="another param_groups recipe"):
        opt_b.load_state_dict({"optimizers": ["AdamW"], "states": [plain.state_dict()]})


def test_the_config_names_the_optimizers_it_knows_and_keeps_muon_off_fsdp():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(param_groups=[{"match": "x", "lr": 1e-3, "optimizer": "sgd"}]).validate()
    with pytest.raises(ValueError, match="whole matrices"):
        TrainConfig(strategy="fsdp", param_groups=[{"match": "x", "lr": 1e-3, "optimizer": "muon"}]).validate()
    TrainConfig(param_groups=[{"match": "x", "lr": 1e-3, "optimizer": "muon"}]).validate()
