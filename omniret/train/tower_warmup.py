"""Supervised warm-up of trainable media towers before contrastive training: a Trainer stage of kind
"tower_warmup" (omniret.train.config.StageConfig), trained by the Trainer's one step loop.

The paper's media encoders (SigLIP, Whisper) arrive pretrained: their tokens already separate what the images
and sounds show. A small tower trained from scratch does not, and contrastive training over the whole
resampler -> LLM -> pooling path then finds it cheaper to make every item's embedding alike than to discover
the content (measured on the digits demo: docs/demo.md). The warm-up gives such a tower a short pretraining of
its own: the tower's tokens, mean-pooled, feed a temporary linear classifier trained with cross entropy on the
training split's labels. Only the tower's weights are kept; the classifier is discarded at the stage's end.

`TowerWarmup` is the stage's objective (omniret.train.objectives says what an objective supplies): the towers
train one after the other, each for its epochs of a seeded permutation of its labelled items, AdamW at `lr`
(one group, every parameter decayed by the config's weight_decay) with the rate decaying by a cosine to 0 over
each tower's own steps, no clipping. Its checkpoint state is the current epoch's order, the generator that draws
orders and augmentations, the classifiers and the finished towers' reports, so a run killed mid-stage resumes
to the weights of one that was not.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TowerWarmup", "feature_augmentation"]


def _mean_tokens(tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Packed tokens (T, C) + cu_seqlens (B + 1,) -> the mean token of each item (B, C)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=tokens.device), lengths)
    sums = torch.zeros(lengths.numel(), tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
    return sums.index_add_(0, owner, tokens) / lengths.to(tokens.dtype)[:, None]


def _check(model, data: Mapping[str, tuple[Sequence, torch.Tensor]]) -> None:
    encoders = getattr(model, "encoders", None)
    if encoders is None:
        raise ValueError("model has no media encoders to warm up")
    for modality, pair in data.items():
        if modality not in encoders:
            raise ValueError(f"data[{modality!r}]: the model has no {modality} encoder; it has {list(encoders)}")
        if not any(p.requires_grad for p in encoders[modality].parameters()):
            raise ValueError(f"data[{modality!r}]: the {modality} encoder is frozen; only trainable towers warm up")
        items, labels = pair
        labels = torch.as_tensor(labels)
        if len(items) == 0:
            raise ValueError(f"data[{modality!r}] holds no items")
        if labels.dim() != 1 or labels.numel() != len(items) or labels.dtype.is_floating_point:
            raise ValueError(f"data[{modality!r}]: labels must be {len(items)} integer class ids, got shape "
                             f"{tuple(labels.shape)} dtype {labels.dtype}")
        if int(labels.min()) < 0:
            raise ValueError(f"data[{modality!r}]: labels must be >= 0, got {int(labels.min())}")


def _require_hook(model, modality: str) -> None:
    if not hasattr(model.encoders[modality], "feature_augment"):
        raise ValueError(f"feature_augment[{modality!r}]: the {type(model.encoders[modality]).__name__} "
                         "tower has no feature_augment hook (the CNN audio tower has one)")


@contextlib.contextmanager
def feature_augmentation(model, hooks: Mapping[str, Callable]):
    """Within the block, each named tower applies hooks[modality](features) -> features to every item's features
    in training mode (its `feature_augment` hook); cleared afterwards, also when the block fails. A tower without
    the hook is a ValueError, before any is set."""
    for modality in hooks:
        _require_hook(model, modality)
    try:
        for modality, fn in hooks.items():
            model.encoders[modality].feature_augment = fn
        yield
    finally:
        for modality in hooks:
            model.encoders[modality].feature_augment = None


class _Tower:
    """One tower's share of the stage: its preprocessed items and labels, classifier and steps [start, end)."""

    def __init__(self, modality: str, encoder, items: list, labels: torch.Tensor, epochs: int, batch_size: int,
                 start: int, classifier: nn.Linear):
        self.modality, self.encoder, self.items, self.labels = modality, encoder, items, labels
        self.epochs, self.classifier = epochs, classifier
        self.per_epoch = math.ceil(len(items) / batch_size)
        self.start, self.end = start, start + epochs * self.per_epoch


class TowerWarmup:
    """The objective of a tower_warmup stage. data: {modality: (raw items as the model's encoders take them,
    integer labels (n,))}; epochs: {modality: epochs}, one count per tower of `data` (0: the tower is only
    measured). augment: {modality: fn(preprocessed item, torch.Generator) -> item}, applied to every training item
    each time it is drawn; feature_augment: {modality: fn(features, torch.Generator) -> features}, applied inside
    the tower (its `feature_augment` hook) to each training item's features; both draw from the generator of the
    epoch orders, seeded by `seed` at each tower's start. `finish()` returns {modality: {"epochs", "final_loss"
    (the last batch's), "train_accuracy" (after the last epoch, eval mode, plain items), "seconds"}}."""

    metric_keys = ("loss",)
    distributed = False  # every rank trains the towers on the whole batch, as one process does
    max_grad_norm = None  # not clipped (the norm is taken for the finite check)
    micro_batches = 1

    def __init__(self, model, data: Mapping[str, tuple[Sequence, torch.Tensor]], epochs: Mapping[str, int], *,
                 lr: float = 3e-3, batch_size: int = 64, seed: int = 0, weight_decay: float = 0.01,
                 augment: Optional[Mapping[str, Callable]] = None,
                 feature_augment: Optional[Mapping[str, Callable]] = None, log: Callable = print):
        epochs = dict(epochs)
        if set(epochs) != set(data):
            raise ValueError(f"epochs names {sorted(epochs)}, data holds {sorted(data)}: give one count per tower")
        if min(epochs.values(), default=0) < 0 or batch_size < 1 or not lr > 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
        self.augment, self.feature_augment = dict(augment or {}), dict(feature_augment or {})
        for name, given in (("augment", self.augment), ("feature_augment", self.feature_augment)):
            unknown = sorted(set(given) - set(data))
            if unknown:
                raise ValueError(f"{name} names {unknown}, which data does not hold (it holds {sorted(data)})")
        _check(model, data)
        for modality in self.feature_augment:  # every tower checked before any trains
            _require_hook(model, modality)
        self.model, self.lr, self.batch_size, self.seed = model, lr, batch_size, seed
        self.weight_decay, self.log = weight_decay, log
        self.towers: List[_Tower] = []
        self.seconds: Dict[str, float] = {}  # each tower's preprocessing, training steps and accuracy check
        for modality, (items, labels) in data.items():
            began = time.perf_counter()
            encoder = model.encoders[modality]
            labels = torch.as_tensor(labels).long()
            xs = [encoder.preprocess(x, f"labelled {modality} item {i}") for i, x in enumerate(items)]
            with torch.random.fork_rng(devices=[]):  # the classifier's init depends on `seed`, not the global RNG
                torch.manual_seed(seed)
                classifier = nn.Linear(encoder.out_dim, int(labels.max()) + 1).to(encoder.device)
            start = self.towers[-1].end if self.towers else 0
            self.towers.append(_Tower(modality, encoder, xs, labels, int(epochs[modality]), batch_size, start,
                                      classifier))
            self.seconds[modality] = time.perf_counter() - began
        self.steps = self.towers[-1].end
        self.trainable = [p for t in self.towers for p in
                          [p for p in t.encoder.parameters() if p.requires_grad] + list(t.classifier.parameters())]
        self.generator: Optional[torch.Generator] = None
        self.order: Optional[torch.Tensor] = None  # the current epoch's permutation of the current tower's items
        self.reports: Dict[str, Dict[str, Any]] = {}
        self.last_loss = {t.modality: float("nan") for t in self.towers}
        self._current = (self.towers[0].modality, 0)

    # the objective's interface (omniret.train.objectives) ------------------------------------------------
    def param_groups(self) -> List[Dict[str, Any]]:
        return [{"params": list(self.trainable), "weight_decay": self.weight_decay, "lr": self.lr}]

    def lr_factor(self, step: int) -> float:
        """Cosine from 1 to 0 over each tower's own steps (the tower ends in a settled state rather than wherever
        the last steps of a constant rate left it)."""
        for t in self.towers:
            if t.start <= step < t.end:
                return 0.5 * (1.0 + math.cos(math.pi * (step - t.start) / (t.end - t.start)))
        return 0.0  # past the last step

    def micro_step(self, stage_step: int, micro: int, loss_scale: float, sync: bool) -> Dict[str, float]:
        self._settle(stage_step)  # towers of no steps before this one are measured first
        tower = next(t for t in self.towers if t.start <= stage_step < t.end)
        start = time.perf_counter()
        local = stage_step - tower.start
        if local == 0:
            self.generator = torch.Generator().manual_seed(self.seed)
        epoch, batch_index = divmod(local, tower.per_epoch)
        if batch_index == 0:
            self.order = torch.randperm(len(tower.items), generator=self.generator)
        idx = self.order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
        batch = [tower.items[j] for j in idx.tolist()]
        transform = self.augment.get(tower.modality)
        if transform is not None:
            batch = [transform(x, self.generator) for x in batch]
        hooks = {}
        if tower.modality in self.feature_augment:
            fn, g = self.feature_augment[tower.modality], self.generator
            hooks[tower.modality] = lambda features: fn(features, g)
        with feature_augmentation(self.model, hooks):
            logits = tower.classifier(_mean_tokens(*tower.encoder.encode(batch)))
        loss = F.cross_entropy(logits, tower.labels[idx].to(logits.device))
        (loss if loss_scale == 1.0 else loss * loss_scale).backward()
        value = float(loss.detach())
        self.last_loss[tower.modality] = value
        self._current = (tower.modality, epoch + 1)
        self.seconds[tower.modality] += time.perf_counter() - start
        return {"loss": value, "pairs": 0, "examples": len(batch)}

    def step_info(self) -> Dict[str, Any]:
        return {"tower": self._current[0], "epoch": self._current[1]}

    def after_step(self, stage_step: int) -> None:
        self._settle(stage_step)

    def finish(self) -> Dict[str, Dict[str, Any]]:
        self._settle(self.steps)
        return dict(self.reports)

    def close(self) -> None:
        for t in self.towers:  # (a failed step may leave a hook set: feature_augmentation clears it)
            t.classifier = None
        self.towers = []

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state() if self.generator is not None else None,
                "order": self.order, "reports": self.reports, "seconds": self.seconds, "last_loss": self.last_loss,
                "classifiers": {t.modality: t.classifier.state_dict() for t in self.towers}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])
        self.order = state.get("order")
        self.reports = {m: dict(r) for m, r in state["reports"].items()}
        self.seconds.update(state["seconds"])
        self.last_loss.update(state["last_loss"])
        for t in self.towers:
            t.classifier.load_state_dict(state["classifiers"][t.modality])

    # ------------------------------------------------------------------------------------------------------
    def _settle(self, position: int) -> None:
        """Measure and report every tower whose steps all lie before `position` and that has no report yet."""
        for t in self.towers:
            if t.end <= position and t.modality not in self.reports:
                self.reports[t.modality] = self._report(t)

    def _report(self, tower: _Tower) -> Dict[str, Any]:
        start = time.perf_counter()
        encoder = tower.encoder
        was_training = encoder.training
        encoder.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(tower.items), 256):
                logits = tower.classifier(_mean_tokens(*encoder.encode(tower.items[i:i + 256])))
                correct += int((logits.argmax(1).cpu() == tower.labels[i:i + 256]).sum())
        encoder.train(was_training)
        accuracy = correct / len(tower.items)
        seconds = round(self.seconds[tower.modality] + time.perf_counter() - start, 1)
        self.log(f"warm-up {tower.modality} tower: {tower.epochs} epochs, train accuracy {accuracy:.3f}, {seconds}s")
        return {"epochs": tower.epochs, "final_loss": self.last_loss[tower.modality], "train_accuracy": accuracy,
                "seconds": seconds}

    @classmethod
    def from_stage(cls, model, stage, dataset, config, log: Callable = print) -> "TowerWarmup":
        """A tower_warmup stage of a config: the data set's labelled media (`labelled_media(modalities)`,
        omniret.data.mbeir_train reads labels/<split>.jsonl) for the towers `stage.epochs` names, the
        augmentations `stage.augment` names (omniret.train.batch_features.tower_augmentations)."""
        from omniret.train.batch_features import tower_augmentations

        labelled = getattr(dataset, "labelled_media", None)
        if labelled is None:
            raise ValueError("a tower_warmup stage needs a data set with labelled_media() (omniret.data.mbeir_train "
                             "reads labels/<split>.jsonl)")
        augment, feature_augment = tower_augmentations(stage.augment)
        return cls(model, labelled(list(stage.epochs)), stage.epochs,
                   lr=stage.lr if stage.lr is not None else 3e-3, batch_size=stage.batch_size, seed=config.seed,
                   weight_decay=config.weight_decay, augment=augment, feature_augment=feature_augment, log=log)
