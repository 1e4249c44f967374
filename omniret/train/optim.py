"""The optimizer side of a training step: AdamW parameter groups by name, the learning-rate schedule, and the
check that stops a step whose loss or gradient is not finite before the optimizer moves."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn as nn

__all__ = ["warmup_cosine", "check_step_finite", "named_param_groups", "build_optimizer"]


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
    parameters. The default group comes first: metrics log param_groups[0]'s rate as "lr"."""
    wanted = {id(p) for p in params}
    members: List[List[nn.Parameter]] = [[] for _ in range(len(specs) + 1)]  # the last: the default group
    for name, p in model.named_parameters():
        if id(p) not in wanted:
            continue
        slot = len(specs)
        for k, spec in enumerate(specs):
            subs = [spec["match"]] if isinstance(spec["match"], str) else spec["match"]
            if any(sub in name for sub in subs):
                slot = k
                break
        members[slot].append(p)
    groups = []
    for spec, ps in zip([{"lr": lr}] + list(specs), members[-1:] + members[:-1]):
        decay = float(spec.get("weight_decay", weight_decay))
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": decay, "lr": float(spec["lr"])},
                   {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr": float(spec["lr"])}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: List[Dict[str, Any]], betas: Sequence[float], lr_factor: Callable[[int], float]):
    """AdamW over `groups` (each with its own "lr") and a LambdaLR that scales every group's rate by
    lr_factor(step) (step: optimizer steps taken in the stage)."""
    opt = torch.optim.AdamW(groups, betas=tuple(betas))
    # (a plain function: LambdaLR's state_dict would copy the attributes of a callable object or method)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step))
