"""argparse types for counts and sizes: a bad value stops the command at parsing, before a model or data loads,
with argparse's usual `omniret <command>: error: argument -k: ...` and exit status 2."""
from __future__ import annotations

import argparse
import math


def _parse(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _parse(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _parse(text, float)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def probability(text: str) -> float:
    value = _parse(text, float)
    if not 0.0 <= value <= 1.0:  # also catches nan
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value
