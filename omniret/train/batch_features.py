"""What the trainer's features add to a step, kept out of trainer.py: which candidates are not a query's negatives,
the words text noise inserts, and a tower warm-up stage's augmentations named in a config."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["negatives_mask", "text_noise_words", "tower_augmentations"]


def negatives_mask(candidates: Sequence[dict], ids: Sequence[Any], relevant: Sequence[set], n_queries: int,
                   by_modality: bool = False) -> torch.Tensor:
    """(Q, C) bool for GradCache's `positives`: True where candidate j is not query i's negative, because it is
    the same target (same id), another of query i's relevant candidates (`relevant[i]`: ids), or, with
    `by_modality`, of another modality than query i's positive (candidate i). Media keys name an item's modality;
    a text-only item is "text"."""
    id_index: Dict[Any, int] = {}
    cand_ids = torch.tensor([id_index.setdefault(i, len(id_index)) for i in ids])
    q = slice(0, n_queries)
    mask = cand_ids[q, None] == cand_ids[None, :]
    for i, rel in enumerate(relevant):
        if rel:
            mask[i] |= torch.tensor([x in rel for x in ids])
    if by_modality:
        media = ("image", "audio", "video")
        kinds: Dict[Any, int] = {}
        kind_ids = torch.tensor([kinds.setdefault(tuple(k for k in media if k in c) or ("text",), len(kinds))
                                 for c in candidates])
        mask |= kind_ids[q, None] != kind_ids[None, :]
    return mask


def text_noise_words(model: nn.Module, exclude: Sequence[str]) -> List[str]:
    """The words of the model's composer tokenizer (for text noise), less `exclude`; a ValueError for a model
    without one."""
    from omniret.train.augment import vocabulary_words

    tokenizer = getattr(getattr(model, "composer", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError("text_noise: the model has no composer tokenizer to draw words from")
    # (a transformers tokenizer is wrapped; the byte tokenizer has no vocabulary and is refused with a ValueError)
    return vocabulary_words(getattr(tokenizer, "tok", tokenizer), exclude=list(exclude))


_AUGMENTS = {"image": "random_affine", "audio": "speed_perturb", "audio_features": "warp_frequencies"}


def tower_augmentations(spec: Optional[Dict[str, str]]) -> tuple:
    """A tower_warmup stage's `augment` ({"image": "random_affine", "audio": "speed_perturb:0.8:1.25",
    "audio_features": "warp_frequencies:0.85:1.2"}) -> (augment, feature_augment) for the TowerWarmup objective."""
    import functools

    from omniret.train import augment as aug

    items, features = {}, {}
    for key, text in (spec or {}).items():
        name, *bounds = str(text).split(":")
        if key not in _AUGMENTS or name != _AUGMENTS[key] or len(bounds) not in (0, 2):
            raise ValueError(f"augment[{key!r}]: expected one of {_AUGMENTS} (with optional ':low:high'), got {text!r}")
        fn = getattr(aug, name)
        if bounds:
            fn = functools.partial(fn, low=float(bounds[0]), high=float(bounds[1]))
        if key == "audio_features":
            features["audio"] = fn
        else:
            items[key] = fn
    return items, features
