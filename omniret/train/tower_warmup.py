"""Supervised warm-up of trainable media towers before contrastive training.

The paper's media encoders (SigLIP, Whisper) arrive pretrained: their tokens already separate what the images
and sounds show. A small tower trained from scratch does not, and contrastive training over the whole
resampler -> LLM -> pooling path then finds it cheaper to make every item's embedding alike than to discover
the content (measured on the digits demo: docs/demo.md). `warm_up_towers` gives such a tower a short
pretraining of its own: the tower's tokens, mean-pooled, feed a temporary linear classifier trained with cross
entropy on the training split's labels. Only the tower's weights are kept; the classifier is discarded.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["feature_augmentation", "warm_up_towers"]


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


def _train_epochs(encoder, classifier, optimizer, xs: list, labels: torch.Tensor, *, epochs: int, batch_size: int,
                  lr: float, schedule: str, transform: Optional[Callable], generator: torch.Generator,
                  bar) -> torch.Tensor:
    """The warm-up's training loop for one tower; returns the last batch's loss (NaN without epochs)."""
    loss = torch.tensor(float("nan"))
    steps, step = epochs * math.ceil(len(xs) / batch_size), 0
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for i in range(0, len(xs), batch_size):
            if schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            step += 1
            idx = order[i:i + batch_size]
            batch = [xs[j] for j in idx.tolist()]
            if transform is not None:
                batch = [transform(x, generator) for x in batch]
            logits = classifier(_mean_tokens(*encoder.encode(batch)))
            loss = F.cross_entropy(logits, labels[idx].to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    return loss


def warm_up_towers(model, data: Mapping[str, tuple[Sequence, torch.Tensor]], *,
                   epochs: int | Mapping[str, int] = 10,
                   lr: float = 3e-3, batch_size: int = 64, seed: int = 0, schedule: str = "cosine",
                   augment: Optional[Mapping[str, Callable]] = None,
                   feature_augment: Optional[Mapping[str, Callable]] = None, log: Callable = print,
                   progress: bool = False) -> dict:
    """Train each named tower with a temporary linear classifier on its mean-pooled tokens.

    data: {modality: (raw items as the model's encoders take them, integer labels (n,))}.
    epochs: one count for every tower, or {modality: epochs} (a small image tower is cheap to train for longer).
    schedule: "cosine" (the learning rate decays to 0 over the warm-up: the tower ends in a settled state rather
    than wherever the last steps of a constant rate left it) or "constant".
    augment: {modality: fn(preprocessed item, torch.Generator) -> item}, applied to every training item each
    time it is drawn (e.g. omniret.train.augment.speed_perturb for audio); the accuracy check sees plain items.
    feature_augment: {modality: fn(features, torch.Generator) -> features}, applied inside the tower to each
    training item's features (e.g. omniret.train.augment.warp_frequencies on the CNN audio tower's log-mel),
    for towers with a `feature_augment` hook; the same generator as `augment`. The hook is cleared afterwards.
    Returns {modality: {"epochs", "final_loss", "train_accuracy", "seconds"}}; the train accuracy is measured
    after the last epoch, in eval mode. The model's other parameters are untouched.
    """
    per_modality = dict(epochs) if isinstance(epochs, Mapping) else {m: epochs for m in data}
    if set(per_modality) != set(data):
        raise ValueError(f"epochs names {sorted(per_modality)}, data holds {sorted(data)}: give one count per tower")
    if min(per_modality.values(), default=0) < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    augment = dict(augment or {})
    feature_augment = dict(feature_augment or {})
    for name, given in (("augment", augment), ("feature_augment", feature_augment)):
        unknown = sorted(set(given) - set(data))
        if unknown:
            raise ValueError(f"{name} names {unknown}, which data does not hold (it holds {sorted(data)})")
    _check(model, data)
    for modality in feature_augment:  # every tower checked before any trains
        _require_hook(model, modality)
    report = {}
    for modality, (items, labels) in data.items():
        n_epochs = int(per_modality[modality])
        start = time.perf_counter()
        encoder = model.encoders[modality]
        labels = torch.as_tensor(labels).long()
        xs = [encoder.preprocess(x, f"data[{modality!r}][{i}]") for i, x in enumerate(items)]
        with torch.random.fork_rng(devices=[]):  # the classifier's init depends on `seed`, not the global RNG
            torch.manual_seed(seed)
            classifier = nn.Linear(encoder.out_dim, int(labels.max()) + 1).to(encoder.device)
        params = [p for p in encoder.parameters() if p.requires_grad] + list(classifier.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        was_training = encoder.training
        encoder.train()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_epochs, desc=f"warm-up {modality} tower", unit="epoch", dynamic_ncols=True)
        transform = augment.get(modality)
        hook = {}
        if modality in feature_augment:
            hook[modality] = lambda f, fn=feature_augment[modality], g=generator: fn(f, g)
        with feature_augmentation(model, hook):
            loss = _train_epochs(encoder, classifier, optimizer, xs, labels, epochs=n_epochs, batch_size=batch_size,
                                 lr=lr, schedule=schedule, transform=transform, generator=generator, bar=bar)
        if bar is not None:
            bar.close()
        encoder.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xs), 256):
                logits = classifier(_mean_tokens(*encoder.encode(xs[i:i + 256])))
                correct += int((logits.argmax(1).cpu() == labels[i:i + 256]).sum())
        encoder.train(was_training)
        for p in params:  # the classifier goes; the tower keeps no optimizer state behind
            p.grad = None
        report[modality] = {"epochs": n_epochs, "final_loss": float(loss.detach()), "train_accuracy": correct / len(xs),
                            "seconds": round(time.perf_counter() - start, 1)}
        log(f"warm-up {modality} tower: {n_epochs} epochs, train accuracy {correct / len(xs):.3f}, "
            f"{report[modality]['seconds']}s")
    return report
