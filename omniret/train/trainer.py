"""The trainer (paper section 5.1): one optimizer step loop for every stage.

    from omniret.train import Trainer, TrainConfig
    result = Trainer(model, TrainConfig(output_dir="runs/x")).fit(dataset, time_budget_s=600)

`dataset[i]` is a dict `{"query": item, "candidate": item, "task": str, "dataset": str}` with optional
`candidate_id` (same id = same target: duplicates in a batch are masked out of each other's negatives) and
`negatives` (a list of extra hard-negative items), `relevant_ids` (every id relevant to the query: none of them is
its negative) and `negative_ids` (the negatives' ids). `dataset.groups` (a list of (task, dataset) per example)
spares the sampler from loading every example once. A tower_warmup stage reads `dataset.labelled_media()`.

Each stage: the model's `setup_stage(stage)` picks the trainable parameters (stage 1: projectors, resamplers,
pooling; stage 2: adds LoRA and initialises video latents from image latents), then its objective
(omniret.train.objectives) supplies the batches, the micro-batch loss and backward, extra trainable modules and
its checkpoint state: GradCache over task-balanced batches (`ContrastiveObjective`) or the towers' supervised
warm-up (omniret.train.tower_warmup.TowerWarmup). The step loop is this module's alone: gradient accumulation,
the gradient norm (clipped where the objective asks) and its finite check, AdamW with the objective's LambdaLR
schedule, optional bf16 autocast (contrastive), metrics in `metrics.jsonl` and TensorBoard in `output_dir`,
checkpoints (model, optimizer, scheduler, objective, RNG) written atomically, and a run restarted on the same
`output_dir` resumes where the newest checkpoint left off, reproducing the unkilled run, in any stage. Under
`torchrun` (WORLD_SIZE > 1) every rank draws the same global batch and embeds its own shard, and GradCache
all-gathers the embeddings; `strategy="ddp"` replicates the model (a DistributedDataParallel wrapper),
`strategy="fsdp"` shards its parameters and optimizer states with FSDP2 (omniret.train.distributed).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from omniret.errors import InputError
from omniret.files import RunLock
from omniret.losses import LearnableTemperature
from omniret.train import distributed as tdist
# negatives_mask and tower_augmentations are imported from here by tests; warmup_cosine and check_step_finite too
from omniret.train.batch_features import negatives_mask, text_noise_words, tower_augmentations  # noqa: F401
from omniret.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from omniret.train.config import StageConfig, TrainConfig
from omniret.train.metrics import MetricsLog
from omniret.train.objectives import ContrastiveObjective
from omniret.train.optim import build_optimizer, check_step_finite, warmup_cosine  # noqa: F401
from omniret.train.sampler import TaskBalancedSampler, groups_of
from omniret.train.tower_warmup import TowerWarmup

__all__ = ["StageConfig", "TrainConfig", "Trainer", "TrainResult", "warmup_cosine", "check_step_finite"]

_Metrics = MetricsLog  # its name before metrics.py (tests/test_hardening.py)

# 2: every stage's position is its objective's state (version 1 held a sampler, and no mid-warm-up state)
CHECKPOINT_VERSION = 2


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (every stage, across resumes)
    samples: int  # query-candidate pairs of contrastive steps, in total
    stopped: str  # "done", "time_budget" or "max_steps"
    history: List[Dict[str, Any]]  # metrics of the optimizer steps run by this call
    last_checkpoint: Optional[str] = None
    tower_warmup: Dict[str, Any] = field(default_factory=dict)  # finished tower_warmup stages' reports, by name
    stage_steps: Dict[str, int] = field(default_factory=dict)  # optimizer steps done per stage, by name


@dataclass
class _Position:
    """Where a run is: stage, step within it, steps and pairs in all, and the newest checkpoint's step."""
    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    samples: int = 0
    saved_step: int = -1


def stage_name(stage: StageConfig, index: int) -> str:
    return stage.name or f"stage{index}"


class Trainer:
    def __init__(self, model: nn.Module, config=None):
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.config = config.validate()
        self.model = model
        self.temperature = LearnableTemperature(config.tau) if config.learnable_temperature else None
        self.world, self.rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.device = torch.device(config.device) if config.device else self._default_device()
        self.output_dir = Path(config.output_dir) if config.output_dir else None
        self.checkpoints = (CheckpointManager(self.output_dir / "checkpoints", config.keep_checkpoints)
                            if self.output_dir is not None else None)
        self._groups = None  # (task, dataset) of every example, read once per fit for the samplers

    @staticmethod
    def _default_device() -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    # ------------------------------------------------------------------------------------------------------
    def _setup_stage(self, stage: StageConfig) -> List[nn.Parameter]:
        hook = getattr(self.model, "setup_stage", None)
        if hook is not None:
            hook(stage.stage)
        for name, p in self.model.named_parameters():
            if stage.freeze and any(sub in name for sub in stage.freeze):
                p.requires_grad_(False)  # their forward builds no graph: GradCache's replays skip their backward
        return [p for p in self.model.parameters() if p.requires_grad]

    def _objective(self, stage: StageConfig, dataset, sampler: Optional[TaskBalancedSampler], index: int,
                   filler: Optional[List[str]]):
        """The stage's objective, after the model's setup for it."""
        cfg = self.config
        params = self._setup_stage(stage)
        if stage.kind == "tower_warmup":
            self.model.to(self.device)  # (setup_stage may have added parameters)
            log = print if cfg.progress_bar and self.rank == 0 else (lambda *a: None)
            return TowerWarmup.from_stage(self.model, stage, dataset, cfg, log)
        if not params:
            raise ValueError(f"stage {stage.stage}: the model has no trainable parameter")
        net = self._wrap()
        if sampler is None:
            if self._groups is None:
                self._groups = groups_of(dataset)
            sampler = TaskBalancedSampler(
                self._groups, stage.batch_size,
                stage.tasks_per_batch if stage.tasks_per_batch is not None else cfg.tasks_per_batch,
                tuple(stage.datasets_per_task if stage.datasets_per_task is not None else cfg.datasets_per_task),
                stage.tasks, seed=cfg.seed + 1000 * index, task_counts=stage.task_counts)
        first_step = sum(s.steps for s in cfg.stages[:index] if s.kind == "contrastive")
        return ContrastiveObjective(net, self.model, dataset, stage, cfg, sampler, self.temperature, self.world,
                                    self.rank, filler, first_step)

    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        keep = {n for n, p in self.model.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in self.model.named_buffers()}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if k in keep}

    def _load_trainable_state(self, state: Dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint: parameters the model does not have: {unexpected[:5]}")

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.config.strategy == "fsdp"

    def _wrap(self) -> nn.Module:
        """The module GradCache drives. DDP: a wrapper built per stage (its constructor broadcasts rank 0's
        parameters; GradCache runs its inner module and reduces gradients itself, so its hooks never fire).
        FSDP: the model itself, sharded in place at the first stage (FSDP2); parameters a later stage adds
        (LoRA) stay replicated and are broadcast from rank 0 here."""
        if self.world == 1:
            return self.model
        if self.sharded:
            tdist.broadcast_replicated(self.model)
            return tdist.shard_model_fsdp(self.model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _grad_norm(self, objective) -> float:
        """The gradient norm of the objective's parameters, clipped to its max_grad_norm. The norm is taken also
        without clipping (an infinite bound scales by exactly 1): a step whose loss or gradient is not finite
        would turn every weight into NaN, and the checkpoints after it."""
        max_norm = math.inf if objective.max_grad_norm is None else objective.max_grad_norm
        if self.sharded and objective.distributed:
            return tdist.clip_grad_norm(objective.trainable, max_norm)
        return float(torch.nn.utils.clip_grad_norm_(objective.trainable, max_norm))

    # checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint(self, at: _Position, opt, sched, objective, tower_report, stage_steps) -> Optional[str]:
        at.saved_step = at.global_step
        if self.checkpoints is None:
            return None
        is_main = self.rank == 0
        if self.sharded and objective.distributed:  # every rank takes part in gathering the full states
            model_state, optim_state = tdist.full_state_dict(self.model, opt)
            keep = {n for n, p in self.model.named_parameters() if p.requires_grad}
            keep |= {n for n, _ in self.model.named_buffers()}
            model_state = {k: v for k, v in model_state.items() if k in keep}
        elif is_main:
            model_state, optim_state = self._trainable_state(), opt.state_dict()
        rng = capture_rng()
        if self.world > 1:  # each rank's own stream (dropout draws differ per rank)
            rngs: List[Any] = [None] * self.world
            dist.all_gather_object(rngs, rng)
            rng = {"per_rank": rngs}
        path = None
        if is_main:
            path = str(self.checkpoints.save({
                "version": CHECKPOINT_VERSION, "stage_index": at.stage_index, "stage_step": at.stage_step,
                "global_step": at.global_step, "samples": at.samples, "strategy": "fsdp" if self.sharded else "ddp",
                "model": model_state, "optimizer": optim_state, "scheduler": sched.state_dict(),
                "objective": objective.state_dict(),
                "temperature": self.temperature.state_dict() if self.temperature is not None else None,
                "rng": rng, "tower_warmup": tower_report, "stage_steps": stage_steps, "config": self.config.to_dict(),
            }, at.global_step))
        if self.world > 1:
            dist.barrier()  # every rank sees this checkpoint before going on (and may resume from it)
        return path

    def _restore(self, state: Dict[str, Any], opt, sched, objective) -> None:
        """Resume inside (or at the end of) the current stage from a checkpoint of it."""
        if state.get("strategy", "ddp") != ("fsdp" if self.sharded else "ddp"):
            raise ValueError("checkpoint: written with another strategy (fsdp checkpoints hold "
                             "optimizer states by parameter name); resume with the same --strategy")
        if self.sharded and objective.distributed:
            tdist.load_full_state_dict(self.model, state["model"], opt, state["optimizer"])
        else:
            self._load_trainable_state(state["model"])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        objective.load_state_dict(state["objective"])
        if self.temperature is not None and state.get("temperature") is not None:
            self.temperature.load_state_dict(state["temperature"])
        rng = state["rng"]
        if "per_rank" in rng:
            saved = rng["per_rank"]
            if len(saved) != self.world:
                warnings.warn(f"checkpoint written by {len(saved)} ranks, resumed by {self.world}: "
                              "random streams are not continued exactly")
            rng = saved[self.rank % len(saved)]
        restore_rng(rng)

    def _load_checkpoint(self) -> Optional[Dict[str, Any]]:
        if self.checkpoints is None or not self.config.resume:
            return None
        state = self.checkpoints.load_latest()
        if state is not None and state.get("version") != CHECKPOINT_VERSION:
            raise InputError(f"{self.checkpoints.directory}: checkpoint version {state.get('version')} was written by "
                             f"an older omniret (this one writes {CHECKPOINT_VERSION}); train into a new output_dir")
        return state

    # ------------------------------------------------------------------------------------------------------
    def fit(self, dataset, time_budget_s: Optional[float] = None, max_steps: Optional[int] = None,
            sampler: Optional[TaskBalancedSampler] = None) -> TrainResult:
        """Train through every stage, resuming from the newest checkpoint in output_dir when config.resume.
        Stops early (with a checkpoint; call again to go on) once `time_budget_s` seconds have passed or this
        call has run `max_steps` optimizer steps (of any stage). Returns the steps done and this call's metrics.
        The writing rank holds output_dir's lock (omniret.files.RunLock) meanwhile: a second trainer there is
        refused."""
        lock = RunLock(self.output_dir).acquire() if self.output_dir is not None and self.rank == 0 else None
        try:
            return self._fit(dataset, time_budget_s, max_steps, sampler)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, dataset, time_budget_s, max_steps, sampler) -> TrainResult:
        cfg = self.config
        t_start = time.monotonic()
        torch.manual_seed(cfg.seed)
        self.model.to(self.device)
        if self.temperature is not None:
            self.temperature.to(self.device)
        if cfg.negatives == "modality" and self.world > 1:
            raise ValueError("negatives='modality' is implemented for one process only")
        self._groups = None
        state = self._load_checkpoint()
        prepare = getattr(self.model, "before_training", None)
        if state is None and prepare is not None:  # a fresh run: fixed statistics of the data (a resume loads them)
            prepare(dataset)
        at = _Position()
        if state is not None:
            at = _Position(state["stage_index"], state["stage_step"], state["global_step"], state["samples"],
                           saved_step=state["global_step"])
        metrics = MetricsLog(self.output_dir, cfg.tensorboard, at.global_step, enabled=self.rank == 0)
        tower_report: Dict[str, Any] = dict(state.get("tower_warmup") or {}) if state is not None else {}
        stage_steps: Dict[str, int] = dict(state.get("stage_steps") or {}) if state is not None else {}
        filler = text_noise_words(self.model, cfg.text_noise_exclude) if cfg.text_noise > 0 else None
        history: List[Dict[str, Any]] = []
        last_ckpt = None
        stopped = "done"
        try:
            while at.stage_index < len(cfg.stages):
                stage = cfg.stages[at.stage_index]
                name = stage_name(stage, at.stage_index)
                objective = self._objective(stage, dataset, sampler, at.stage_index, filler)
                try:
                    opt, sched = build_optimizer(objective.param_groups(), cfg.adam_betas, objective.lr_factor)
                    if state is not None:  # resuming inside (or at the end of) this stage
                        self._restore(state, opt, sched, objective)
                        state = None
                    self.model.train()

                    def checkpoint():
                        return self._checkpoint(at, opt, sched, objective, tower_report, stage_steps)

                    stopped, last_ckpt = self._run_stage(stage, name, objective, opt, sched, at, history, metrics,
                                                         checkpoint, last_ckpt, t_start, time_budget_s, max_steps)
                    opt.zero_grad(set_to_none=True)  # no gradient outlives its stage (nor the warm-up's classifiers)
                    if stopped != "done":
                        stage_steps[name] = at.stage_step
                        break
                    report = objective.finish()
                    if report is not None:
                        tower_report[name] = report
                    stage_steps[name] = at.stage_step
                finally:
                    objective.close()
                at.stage_index += 1
                at.stage_step = 0
        finally:
            metrics.close()
        self.model.eval()
        return TrainResult(at.global_step, at.samples, stopped, history, last_ckpt, tower_report, stage_steps)

    def _run_stage(self, stage, name, objective, opt, sched, at: _Position, history, metrics, checkpoint,
                   last_ckpt, t_start, time_budget_s, max_steps):
        """The step loop of one stage, from at.stage_step to its objective's steps (or a stop). Returns (stopped,
        the newest checkpoint's path)."""
        cfg = self.config
        stopped = "done"
        bar = None
        if cfg.progress_bar and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=objective.steps, initial=at.stage_step, desc=name, unit="step", dynamic_ncols=True)
        try:
            n_micro = objective.micro_batches
            while at.stage_step < objective.steps:
                if time_budget_s is not None and self._agree(time.monotonic() - t_start >= time_budget_s):
                    stopped = "time_budget"  # (ranks agree: clocks differ, and a lone rank would hang)
                    break
                if max_steps is not None and len(history) >= max_steps:
                    stopped = "max_steps"
                    break
                t0 = time.monotonic()
                opt.zero_grad(set_to_none=True)
                sums = dict.fromkeys(objective.metric_keys, 0.0)
                pairs = examples = 0
                for micro in range(n_micro):
                    stats = objective.micro_step(at.stage_step, micro, 1.0 / n_micro, micro == n_micro - 1)
                    for k in objective.metric_keys:
                        sums[k] = sums[k] + stats[k] / n_micro
                    pairs += stats["pairs"]
                    examples += stats["examples"]
                grad_norm = self._grad_norm(objective)
                newest = f"step {at.saved_step}" if at.saved_step >= 0 else "none"
                check_step_finite(at.global_step + 1, sums["loss"], grad_norm,
                                  f"the weights are those of step {at.global_step} (newest checkpoint: {newest})")
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                at.stage_step += 1
                at.global_step += 1
                at.samples += pairs
                objective.after_step(at.stage_step)
                seconds = time.monotonic() - t0
                record = {"step": at.global_step, "stage": stage.stage, "kind": stage.kind,
                          "stage_step": at.stage_step, **sums, "lr": lr,
                          "samples_per_s": examples / max(seconds, 1e-9), "samples": at.samples,
                          **objective.step_info(), "grad_norm": grad_norm}
                history.append(record)
                if at.global_step % cfg.log_every == 0:
                    metrics.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                if cfg.checkpoint_every and at.global_step % cfg.checkpoint_every == 0:
                    last_ckpt = checkpoint() or last_ckpt
            # the end of a stage or a stop: checkpoint unless this very step is already saved
            if at.global_step != at.saved_step:
                last_ckpt = checkpoint() or last_ckpt
        finally:
            if bar is not None:
                bar.close()
        return stopped, last_ckpt
