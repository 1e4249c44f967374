"""The optimizer side of a training step: AdamW parameter groups by name (Muon for the matrices of groups that
ask for it), the learning-rate schedule, and the check that stops a step whose loss or gradient is not finite
before the optimizer moves.

Why Muon (the mechanism as we read it; docs/real_benchmark.md has the evidence, "Muon for the resamplers"): AdamW
moves every weight by about its rate each step, whatever the gradient's shape. When the gradient
of a square attention matrix points the same way for every item (early in training, when every embedding of a
kind moves together), that is a rank-1 update whose largest singular value grows by ~rate * width per step:
at 1e-3 on MiniLM's 384 width the randomly initialised resamplers gain a component larger than their whole
initial weight within ~10 steps, and every item comes out the same (the collapse).
Muon orthogonalises each matrix's update (Newton-Schulz), so no direction outgrows the others; with
`match_rms_adamw` its rate means what an AdamW rate means."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn as nn

__all__ = ["warmup_cosine", "check_step_finite", "named_param_groups", "build_optimizer", "MultiOptimizer"]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_step_finite(step: int, loss: float, grad_norm: float, state: str) -> None:
    """Before the optimizer step: a loss or gradient norm that is not finite would turn every weight into NaN (and
    every checkpoint after it), so it raises a FloatingPointError naming the step; `state` says what is kept."""
    if not (math.isfinite(grad_norm) and math.isfinite(loss)):
        raise FloatingPointError(f"step {step}: loss {loss}, gradient norm {grad_norm}; the optimizer step was not "
                                 f"taken and {state}. A lower learning rate, max_grad_norm, or bf16 off may help")


def named_param_groups(model: nn.Module, params: Sequence[nn.Parameter], specs: Sequence[Dict[str, Any]],
                       lr: float, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups over `params` (trainable parameters of `model`): one learning rate per spec of `specs`
    ({"match": [name substrings], "lr", optional "weight_decay"}: a parameter joins the first spec one of whose
    substrings its name contains), the rest at `lr`; each split into weight-decayed (>= 2-D) and undecayed
    parameters. A spec with "optimizer": "muon" takes matrices (2-D) only, and its group says so; a vector it
    matches (a LayerNorm's weight, a bias) goes on to the next spec that matches it, else the default group. The
    default group comes first: metrics log param_groups[0]'s rate as "lr"."""
    wanted = {id(p) for p in params}
    members: List[List[nn.Parameter]] = [[] for _ in range(len(specs) + 1)]  # the last: the default group
    for name, p in model.named_parameters():
        if id(p) not in wanted:
            continue
        slot = len(specs)
        for k, spec in enumerate(specs):
            if spec.get("optimizer") == "muon" and p.dim() != 2:
                continue
            subs = [spec["match"]] if isinstance(spec["match"], str) else spec["match"]
            if any(sub in name for sub in subs):
                slot = k
                break
        members[slot].append(p)
    groups = []
    for spec, ps in zip([{"lr": lr}] + list(specs), members[-1:] + members[:-1]):
        decay = float(spec.get("weight_decay", weight_decay))
        extra = {"optimizer": "muon"} if spec.get("optimizer") == "muon" else {}
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": decay, "lr": float(spec["lr"]), **extra},
                   {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr": float(spec["lr"])}]
    return [g for g in groups if g["params"]]


class MultiOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameter groups stepped as one (AdamW and Muon): `param_groups` are the
    sub-optimizers' own group dicts, so a scheduler that sets a group's "lr" reaches the optimizer that reads it,
    and `state_dict()` holds each sub-optimizer's state in order."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        # Optimizer.__init__ is not called: it would copy the groups into new dicts the sub-optimizers never read
        if not optimizers:
            raise ValueError("MultiOptimizer: at least one optimizer")
        self.optimizers = list(optimizers)
        self.defaults: Dict[str, Any] = {}
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._collect_groups()

    def _collect_groups(self) -> None:
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> Dict[Any, Any]:  # per-parameter state, each parameter in exactly one sub-optimizer
        return {p: st for opt in self.optimizers for p, st in opt.state.items()}

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MultiOptimizer.step: no closure (each sub-optimizer would evaluate it)")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [type(opt).__name__ for opt in self.optimizers],
                "states": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        names = [type(opt).__name__ for opt in self.optimizers]
        if state_dict.get("optimizers") != names:
            raise ValueError(f"optimizer state: saved for {state_dict.get('optimizers')}, this run steps with {names} "
                             "(a checkpoint of another param_groups recipe)")
        for opt, sd in zip(self.optimizers, state_dict["states"]):
            opt.load_state_dict(sd)
        self._collect_groups()  # loading replaces each sub-optimizer's group dicts


def build_optimizer(groups: List[Dict[str, Any]], betas: Sequence[float], lr_factor: Callable[[int], float]):
    """AdamW over `groups` (each with its own "lr"; groups marked "optimizer": "muon" step with torch.optim.Muon,
    its update scaled to AdamW's RMS so the rate reads alike) and a LambdaLR that scales every group's rate by
    lr_factor(step) (step: optimizer steps taken in the stage)."""
    muon = [g for g in groups if g.get("optimizer") == "muon"]
    adam = [g for g in groups if g.get("optimizer") != "muon"]
    if not muon:
        opt = torch.optim.AdamW(groups, betas=tuple(betas))
    else:
        parts = [torch.optim.AdamW(adam, betas=tuple(betas))] if adam else []
        parts.append(torch.optim.Muon(muon, adjust_lr_fn="match_rms_adamw"))
        opt = MultiOptimizer(parts)
    # (a plain function: LambdaLR's state_dict would copy the attributes of a callable object or method)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step))
