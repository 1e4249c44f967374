"""`omniret info --preset paper`: the parameter table of a preset, frozen vs trainable per part, built on the
meta device (no weights, no download)."""
from __future__ import annotations

import argparse
import json

PAPER_TRAINABLE = 84_000_000  # "~84M trainable parameters in total" (section 5.1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omniret.config import PRESETS

    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--config", default=None, help="an OmniRetConfig JSON file instead of a preset")
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2),
                        help="1: warm-up (no LoRA); 2: fine-tuning (LoRA in the LLM)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args) -> int:
    import warnings

    from omniret.config import OmniRetConfig, preset
    from omniret.model.summary import build_on_meta, format_table, parameter_table

    cfg = OmniRetConfig.from_json(args.config) if args.config else preset(args.preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_on_meta(cfg, stage=args.stage)
    rows = parameter_table(model)
    if args.json:
        print(json.dumps([{"part": n, "parameters": t, "trainable": tr} for n, t, tr in rows], indent=2))
        return 0
    name = args.config or args.preset
    print(f"OmniRet {name}, stage {args.stage} (built on the meta device)")
    print(format_table(rows))
    trainable = rows[-1][2]
    if cfg.preset == "paper" and args.config is None:
        print()
        print(f"trainable: {trainable / 1e6:.1f}M here vs ~{PAPER_TRAINABLE / 1e6:.0f}M reported in the paper.")
        print(_paper_difference_note(cfg))
    return 0


def _paper_difference_note(cfg) -> str:
    return (
        "The paper gives the total only; the sizes it leaves open are our choices: one cross-attention + MLP\n"
        f"block (MLP x{cfg.resampler_mlp_mult}) in the media resampler and in the S = {cfg.output_latents} output "
        f"resampler, {cfg.media_latents} media latents,\n"
        f"{cfg.projector} projectors, and LoRA on {cfg.lora_target_modules!r} layers of the LLM (LoRA on the "
        "attention projections only\nwould be ~2M instead of ~18M). ASWP (L = 4096 directions x D = 1536, plus "
        "128 x 4096 references) is fixed by the paper."
    )
