"""Where backbone weights come from: a local directory, a Python package, or (only when the user writes one) a
Hugging Face hub name. Nothing here downloads on its own."""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from omniret.config import BackboneConfig

__all__ = ["resolve_backbone_path", "is_hub_name", "from_pretrained_kwargs", "torch_dtype", "read_local_config"]

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
