"""The two-stage trainer (paper section 5.1).

    from omniret.train import Trainer, TrainConfig
    result = Trainer(model, TrainConfig(output_dir="runs/x")).fit(dataset, time_budget_s=600)

`dataset[i]` is a dict `{"query": item, "candidate": item, "task": str, "dataset": str}` with optional
`candidate_id` (same id = same target: duplicates in a batch are masked out of each other's negatives) and
`negatives` (a list of extra hard-negative items), `relevant_ids` (every id relevant to the query: none of them is
its negative) and `negative_ids` (the negatives' ids). `dataset.groups` (a list of (task, dataset) per example)
spares the sampler from loading every example once.

Each stage: the model's `setup_stage(stage)` picks the trainable parameters (stage 1: projectors, resamplers,
pooling; stage 2: adds LoRA and initialises video latents from image latents); task-balanced batches
(`TaskBalancedSampler`); one `GradCache.step` per micro-batch; AdamW with linear warm-up and cosine decay;
gradient accumulation; optional bf16 autocast. Metrics go to `metrics.jsonl` and TensorBoard in
`output_dir`; checkpoints (model, optimizer, scheduler, sampler, RNG) are written atomically, and a run
restarted on the same `output_dir` resumes where the newest checkpoint left off, reproducing the unkilled
run. Under `torchrun` (WORLD_SIZE > 1) every rank draws the same global batch and embeds its own shard, and
GradCache all-gathers the embeddings; `strategy="ddp"` replicates the model (a DistributedDataParallel wrapper),
`strategy="fsdp"` shards its parameters and optimizer states with FSDP2 (omniret.train.distributed).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from omniret.losses import LearnableTemperature
from omniret.train import distributed as tdist
from omniret.errors import check_field_types
from omniret.files import RunLock, append_jsonl, atomic_write_text, dumps_lines, read_jsonl_log
from omniret.train.checkpoint import CheckpointManager, capture_rng, restore_rng
from omniret.train.grad_cache import GradCache
from omniret.train.augment import add_filler_words
from omniret.train.batch_features import negatives_mask, text_noise_words, tower_augmentations
from omniret.train.sampler import TaskBalancedSampler, groups_of

__all__ = ["StageConfig", "TrainConfig", "Trainer", "TrainResult", "warmup_cosine", "check_step_finite"]


@dataclass
class StageConfig:
    """One training stage. `stage` is what the model's setup_stage receives (1 = warm-up, 2 = fine-tuning).

    kind "contrastive" (the default): `steps` optimizer steps of GradCache over task-balanced batches.
    kind "tower_warmup": the supervised warm-up of trainable media towers (omniret.train.tower_warmup) on the
    data set's labelled media (`dataset.labelled_media()`), `epochs` per tower ({modality: epochs}), AdamW at
    `lr` (default 3e-3) with cosine decay, `batch_size`; `augment` names the warm-up's augmentations
    ({"image": "random_affine", "audio": "speed_perturb", "audio_features": "warp_frequencies"}, each optionally
    "name:low:high"). A stand-in for pretrained encoders (the demo's CNN towers start random).
    """
    stage: int = 1
    steps: int = 100
    batch_size: int = 64
    tasks: Optional[List[str]] = None  # None: every task of the data set
    lr: Optional[float] = None  # None: TrainConfig.lr
    warmup_steps: Optional[int] = None  # None: TrainConfig.warmup_steps
    name: str = ""
    kind: str = "contrastive"
    # per-stage overrides of TrainConfig's (None: TrainConfig's)
    tasks_per_batch: Optional[int] = None
    datasets_per_task: Optional[List[int]] = None
    grad_accum: Optional[int] = None
    # {task: examples per batch}: every batch holds exactly these counts (every task named), instead of
    # `tasks_per_batch` random tasks sharing `batch_size`
    task_counts: Optional[Dict[str, int]] = None
    param_groups: Optional[List[Dict[str, Any]]] = None  # None: TrainConfig.param_groups
    freeze: Optional[List[str]] = None  # parameter-name substrings frozen after the model's setup_stage
    epochs: Optional[Dict[str, int]] = None  # tower_warmup: epochs per tower
    augment: Optional[Dict[str, str]] = None  # tower_warmup: augmentations by name


@dataclass
class TrainConfig:
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])
    chunk_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    tau: float = 0.07
    beta: float = 0.5
    margin: float = 0.1
    mu1: float = 1.0
    mu2: float = 0.1
    detach_weights: bool = True
    # CLIP's symmetric InfoNCE: the contrastive term averages query->candidate and candidate->query
    # (omniret.losses.total_loss); the CLIP-style baseline (omniret.baselines) sets it with mu1 = mu2 = 0
    symmetric: bool = False
    learnable_temperature: bool = False
    loss_chunk_size: int = 1024
    tasks_per_batch: int = 4
    datasets_per_task: tuple = (1, 2)
    # Learning rates per parameter group: [{"match": ["lora_"], "lr": 1e-3}, ...]; a trainable parameter joins the
    # first group one of whose substrings its name contains, else the default group (`lr`). "weight_decay"
    # optional per group. Parameters of fewer than 2 dimensions get no weight decay in any group.
    param_groups: List[Dict[str, Any]] = field(default_factory=list)
    # "all": every other candidate of the batch is a query's negative (SPEC). "modality": only the candidates of
    # its positive's modality, as in evaluation, where each task searches a pool of one modality (docs/demo.md)
    negatives: str = "all"
    # "sum": SPEC's triplet term, a sum over a query's negatives (its weight grows with the batch); "mean": mu1 on
    # the mean over negatives (mu1 / (N - 1) on the sum, N the candidates of a micro-batch)
    triplet: str = "sum"
    keep_graphs: int = 1  # GradCache: chunks backpropagated from the embedding pass without a replay
    # probability that a text-only query gets one random word of the model tokenizer's vocabulary inserted
    # (omniret.train.augment.insert_random_word), fresh draws each step; never a word of `text_noise_exclude`
    text_noise: float = 0.0
    text_noise_exclude: List[str] = field(default_factory=list)
    bf16: bool = False
    seed: int = 0
    output_dir: Optional[str] = None
    checkpoint_every: int = 0  # optimizer steps; 0: only at stage ends and when stopping
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when available, else cpu
    strategy: str = "ddp"  # under torch.distributed: "ddp" (replicated) or "fsdp" (FSDP2, sharded parameters)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"train config: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "stages" in d:
            stage_keys = {f.name for f in fields(StageConfig)}
            stages = []
            for i, s in enumerate(d["stages"]):
                if not isinstance(s, dict):
                    raise ValueError(f"train config: stages[{i}] must be a mapping, got {s!r}")
                bad = set(s) - stage_keys
                if bad:
                    raise ValueError(f"train config: stages[{i}] has unknown keys {sorted(bad)}")
                stages.append(StageConfig(**s))
            d["stages"] = stages
        for key in ("adam_betas", "datasets_per_task"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d).validate()

    def validate(self) -> "TrainConfig":
        check_field_types(self, "train")
        if not self.stages:
            raise ValueError("stages: at least one stage")
        for i, s in enumerate(self.stages):
            check_field_types(s, f"train.stages[{i}]")
            if s.steps < 0 or s.batch_size < 1:
                raise ValueError(f"stages[{i}]: steps must be >= 0 and batch_size >= 1")
            if s.kind not in ("contrastive", "tower_warmup"):
                raise ValueError(f"stages[{i}].kind must be 'contrastive' or 'tower_warmup', got {s.kind!r}")
            if s.kind == "tower_warmup" and not s.epochs:
                raise ValueError(f"stages[{i}]: a tower_warmup stage needs epochs, e.g. {{'image': 20}}")
            if s.grad_accum is not None and s.grad_accum < 1:
                raise ValueError(f"stages[{i}].grad_accum must be >= 1, got {s.grad_accum}")
            if s.task_counts is not None and (not s.task_counts or min(s.task_counts.values()) < 1):
                raise ValueError(f"stages[{i}].task_counts must give every task >= 1 example, got {s.task_counts}")
            for j, g in enumerate(s.param_groups or []):
                _check_group(g, f"stages[{i}].param_groups[{j}]")
        for j, g in enumerate(self.param_groups):
            _check_group(g, f"param_groups[{j}]")
        if self.grad_accum < 1 or self.chunk_size < 1:
            raise ValueError("grad_accum and chunk_size must be >= 1")
        if self.keep_graphs < 0:
            raise ValueError(f"keep_graphs must be >= 0, got {self.keep_graphs}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.negatives not in ("all", "modality"):
            raise ValueError(f"negatives must be 'all' or 'modality', got {self.negatives!r}")
        if self.triplet not in ("sum", "mean"):
            raise ValueError(f"triplet must be 'sum' or 'mean', got {self.triplet!r}")
        if not 0.0 <= self.text_noise <= 1.0:
            raise ValueError(f"text_noise must be a probability in [0, 1], got {self.text_noise}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _check_group(group: Dict[str, Any], where: str) -> None:
    unknown = set(group) - {"match", "lr", "weight_decay"}
    if unknown or "match" not in group or "lr" not in group:
        raise ValueError(f"{where}: a parameter group is {{'match': [name substrings], 'lr': float"
                         f"[, 'weight_decay': float]}}, got {group}")
    if not isinstance(group["match"], (list, tuple, str)) or float(group["lr"]) < 0:
        raise ValueError(f"{where}: match must be a substring or a list of them and lr >= 0, got {group}")


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


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (across stages and resumes)
    samples: int  # query-candidate pairs seen in total
    stopped: str  # "done", "time_budget" or "max_steps"
    history: List[Dict[str, Any]]  # metrics of the optimizer steps run by this call
    last_checkpoint: Optional[str] = None
    tower_warmup: Dict[str, Any] = field(default_factory=dict)  # tower_warmup stages' reports, by stage name


class _Metrics:
    """metrics.jsonl + TensorBoard, both optional."""

    def __init__(self, directory: Optional[Path], tensorboard: bool, resume_step: int, enabled: bool):
        self.path = directory / "metrics.jsonl" if directory is not None and enabled else None
        self.writer = None
        if self.path is not None:
            directory.mkdir(parents=True, exist_ok=True)
            # a killed run may have logged steps past its last checkpoint: they are rerun, so drop them
            if self.path.exists():  # (a line torn by a kill is dropped; a damaged one raises naming the file)
                kept = [r for r in read_jsonl_log(self.path) if r.get("step", 0) <= resume_step]
                atomic_write_text(self.path, dumps_lines(kept))
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step + 1)
                except ImportError as exc:
                    warnings.warn(f"TensorBoard logging off: {exc}")

    def log(self, record: Dict[str, Any]) -> None:
        if self.path is not None:
            append_jsonl(self.path, record)
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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

    def _optimizer(self, params: List[nn.Parameter], stage: StageConfig):
        """AdamW over the trainable parameters, one learning rate per parameter group (config.param_groups or the
        stage's), each split into weight-decayed (>= 2-D) and undecayed parameters."""
        cfg = self.config
        lr = stage.lr if stage.lr is not None else cfg.lr
        specs = stage.param_groups if stage.param_groups is not None else cfg.param_groups
        wanted = {id(p) for p in params}
        members: List[List[nn.Parameter]] = [[] for _ in range(len(specs) + 1)]  # the last: the default group
        for name, p in self.model.named_parameters():
            if id(p) not in wanted:
                continue
            slot = len(specs)
            for k, spec in enumerate(specs):
                subs = [spec["match"]] if isinstance(spec["match"], str) else spec["match"]
                if any(sub in name for sub in subs):
                    slot = k
                    break
            members[slot].append(p)
        groups = []  # the default group first: metrics log param_groups[0]'s rate as "lr"
        for spec, ps in zip([{"lr": lr}] + list(specs), members[-1:] + members[:-1]):
            decay = float(spec.get("weight_decay", cfg.weight_decay))
            groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": decay, "lr": float(spec["lr"])},
                       {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr": float(spec["lr"])}]
        groups = [g for g in groups if g["params"]]
        if self.temperature is not None:
            groups.append({"params": list(self.temperature.parameters()), "weight_decay": 0.0, "lr": lr})
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.adam_betas))
        warmup = stage.warmup_steps if stage.warmup_steps is not None else cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, stage.steps, warmup, cfg.min_lr_ratio))
        return opt, sched

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

    def _warm_up_towers(self, stage: StageConfig, dataset) -> Dict[str, Any]:
        """A tower_warmup stage: the model's setup_stage, then omniret.train.tower_warmup.warm_up_towers on the
        data set's labelled media. Its loop trains a temporary classifier with cross entropy (not this trainer's
        contrastive step); it is run here, as a stage, so that a config (or the demo) trains through Trainer."""
        from omniret.train.tower_warmup import warm_up_towers

        labelled = getattr(dataset, "labelled_media", None)
        if labelled is None:
            raise ValueError("a tower_warmup stage needs a data set with labelled_media() (omniret.data.mbeir_train "
                             "reads labels/<split>.jsonl)")
        self._setup_stage(stage)
        self.model.to(self.device)
        data = labelled(list(stage.epochs))
        augment, feature_augment = tower_augmentations(stage.augment)
        return warm_up_towers(self.model, data, epochs=dict(stage.epochs), lr=stage.lr or 3e-3,
                              batch_size=stage.batch_size, seed=self.config.seed, augment=augment,
                              feature_augment=feature_augment, log=print if self.config.progress_bar else (lambda *a: None),
                              progress=self.config.progress_bar and self.rank == 0)

    # ------------------------------------------------------------------------------------------------------
    def _split_batch(self, dataset, indices: Sequence[int], draw: int = 0):
        """The global batch -> this rank's (queries, candidates, candidate ids): positives first, then the
        extra negatives. A data set with `draw(i, draw)` (omniret.data.mbeir_train) makes its per-draw choices
        (positive, negatives, instruction) from `draw`, the micro-batch's number in the run."""
        mine = list(indices)[self.rank::self.world]
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

    def fit(self, dataset, time_budget_s: Optional[float] = None, max_steps: Optional[int] = None,
            sampler: Optional[TaskBalancedSampler] = None) -> TrainResult:
        """Train through every stage, resuming from the newest checkpoint in output_dir when config.resume.
        Stops early (with a checkpoint; call again to go on) once `time_budget_s` seconds have passed or this
        call has run `max_steps` optimizer steps. Returns the steps done and this call's metrics. The writing
        rank holds output_dir's lock (omniret.files.RunLock) meanwhile: a second trainer there is refused."""
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
        groups = groups_of(dataset) if sampler is None else None

        state = self.checkpoints.load_latest() if (self.checkpoints is not None and cfg.resume) else None
        stage_index, stage_step, global_step, samples = 0, 0, 0, 0
        saved_step = -1  # the global step of the newest checkpoint on disk
        if state is not None:
            stage_index, stage_step = state["stage_index"], state["stage_step"]
            global_step, samples = state["global_step"], state["samples"]
            saved_step = global_step
        is_main = self.rank == 0
        metrics = _Metrics(self.output_dir, cfg.tensorboard, global_step, enabled=is_main)
        total_steps = sum(s.steps for s in cfg.stages if s.kind == "contrastive")
        tower_report: Dict[str, Any] = dict(state.get("tower_warmup") or {}) if state is not None else {}
        if cfg.negatives == "modality" and self.world > 1:
            raise ValueError("negatives='modality' is implemented for one process only")
        filler = text_noise_words(self.model, cfg.text_noise_exclude) if cfg.text_noise > 0 else None
        history: List[Dict[str, Any]] = []
        last_ckpt = None
        stopped = "done"
        bar = None
        if cfg.progress_bar and is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", dynamic_ncols=True)
        try:
            while stage_index < len(cfg.stages):
                stage = cfg.stages[stage_index]
                if stage.kind == "tower_warmup":
                    if state is not None and state.get("stage_index") == stage_index:
                        raise ValueError("checkpoint: a tower warm-up stage is never checkpointed half-way")
                    tower_report[stage.name or f"stage{stage_index}"] = self._warm_up_towers(stage, dataset)
                    stage_index += 1
                    if self.checkpoints is not None and is_main:
                        self.model.to(self.device)
                        last_ckpt = str(self.checkpoints.save({
                            "version": 1, "stage_index": stage_index, "stage_step": 0, "global_step": global_step,
                            "samples": samples, "strategy": "fsdp" if self.sharded else "ddp",
                            "model": self._trainable_state(), "optimizer": None, "rng": capture_rng(),
                            "tower_warmup": tower_report, "config": cfg.to_dict()}, global_step))
                        saved_step = global_step
                    continue
                params = self._setup_stage(stage)
                if not params:
                    raise ValueError(f"stage {stage.stage}: the model has no trainable parameter")
                net = self._wrap()
                params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP replaced them
                opt, sched = self._optimizer(params, stage)
                stage_sampler = sampler or TaskBalancedSampler(
                    groups, stage.batch_size,
                    stage.tasks_per_batch if stage.tasks_per_batch is not None else cfg.tasks_per_batch,
                    tuple(stage.datasets_per_task if stage.datasets_per_task is not None else cfg.datasets_per_task),
                    stage.tasks, seed=cfg.seed + 1000 * stage_index, task_counts=stage.task_counts)
                grad_accum = stage.grad_accum if stage.grad_accum is not None else cfg.grad_accum
                if state is not None and state.get("optimizer") is None:  # written after a tower warm-up stage
                    self._load_trainable_state(state["model"])
                    restore_rng(state["rng"])
                    state = None
                if state is not None:  # resuming inside (or at the end of) this stage
                    if state.get("strategy", "ddp") != ("fsdp" if self.sharded else "ddp"):
                        raise ValueError("checkpoint: written with another strategy (fsdp checkpoints hold "
                                         "optimizer states by parameter name); resume with the same --strategy")
                    if self.sharded:
                        tdist.load_full_state_dict(self.model, state["model"], opt, state["optimizer"])
                    else:
                        self._load_trainable_state(state["model"])
                        opt.load_state_dict(state["optimizer"])
                    sched.load_state_dict(state["scheduler"])
                    stage_sampler.load_state_dict(state["sampler"])
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
                    state = None
                micro_batch = (sum(stage.task_counts.values()) if stage.task_counts else stage.batch_size) // self.world
                mu1 = cfg.mu1 / max(1, micro_batch - 1) if cfg.triplet == "mean" else cfg.mu1
                gc = GradCache(net, cfg.chunk_size, cfg.tau, cfg.beta, mu1, cfg.mu2, margin=cfg.margin,
                               detach_weights=cfg.detach_weights, temperature=self.temperature,
                               loss_chunk_size=cfg.loss_chunk_size, keep_graphs=cfg.keep_graphs,
                               autocast_dtype=torch.bfloat16 if cfg.bf16 else None, symmetric=cfg.symmetric)
                self.model.train()

                def checkpoint():
                    nonlocal saved_step
                    saved_step = global_step
                    if self.checkpoints is None:
                        return None
                    if self.sharded:  # every rank takes part in gathering the full states
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
                            "version": 1, "stage_index": stage_index, "stage_step": stage_step,
                            "global_step": global_step, "samples": samples,
                            "strategy": "fsdp" if self.sharded else "ddp",
                            "model": model_state, "optimizer": optim_state,
                            "scheduler": sched.state_dict(), "sampler": stage_sampler.state_dict(),
                            "temperature": self.temperature.state_dict() if self.temperature is not None else None,
                            "rng": rng, "tower_warmup": tower_report, "config": cfg.to_dict(),
                        }, global_step))
                    if self.world > 1:
                        dist.barrier()  # every rank sees this checkpoint before going on (and may resume from it)
                    return path

                while stage_step < stage.steps:
                    if time_budget_s is not None and self._agree(time.monotonic() - t_start >= time_budget_s):
                        stopped = "time_budget"  # (ranks agree: clocks differ, and a lone rank would hang)
                        break
                    if max_steps is not None and len(history) >= max_steps:
                        stopped = "max_steps"
                        break
                    t0 = time.monotonic()
                    opt.zero_grad(set_to_none=True)
                    sums: Dict[str, float] = {}
                    step_pairs = 0
                    for micro in range(grad_accum):
                        indices = stage_sampler.next_batch()
                        draw = global_step * grad_accum + micro
                        queries, candidates, ids, relevant = self._split_batch(dataset, indices, draw)
                        if filler is not None:
                            queries = add_filler_words(queries, filler, cfg.text_noise, torch.Generator().manual_seed(
                                (cfg.seed * 1_000_003 + draw) % (2 ** 63)))
                        if self.world == 1:  # relevance known here: the mask is built from it
                            mask = {"positives": negatives_mask(candidates, ids, relevant, len(queries),
                                                                cfg.negatives == "modality")}
                        else:  # GradCache masks duplicates over the global batch by id
                            mask = {"candidate_ids": ids}
                        stats = gc.step(queries, candidates, **mask, loss_scale=1.0 / grad_accum,
                                        sync=micro == grad_accum - 1)
                        for k in ("loss", "contrastive", "triplet", "diversity"):
                            sums[k] = sums.get(k, 0.0) + stats[k] / grad_accum
                        step_pairs += len(indices)
                    # the norm is taken also without clipping (an infinite bound scales by exactly 1): a step whose
                    # loss or gradient is not finite would turn every weight into NaN, and the checkpoints after it
                    clip = params + (list(self.temperature.parameters()) if self.temperature else [])
                    max_norm = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
                    if self.sharded:
                        grad_norm = tdist.clip_grad_norm(clip, max_norm)
                    else:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(clip, max_norm))
                    newest = f"step {saved_step}" if saved_step >= 0 else "none"
                    check_step_finite(global_step + 1, sums["loss"], grad_norm,
                                      f"the weights are those of step {global_step} (newest checkpoint: {newest})")
                    lr = opt.param_groups[0]["lr"]
                    opt.step()
                    sched.step()
                    stage_step += 1
                    global_step += 1
                    samples += step_pairs
                    seconds = time.monotonic() - t0
                    record = {"step": global_step, "stage": stage.stage, "stage_step": stage_step, **sums,
                              "lr": lr, "samples_per_s": step_pairs / max(seconds, 1e-9), "samples": samples,
                              "tau": stats["tau"], "grad_norm": grad_norm}
                    history.append(record)
                    if global_step % cfg.log_every == 0:
                        metrics.log(record)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{sums['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                        stage=stage.stage)
                    if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                        last_ckpt = checkpoint() or last_ckpt
                # the end of a stage or a stop: checkpoint unless this very step is already saved
                if global_step != saved_step:
                    last_ckpt = checkpoint() or last_ckpt
                if stopped != "done":
                    break
                stage_index += 1
                stage_step = 0
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        self.model.eval()
        return TrainResult(global_step, samples, stopped, history, last_ckpt, tower_report)
