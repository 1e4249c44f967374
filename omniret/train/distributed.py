"""Cross-rank pieces of a GradCache step: the bare module to run chunks through, one explicit gradient
reduction per step, and FSDP2 (`torch.distributed.fsdp.fully_shard`) support.

Why explicit: a GradCache step replays a data-dependent number of chunks per rank, some of which may have
nothing trainable to backpropagate into (and are skipped). Wrapper hooks (DDP's reducer, FSDP's post-backward
reduce-scatter) fire on whichever backward is the "synced" one, so ranks that disagree on which chunk is their
last trainable one would enter different collectives and hang. Here no chunk communicates: every rank
backpropagates all its chunks locally and then, once per step, every rank enters the same collectives.

- DDP: the chunks run through `ddp.module` (DDP's forward would prepare its reducer and broadcast buffers,
  both collectives); DDP only contributes its construction-time broadcast of rank 0's parameters.
- FSDP2: the root is unsharded once at the start of the step (one all-gather), chunks run with gradient sync
  off, then the full gradients are averaged and each rank keeps its shard as the sharded parameter's `.grad`.
- Plain module: the same reduction as DDP.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["is_ddp", "is_fsdp", "bare_module", "average_gradients", "fsdp_step", "shard_model_fsdp",
           "broadcast_replicated", "clip_grad_norm", "full_state_dict", "load_full_state_dict", "leave_process_group"]

# parameters are flattened into buffers of at most this many elements per all_reduce
BUCKET_ELEMENTS = 1 << 25
# seconds a process leaving its group releases the GIL for gloo's worker threads (leave_process_group)
EXIT_GRACE_S = 0.05


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def bare_module(model: nn.Module) -> nn.Module:
    """The module GradCache runs chunks through: a DDP wrapper's inner module (no reducer, no buffer broadcast);
    anything else as is (an FSDP2 module's hooks keep its unshard bookkeeping, and are told not to reduce)."""
    return model.module if is_ddp(model) else model


def average_gradients(params: List[nn.Parameter], group=None) -> None:
    """Average the `.grad` of `params` over the ranks of `group`, every rank calling this once with the same
    parameter list. A parameter without a gradient on some ranks counts as zero there; one without a gradient
    on every rank keeps `.grad = None` (like a single-process backward, and like DDP's unused parameters).
    Two collectives: the has-gradient flags, then the gradients in buckets of one dtype."""
    if not params:
        return
    world = dist.get_world_size(group)
    device = params[0].device
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(flags, group=group)
    used = [p for p, f in zip(params, flags.tolist()) if f > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: Dict[torch.dtype, List[nn.Parameter]] = {}
    for p in used:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for same in by_dtype.values():
        bucket: List[nn.Parameter] = []
        size = 0
        for p in same + [None]:
            if p is not None and (size + p.numel() <= BUCKET_ELEMENTS or not bucket):
                bucket.append(p)
                size += p.numel()
                continue
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat, group=group)
            flat /= world
            offset = 0
            for q in bucket:
                n = q.numel()
                q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                offset += n
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)


def shard_model_fsdp(model: nn.Module, group=None) -> nn.Module:
    """Shard `model`'s parameters over the ranks with FSDP2 (one unit: the root). One unit because OmniRet's
    forward is data-dependent (a chunk without audio never calls the audio encoder): per-submodule units
    would all-gather in different orders on different ranks. Returns the same module object (FSDP2 works in
    place). Parameters added later (stage 2's LoRA) stay replicated; GradCache averages their gradients too."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    if is_fsdp(model):
        return model
    device = next(model.parameters()).device
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    mesh = DeviceMesh(device.type, ranks)
    fully_shard(model, mesh=mesh)
    return model


def _trainable_unsharded(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def fsdp_step(model: nn.Module, sync: bool, group=None):
    """Holds an FSDP2 root unsharded for one GradCache step (one all-gather; the chunks inside communicate
    nothing), then, when `sync`, averages the full gradients over ranks and hands each rank its shard as the
    sharded parameters' `.grad` (added to any gradient they hold). Without `sync` (gradient accumulation) the
    root stays unsharded with its full local gradients until the step that syncs."""
    from torch.distributed.tensor import DTensor, Replicate
    wants_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    model.unshard()  # a no-op when a previous non-syncing step left it unsharded
    for n, p in model.named_parameters():
        # FSDP2 creates the unsharded parameters once, with the requires_grad of that moment: a later stage that
        # unfreezes a parameter must reach them too
        if p.requires_grad != wants_grad.get(n, p.requires_grad):
            p.requires_grad_(wants_grad[n])
    yield
    if not sync:
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unsharded = dict(model.named_parameters())
    average_gradients([unsharded[n] for n in names], group)
    full: Dict[str, Optional[torch.Tensor]] = {}
    for n in names:
        p = unsharded[n]
        full[n] = p.grad
        if isinstance(p, nn.Parameter) and not isinstance(p, DTensor):
            p.grad = None  # the unsharded storage is freed by reshard; the gradient moves to the shard
    model.reshard()
    sharded = dict(model.named_parameters())
    for n in names:
        p, g = sharded[n], full[n]
        if g is None:
            continue
        if isinstance(p, DTensor):
            g = DTensor.from_local(g, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                                   run_check=False).redistribute(p.device_mesh, p.placements)
        p.grad = g if p.grad is None else p.grad + g


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def broadcast_replicated(model: nn.Module, group=None) -> None:
    """Rank 0's values of every parameter and buffer that is not sharded (all of them before sharding; after
    it, the ones added later, such as stage 2's LoRA), as DDP's constructor does."""
    src = dist.get_process_group_ranks(group)[0] if group is not None else 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not _is_dtensor(t):
                dist.broadcast(t.data, src=src, group=group)


def clip_grad_norm(params: List[nn.Parameter], max_norm: float, group=None) -> float:
    """torch.nn.utils.clip_grad_norm_ for a mix of sharded (DTensor) and replicated gradients: the squared
    norms of the local shards are summed over ranks, replicated gradients count once. Returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g.to_local() for g in grads if _is_dtensor(g)]
    replicated = [g for g in grads if not _is_dtensor(g)]
    device = grads[0].device
    sq_sharded = sum((g.double().pow(2).sum() for g in sharded), torch.zeros((), dtype=torch.float64,
                                                                             device=device))
    if sharded and dist.is_initialized():
        dist.all_reduce(sq_sharded, group=group)
    sq = sq_sharded + sum((g.double().pow(2).sum() for g in replicated),
                          torch.zeros((), dtype=torch.float64, device=device))
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def full_state_dict(model: nn.Module, optimizer=None) -> tuple:
    """(model state, optimizer state) with full tensors on CPU, for a checkpoint of a sharded model. Every rank
    must call it (it gathers); rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def _like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `target`: this rank's shard when target is a DTensor (cut locally: every rank holds
    the full tensor, so no collective), else `full` itself."""
    full = full.to(device=target.device, dtype=target.dtype)
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    return full


def load_full_state_dict(model: nn.Module, model_state: dict, optimizer=None, optim_state=None) -> None:
    """Loads full states, as `full_state_dict` returns them (every rank read the checkpoint), into a sharded
    model and its optimizer: each rank keeps its shard. Names missing from `model_state` keep their values."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    unknown = set(model_state) - set(tensors)
    if unknown:
        raise ValueError(f"checkpoint: parameters the model does not have: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for name, full in model_state.items():
            tensors[name].copy_(_like(tensors[name], full))
    if optimizer is None or optim_state is None:
        return
    # optim_state (get_optimizer_state_dict's full form) is keyed by parameter name; torch's optimizer wants
    # indices in param_groups order and tensors laid out like their parameter
    name_of = {id(p): n for n, p in model.named_parameters()}
    saved_groups = optim_state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError("checkpoint: optimizer has another number of parameter groups")
    state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, saved_groups):
        ids = []
        for p in group["params"]:
            name = name_of[id(p)]
            entry = optim_state["state"].get(name)
            if entry is not None:
                state[index] = {k: _like(p, v) if torch.is_tensor(v) and v.dim() > 0 else v
                                for k, v in entry.items()}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def leave_process_group() -> None:
    """Destroy the default process group as a process's last collective act, then hold the GIL off briefly.

    Why the pause: gloo runs each collective on a worker thread of its own, which drops its reference to the
    collective's tensors just after waking the caller. Where that is the last reference, the drop needs the GIL.
    A process that reaches interpreter finalisation within a few milliseconds of its last all-gather (FSDP's,
    say) can find that worker still waiting for the GIL, and the worker then aborts the process ("terminate
    called without an active exception", SIGABRT) although all its work is done. Destroying the group does not
    stop those threads while a sharded module still holds the group, and a barrier before it only made the abort
    rarer (it holds the collectives still in flight until it ends, and then the same race follows). Sleeping
    releases the GIL, so a waiting worker takes it and finishes while the interpreter lives. Measured with a
    two-rank gloo script (FSDP's full state dict, then exit): see docs/training.md."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    time.sleep(EXIT_GRACE_S)
