"""Shared timing and memory helpers for the benchmarks. Every goal is a ratio against a baseline timed in the same
run, on this machine; the tables printed at the end of the run are what the README quotes.

Run: `python -m pytest benchmarks -q -s --benchmark-only` (or one file). Results are also written to
benchmarks/results/<table>.json. The op benchmarks follow the device: on a machine with a GPU they time the CUDA
paths (the backend the dispatch rule picks) on CUDA tensors against the same baselines; without one, the CPU
kernels. Goals measured their own way (interleaved ratios, memory probes, training runs) are wrapped in `goal`,
so that `--benchmark-only` runs them too.
"""
from __future__ import annotations

import functools
import inspect
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

# The device the op benchmarks run on, the backend they ask for there (None: the dispatch rule's pick, i.e. the
# CUDA path), and their dtype (bfloat16 on a GPU, where the flash kernels and tensor cores take it).
# OMNIRET_BENCH_DEVICE=cpu forces the CPU (the host-memory probes run in subprocesses with it).
DEVICE = torch.device(os.environ.get("OMNIRET_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
OP_BACKEND = None if ON_GPU else "cpu"
OP_DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def synchronize() -> None:
    """Waits for the GPU's queued work (a no-op on CPU), so that wall times cover the kernels themselves."""
    if ON_GPU:
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """fn followed by a GPU synchronize, for timers that do not synchronize themselves (benchmark.pedantic)."""
    def run():
        fn()
        synchronize()
    return run


def median_time(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls (GPU work included)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_seconds(m: int, k: int, n: int, *, dtype=torch.float32, repeat: int = 5, device=DEVICE) -> float:
    """Time of one (m, k) x (k, n) torch.matmul here: the floor for work that must do this GEMM."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    return median_time(lambda: torch.matmul(a, b, out=out), warmup=2, repeat=repeat)


def gemm_flops_per_second(*, size: int = 1024, dtype=torch.float32, device=DEVICE) -> float:
    """The GEMM rate measured now (a square GEMM; 4096 on a GPU), for FLOP-count floors."""
    size = 4096 if torch.device(device).type == "cuda" else size
    return 2.0 * size**3 / gemm_seconds(size, size, size, dtype=dtype, device=device)


def goal(test):
    """Decorates a benchmark test whose goal is measured its own way (interleaved ratios, a memory probe, a whole
    training step): the test body runs once as the one round of the `benchmark` fixture.

    pytest-benchmark's `--benchmark-only` skips every test that does not take the `benchmark` fixture; with this the
    test takes it (the wrapper's signature adds it), so `pytest benchmarks/ --benchmark-only` runs every goal, and
    the benchmark table lists the measurement's duration. What the goal measures is recorded by the test itself."""
    signature = inspect.signature(test)
    if "benchmark" in signature.parameters:
        raise TypeError(f"{test.__name__} takes the benchmark fixture already; `goal` is for tests that do not")

    @functools.wraps(test)
    def wrapper(*args, benchmark, **kwargs):
        return benchmark.pedantic(lambda: test(*args, **kwargs), rounds=1, iterations=1, warmup_rounds=0)

    extra = inspect.Parameter("benchmark", inspect.Parameter.KEYWORD_ONLY)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return wrapper


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
        where = torch.cuda.get_device_name() if ON_GPU else f"CPU, {torch.get_num_threads()} threads"
        terminalreporter.write_sep("=", f"{name} ({where}, load average {load:.2f})")
        terminalreporter.write_line(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
        terminalreporter.write_line("-+-".join("-" * w for w in widths))
        for row in rows:
            terminalreporter.write_line(" | ".join(_format(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"device": str(DEVICE), "load_average": load,
                                                               "rows": rows}, indent=2))


@pytest.fixture
def bench_record():
    return record
