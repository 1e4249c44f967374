"""What a training stage optimizes, for the Trainer's one step loop (omniret.train.trainer).

The loop (zero the gradients, run the micro-batches, take the gradient norm and clip, check it is finite, step
AdamW and the LambdaLR schedule, log, checkpoint, stop on a budget) is the same for every stage; an objective
supplies what differs:

- `steps`, `micro_batches` (per optimizer step), `max_grad_norm` (None: not clipped; the norm is still taken for
  the finite check), `distributed` (True: the step runs on the trainer's DDP/FSDP-wrapped model and each rank
  embeds its shard of the batch; False: every rank runs the whole step on its own replica);
- `trainable`: the parameters the optimizer steps and the norm covers (modules of the objective's own included,
  e.g. the tower warm-up's classifiers), `param_groups()` over them, `lr_factor(step)` for the LambdaLR;
- `micro_step(stage_step, micro, loss_scale, sync)`: draws its batch, runs forward and backward
  (gradients scaled by `loss_scale`), returns floats for `metric_keys` (averaged over the micro-batches into the
  step's record), "pairs" (query-candidate pairs, counted in TrainResult.samples) and "examples" (for
  samples_per_s);
- `step_info()`: more fields of the step's record; `after_step(stage_step)`: called after each optimizer step,
  before a checkpoint; `state_dict()` / `load_state_dict()`: its position (sampler, epoch order, generators) and
  modules, saved in every checkpoint; `finish()`: at the stage's end, its report or None; `close()`: always.

`ContrastiveObjective` is the paper's: GradCache steps over task-balanced batches. The tower warm-up's is
omniret.train.tower_warmup.TowerWarmup.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from omniret.train.augment import add_filler_words
from omniret.train.batch_features import negatives_mask
from omniret.train.grad_cache import GradCache
from omniret.train.optim import named_param_groups, warmup_cosine
from omniret.train.sampler import TaskBalancedSampler

__all__ = ["ContrastiveObjective", "split_batch"]


def split_batch(dataset, indices: Sequence[int], rank: int, world: int, draw: int = 0):
    """The global batch -> this rank's (queries, candidates, candidate ids, relevant ids): positives first, then the
    extra negatives. A data set with `draw(i, draw)` (omniret.data.mbeir_train) makes its per-draw choices
    (positive, negatives, instruction) from `draw`, the micro-batch's number in the run."""
    mine = list(indices)[rank::world]
    pick = getattr(dataset, "draw", None)
    examples = [pick(i, draw) if pick is not None else dataset[i] for i in mine]
    queries = [ex["query"] for ex in examples]
    candidates = [ex["candidate"] for ex in examples]
    ids: List[Any] = [ex.get("candidate_id", ("__row__", i)) for ex, i in zip(examples, mine)]
    relevant = [set(ex.get("relevant_ids", ())) for ex in examples]
    for ex, i in zip(examples, mine):
        negative_ids = ex.get("negative_ids")
        for k, neg in enumerate(ex.get("negatives", []) or []):
            candidates.append(neg)
            ids.append(negative_ids[k] if negative_ids is not None else ("__neg__", i, k))
    return queries, candidates, ids, relevant


class ContrastiveObjective:
    """One GradCache step per micro-batch of a task-balanced batch: the hard-negative InfoNCE, the triplet and the
    diversity loss (omniret.losses) over the model's embeddings; AdamW groups by parameter name; linear warm-up
    and cosine decay to min_lr_ratio."""

    metric_keys = ("loss", "contrastive", "triplet", "diversity")
    distributed = True

    def __init__(self, net: nn.Module, model: nn.Module, dataset, stage, config, sampler: TaskBalancedSampler,
                 temperature: Optional[nn.Module], world: int, rank: int, filler: Optional[List[str]],
                 first_step: int = 0):
        """first_step: the contrastive steps of the stages before this one. A micro-batch's draw number (the data
        set's per-draw choices, the text noise) counts contrastive steps only, so a tower warm-up before them,
        however long, leaves the contrastive run's data as it is."""
        self.model, self.dataset, self.config, self.sampler = model, dataset, config, sampler
        self.first_step = first_step
        self.world, self.rank, self.filler = world, rank, filler
        self.temperature = temperature
        self.steps = stage.steps
        self.micro_batches = stage.grad_accum if stage.grad_accum is not None else config.grad_accum
        self.max_grad_norm = config.max_grad_norm
        self.lr = stage.lr if stage.lr is not None else config.lr
        self.specs = stage.param_groups if stage.param_groups is not None else config.param_groups
        self.warmup = stage.warmup_steps if stage.warmup_steps is not None else config.warmup_steps
        params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP replaced them
        self.trainable = params + (list(temperature.parameters()) if temperature is not None else [])
        self._model_params = params
        micro_batch = (sum(stage.task_counts.values()) if stage.task_counts else stage.batch_size) // world
        mu1 = config.mu1 / max(1, micro_batch - 1) if config.triplet == "mean" else config.mu1
        self.grad_cache = GradCache(net, config.chunk_size, config.tau, config.beta, mu1, config.mu2,
                                    margin=config.margin, detach_weights=config.detach_weights,
                                    temperature=temperature, loss_chunk_size=config.loss_chunk_size,
                                    keep_graphs=config.keep_graphs,
                                    autocast_dtype=torch.bfloat16 if config.bf16 else None,
                                    symmetric=config.symmetric)
        self._tau = float("nan")

    def param_groups(self) -> List[Dict[str, Any]]:
        groups = named_param_groups(self.model, self._model_params, self.specs, self.lr, self.config.weight_decay)
        if self.temperature is not None:
            groups.append({"params": list(self.temperature.parameters()), "weight_decay": 0.0, "lr": self.lr})
        return groups

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, self.steps, self.warmup, self.config.min_lr_ratio)

    def micro_step(self, stage_step: int, micro: int, loss_scale: float, sync: bool) -> Dict[str, float]:
        cfg = self.config
        indices = self.sampler.next_batch()
        draw = (self.first_step + stage_step) * self.micro_batches + micro
        queries, candidates, ids, relevant = split_batch(self.dataset, indices, self.rank, self.world, draw)
        if self.filler is not None:
            queries = add_filler_words(queries, self.filler, cfg.text_noise, torch.Generator().manual_seed(
                (cfg.seed * 1_000_003 + draw) % (2 ** 63)))
        if self.world == 1:  # relevance known here: the mask is built from it
            mask = {"positives": negatives_mask(candidates, ids, relevant, len(queries), cfg.negatives == "modality")}
        else:  # GradCache masks duplicates over the global batch by id
            mask = {"candidate_ids": ids}
        stats = self.grad_cache.step(queries, candidates, **mask, loss_scale=loss_scale, sync=sync)
        self._tau = stats["tau"]
        return {**{k: stats[k] for k in self.metric_keys}, "pairs": len(indices), "examples": len(indices)}

    def step_info(self) -> Dict[str, Any]:
        return {"tau": self._tau}

    def after_step(self, stage_step: int) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def finish(self) -> None:
        return None

    def close(self) -> None:
        pass
