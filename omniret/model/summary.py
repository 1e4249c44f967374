"""Parameter counts per part of the model, frozen vs trainable, built on the meta device (no weights needed)."""
from __future__ import annotations

import copy

import torch

from omniret.config import OmniRetConfig

__all__ = ["parameter_table", "build_on_meta", "format_table"]

PARTS = (
    ("image encoder", "encoders.image."),
    ("audio encoder", "encoders.audio."),
    ("projectors", "projectors."),
    ("media resampler", "media_resampler."),
    ("LLM (base weights)", "composer.llm."),
    ("LoRA", None),
    ("hidden-state resampler", "head.hidden_state_resampler."),
    ("ASWP pooling", "head.pool."),
)


def build_on_meta(cfg: OmniRetConfig, stage: int = 2):
    """The model with every backbone built from its `arch` on the meta device: shapes only, no memory."""
    from omniret.model import OmniRet

    cfg = copy.deepcopy(cfg)
    for bb in (cfg.image_encoder, cfg.audio_encoder, cfg.llm):
        if bb is not None:
            bb.path = None
    cfg.tokenizer = "byte"  # the tokenizer adds no parameters
    cfg.lora = False
    with torch.device("meta"):
        model = OmniRet(cfg)
        model.setup_stage(stage)
    return model


def parameter_table(model) -> list:
    """[(part, total, trainable)] over the model's parameters, then a ("total", ...) row."""
    rows = {name: [0, 0] for name, _ in PARTS}
    other = [0, 0]
    for name, p in model.named_parameters():
        if "lora_" in name:
            part = "LoRA"
        else:
            part = next((label for label, prefix in PARTS if prefix and name.startswith(prefix)), None)
        slot = rows[part] if part is not None else other
        slot[0] += p.numel()
        slot[1] += p.numel() if p.requires_grad else 0
    out = [(name, t, tr) for name, (t, tr) in rows.items() if t]
    if other[0]:
        out.append(("other head parameters", other[0], other[1]))
    out.append(("total", sum(r[1] for r in out), sum(r[2] for r in out)))
    return out


def format_table(rows: list) -> str:
    lines = [f"{'part':<24}{'parameters':>16}{'trainable':>16}{'frozen':>16}"]
    for name, total, trainable in rows:
        if name == "total":
            lines.append("-" * 72)
        lines.append(f"{name:<24}{total:>16,}{trainable:>16,}{total - trainable:>16,}")
    return "\n".join(lines)
