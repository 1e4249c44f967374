"""Checkpoints written atomically: a run killed at any point (even mid-write) resumes from the newest complete
checkpoint.

Each checkpoint is one file `ckpt-<step>.pt`, written to a temporary name in the same directory, flushed with
fsync and renamed over (os.replace is atomic on POSIX); then the pointer file `latest` is replaced the same way.
A reader trusts `latest` but falls back to the newest loadable `ckpt-*.pt` if the pointer is stale.
"""
from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ["atomic_write_bytes", "atomic_torch_save", "CheckpointManager", "capture_rng", "restore_rng"]

_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def capture_rng() -> Dict[str, Any]:
    """Every global RNG a training step may draw from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is a dependency, but the checkpoint must not need it
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
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
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _CKPT.match(p.name))]
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
        pointer = self.directory / "latest"
        if pointer.is_file():
            candidate = self.directory / pointer.read_text().strip()
            if candidate.is_file():
                return candidate
        found = self.list()
        return found[-1] if found else None

    def load_latest(self, map_location="cpu") -> Optional[Dict[str, Any]]:
        """The newest checkpoint that loads, or None when there is none."""
        first = self.latest_path()
        order = ([first] if first is not None else []) + [p for p in reversed(self.list()) if p != first]
        for path in order:
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception:  # a file from a crashed writer of an older version; try the previous one
                continue
        return None
