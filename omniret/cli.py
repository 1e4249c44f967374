"""The `omniret` command line: a thin dispatcher; each subcommand lives in omniret/commands/<name>.py and
defines `add_arguments(parser)` and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "demo": "build the offline tri-modal benchmark, train, evaluate and index it",
    "train": "train a model from a config file",
    "eval": "evaluate on M-BEIR-format data (Recall@k per task)",
    "encode": "embed queries or a corpus to a file",
    "index": "build a FAISS index over a corpus",
    "search": "search an index with a query in any modality mix",
    "info": "print a preset's parameter table (frozen vs trainable)",
}


def _load(name: str):
    return importlib.import_module(f"omniret.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniret", description="OmniRet omni-modal retrieval")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:  # import only the command that runs: some pull in heavy libraries
            try:
                _load(name).add_arguments(p)
            except ModuleNotFoundError as exc:
                if exc.name != f"omniret.commands.{name}":
                    raise
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    try:
        module = _load(args.command)
    except ModuleNotFoundError as exc:
        if exc.name == f"omniret.commands.{args.command}":
            print(f"omniret {args.command}: not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        # bad input (our checks raise ValueError naming the flag or field) or a diverged run: one line, no traceback
        # (OMNIRET_DEBUG=1 shows it)
        if os.environ.get("OMNIRET_DEBUG"):
            raise
        print(f"omniret {args.command}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, FloatingPointError) else 2


if __name__ == "__main__":
    sys.exit(main())
