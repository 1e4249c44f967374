"""The training configuration: `TrainConfig` (the run) and its `StageConfig`s (what each stage trains, and how).

A config file's `train:` section is `TrainConfig.from_dict` of it; unknown keys and values of the wrong type are
refused with the field's name before anything trains."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from omniret.errors import check_field_types

OPTIMIZERS = ("adamw", "muon")  # what a parameter group may step with ("optimizer"; adamw when left out)

__all__ = ["StageConfig", "TrainConfig"]


@dataclass
class StageConfig:
    """One training stage. `stage` is what the model's setup_stage receives (1 = warm-up, 2 = fine-tuning).

    kind "contrastive" (the default): `steps` optimizer steps of GradCache over task-balanced batches.
    kind "tower_warmup": the supervised warm-up of trainable media towers (omniret.train.tower_warmup) on the
    data set's labelled media (`dataset.labelled_media()`): `epochs` per tower ({modality: epochs}; the towers
    train one after the other, in that order), batches of `batch_size` items, AdamW at `lr` (default 3e-3) with
    cosine decay to 0 over each tower's steps; `augment` names the warm-up's augmentations ({"image":
    "random_affine", "audio": "speed_perturb", "audio_features": "warp_frequencies"}, each optionally
    "name:low:high"). Its optimizer steps are the stage's steps (`steps` and `warmup_steps` are not used); it
    checkpoints and resumes like a contrastive stage. A stand-in for pretrained encoders (the demo's CNN towers
    start random).
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
    symmetric: bool = False
    learnable_temperature: bool = False
    loss_chunk_size: int = 1024
    tasks_per_batch: int = 4
    datasets_per_task: tuple = (1, 2)
    # Learning rates per parameter group: [{"match": ["lora_"], "lr": 1e-3}, ...]; a trainable parameter joins the
    # first group one of whose substrings its name contains, else the default group (`lr`). "weight_decay"
    # optional per group. Parameters of fewer than 2 dimensions get no weight decay in any group. "optimizer":
    # "muon" steps the group's matrices with torch.optim.Muon (omniret.train.optim); its vectors go on to the
    # next group that matches them.
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
        names = [s.name for s in self.stages if s.name]
        if len(set(names)) != len(names):  # results and checkpoints keep each stage's steps and report by name
            raise ValueError(f"stages: each stage's name must be its own, got {names}")
        for i, s in enumerate(self.stages):
            check_field_types(s, f"train.stages[{i}]")
            if s.steps < 0 or s.batch_size < 1:
                raise ValueError(f"stages[{i}]: steps must be >= 0 and batch_size >= 1")
            if s.kind not in ("contrastive", "tower_warmup"):
                raise ValueError(f"stages[{i}].kind must be 'contrastive' or 'tower_warmup', got {s.kind!r}")
            if s.kind == "tower_warmup":
                if not s.epochs:
                    raise ValueError(f"stages[{i}]: a tower_warmup stage needs epochs, e.g. {{'image': 20}}")
                bad = {m: n for m, n in s.epochs.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0}
                if bad:
                    raise ValueError(f"stages[{i}].epochs must be whole numbers >= 0 per tower, got {bad}")
                if s.grad_accum not in (None, 1) or s.task_counts is not None or s.tasks is not None:
                    raise ValueError(f"stages[{i}]: a tower_warmup stage takes one batch of labelled items per "
                                     "step: no grad_accum, task_counts or tasks")
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
        uses_muon = any(g.get("optimizer") == "muon" for g in
                        list(self.param_groups) + [g for s in self.stages for g in (s.param_groups or [])])
        if uses_muon and self.strategy == "fsdp":  # Muon orthogonalises whole matrices; FSDP2 holds shards
            raise ValueError("param_groups: 'optimizer': 'muon' needs whole matrices; use strategy 'ddp' with it")
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
    unknown = set(group) - {"match", "lr", "weight_decay", "optimizer"}
    if unknown or "match" not in group or "lr" not in group:
        raise ValueError(f"{where}: a parameter group is {{'match': [name substrings], 'lr': float"
                         f"[, 'weight_decay': float][, 'optimizer': 'adamw' or 'muon']}}, got {group}")
    if not isinstance(group["match"], (list, tuple, str)) or float(group["lr"]) < 0:
        raise ValueError(f"{where}: match must be a substring or a list of them and lr >= 0, got {group}")
    if group.get("optimizer", "adamw") not in OPTIMIZERS:
        raise ValueError(f"{where}: optimizer must be one of {list(OPTIMIZERS)}, got {group['optimizer']!r}")
