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
    except (ValueError, OSError, FloatingPointError) as exc:
        # expected failures, one line and no traceback (OMNIRET_DEBUG=1 shows it): bad input (ValueError, with
        # InputError for files and configs, naming the flag, field or file), the file system (a missing,
        # unreadable or non-image file, a directory given as a file, permissions, a full disk: OSError), or a
        # diverged run (FloatingPointError). Anything else is a bug and keeps its traceback.
        if os.environ.get("OMNIRET_DEBUG"):
            raise
        print(f"omniret {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 1 if isinstance(exc, FloatingPointError) else 2


def describe(exc: BaseException) -> str:
    """OSErrors as "<what went wrong>: <file>"; ValueErrors as written (a validator's report lists its problems
    a line each); anything else by its first line."""
    if isinstance(exc, OSError) and exc.strerror:
        files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{exc.strerror}: {files}" if files else exc.strerror
    text = str(exc).strip()
    if isinstance(exc, ValueError):
        return text or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
