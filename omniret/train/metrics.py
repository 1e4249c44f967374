"""A run's metrics: one JSON line per logged optimizer step in `metrics.jsonl`, and TensorBoard scalars."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from omniret.files import append_jsonl, atomic_write_text, dumps_lines, read_jsonl_log

__all__ = ["MetricsLog"]


class MetricsLog:
    """metrics.jsonl + TensorBoard, both optional (`directory` None or `enabled` False: neither)."""

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
