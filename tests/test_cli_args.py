"""Counts and sizes on the command line are checked while parsing: a bad value is one argparse error (exit 2)
naming the flag, before any model or data loads."""
import pytest

from omniret.cli import build_parser, main
from omniret.commands._args import nonnegative_int, positive_float, positive_int

REQUIRED = {
    "demo": ["--output", "out"],
    "search": ["--index", "idx", "--text", "seven"],
    "index": ["--model", "m", "--corpus", "c.jsonl", "--output", "o"],
    "encode": ["--model", "m", "--input", "i.jsonl", "--output", "o.npz"],
    "eval": ["--model", "m", "--data", "d"],
}

BAD = [
    ("search", "-k", "0", "must be >= 1"), ("search", "--nprobe", "-2", "must be >= 1"),
    ("search", "--ef-search", "x", "expected an integer"),
    ("index", "--nlist", "0", "must be >= 1"), ("index", "--hnsw-m", "0", "must be >= 1"),
    ("index", "--batch-size", "0", "must be >= 1"), ("encode", "--batch-size", "-1", "must be >= 1"),
    ("eval", "--batch-size", "0", "must be >= 1"),
    ("demo", "--steps", "0", "must be >= 1"), ("demo", "--per-task", "0", "must be >= 1"),
    ("demo", "--chunk-size", "0", "must be >= 1"), ("demo", "--keep-graphs", "-1", "must be >= 0"),
    ("demo", "--tower-warmup-epochs", "-3", "must be >= 0"), ("demo", "--threads", "0", "must be >= 1"),
    ("demo", "--max-eval-queries", "0", "must be >= 1"), ("demo", "--time-budget", "0", "must be > 0"),
    ("demo", "--time-budget", "nan", "must be > 0"), ("demo", "--time-budget", "inf", "must be > 0"),
]


@pytest.mark.parametrize("command,flag,value,message", BAD, ids=lambda v: str(v))
def test_bad_count_is_a_parse_error_naming_the_flag(command, flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, *REQUIRED[command], flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"omniret {command}: error: argument {flag}" in err and message in err


def test_good_counts_parse():
    args = build_parser("demo").parse_args(["demo", "--output", "o", "--keep-graphs", "0", "--steps", "3",
                                            "--time-budget", "1.5", "--tower-warmup-epochs", "0"])
    assert (args.keep_graphs, args.steps, args.time_budget, args.tower_warmup_epochs) == (0, 3, 1.5, 0)
    args = build_parser("search").parse_args(["search", "--index", "i", "-k", "1"])
    assert args.k == 1
    assert positive_int("7") == 7 and nonnegative_int("0") == 0 and positive_float("2e-3") == 2e-3
