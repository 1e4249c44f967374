"""Shared timing and memory helpers for the benchmarks. Every goal is a ratio against a baseline timed in the same
run, on this machine; the tables printed at the end of the run are what the README quotes.

Run: `python -m pytest benchmarks -q -s` (or one file). Results are also written to benchmarks/results/<table>.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
_TABLES: dict[str, list[dict]] = defaultdict(list)


def median_time(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_seconds(m: int, k: int, n: int, *, dtype=torch.float32, repeat: int = 5) -> float:
    """Time of one (m, k) x (k, n) torch.matmul here: the floor for work that must do this GEMM."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    return median_time(lambda: torch.matmul(a, b, out=out), warmup=2, repeat=repeat)


def gemm_flops_per_second(*, size: int = 1024, dtype=torch.float32) -> float:
    """The GEMM rate measured now (a square GEMM), for FLOP-count floors."""
    return 2.0 * size**3 / gemm_seconds(size, size, size, dtype=dtype)


def timed_rss_probe(setup: str, run: str, limit_s: float | None = None):
    """(peak resident-memory growth in bytes, wall seconds) of `run` after `setup` (both Python source) in a fresh
    interpreter, or (None, None) when it does not finish within `limit_s` seconds (the process is killed).

    The peak (VmHWM) is reset after setup through /proc/self/clear_refs, so only what `run` adds counts: its
    temporaries, what autograd saves, and the gradients it allocates."""
    code = "\n".join([
        "import gc, json, time, torch",
        f"torch.set_num_threads({torch.get_num_threads()})",
        textwrap.dedent(setup).strip(),
        "def _rss(field):",
        "    for line in open('/proc/self/status'):",
        "        if line.startswith(field):",
        "            return int(line.split()[1]) * 1024",
        "gc.collect()",
        "_before = _rss('VmRSS:')",
        "with open('/proc/self/clear_refs', 'w') as _f:",
        "    _f.write('5')",
        "_t0 = time.perf_counter()",
        textwrap.dedent(run).strip(),
        "_dt = time.perf_counter() - _t0",
        "print(json.dumps({'growth': _rss('VmHWM:') - _before, 'seconds': _dt}))",
    ])
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=limit_s)
    except subprocess.TimeoutExpired:
        return None, None
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["growth"], result["seconds"]


def peak_rss_growth(setup: str, run: str) -> int:
    """Peak resident-memory growth in bytes of `run` after `setup` (see `timed_rss_probe`)."""
    return timed_rss_probe(setup, run)[0]


def record(table: str, **row) -> None:
    """Adds a row to a results table printed at the end of the run and saved to benchmarks/results/<table>.json."""
    _TABLES[table].append(row)


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def pytest_terminal_summary(terminalreporter):
    if not _TABLES:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    load = os.getloadavg()[0]
    for name, rows in _TABLES.items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        widths = [max(len(c), *(len(_format(r.get(c, ""))) for r in rows)) for c in columns]
        terminalreporter.write_sep("=", f"{name} (load average {load:.2f}, {torch.get_num_threads()} threads)")
        terminalreporter.write_line(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
        terminalreporter.write_line("-+-".join("-" * w for w in widths))
        for row in rows:
            terminalreporter.write_line(" | ".join(_format(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"load_average": load, "rows": rows}, indent=2))


@pytest.fixture
def bench_record():
    return record
