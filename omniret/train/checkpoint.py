"""Checkpoints written atomically: a run killed at any point (even mid-write) resumes from the newest complete
checkpoint.

Each checkpoint is one file `ckpt-<step>.pt`, written through omniret.files (temporary name in the same
directory, fsync, rename); then the pointer file `latest` is replaced the same way. A reader trusts `latest` only
when it holds a bare `ckpt-<step>.pt` name of its own directory, and falls back to the newest loadable `ckpt-*.pt`.

Checkpoints hold tensors and plain data only (the RNG states are stored as tensors and lists) and load with
`torch.load(..., weights_only=True)`: a file dropped into the directory can fail to load, never run code. When
checkpoint files are there but none loads, `load_latest` raises an InputError naming them instead of starting over.
"""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from omniret.errors import InputError
from omniret.files import atomic_torch_save, atomic_write_bytes

__all__ = ["atomic_write_bytes", "atomic_torch_save", "CheckpointManager", "capture_rng", "restore_rng"]

_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def capture_rng() -> Dict[str, Any]:
    """Every global RNG a training step may draw from, as tensors and plain values (weights_only loadable)."""
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but the checkpoint must not need it
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """`save(state, step)` / `load_latest()` in `directory`, keeping the newest `keep` checkpoints."""

    def __init__(self, directory, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:09d}.pt"

    def list(self) -> List[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _CKPT.match(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]

    def save(self, state: Dict[str, Any], step: int) -> Path:
        path = self.path_for(step)
        atomic_torch_save(state, path)
        atomic_write_bytes(self.directory / "latest", path.name.encode())
        for old in self.list()[: -self.keep]:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def latest_path(self) -> Optional[Path]:
        """The file `latest` names, if it is a bare `ckpt-<step>.pt` in this directory; else the newest one."""
        pointer = self.directory / "latest"
        if pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            if _CKPT.match(name):  # a bare name: no separator, no "..", nothing outside this directory
                candidate = self.directory / name
                if candidate.is_file() and not candidate.is_symlink():
                    return candidate
            else:
                warnings.warn(f"{pointer}: ignored (it must hold a bare ckpt-<step>.pt name, got {name[:80]!r})")
        found = self.list()
        return found[-1] if found else None

    def load_latest(self, map_location="cpu") -> Optional[Dict[str, Any]]:
        """The newest checkpoint that loads; None when there is no checkpoint file. Checkpoint files of which
        none loads raise an InputError naming each with its error (resuming at step 0 would redo the run and
        drop its metrics)."""
        first = self.latest_path()
        order = ([first] if first is not None else []) + [p for p in reversed(self.list()) if p != first]
        failures = []
        for path in order:
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # torn, foreign, or holding objects other than tensors and plain data
                failures.append(f"{path.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            if not isinstance(state, dict):
                failures.append(f"{path.name}: not a checkpoint dictionary")
                continue
            if failures:
                warnings.warn(f"{self.directory}: skipped unloadable checkpoints ({'; '.join(failures)}); "
                              f"resuming from {path.name}")
            return state
        if failures:
            raise InputError(f"{self.directory}: {len(failures)} checkpoint file(s) but none loads "
                             f"({'; '.join(failures)}). Move them away to start over, or resume with the "
                             "version that wrote them")
        return None
