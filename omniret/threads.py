"""CPU threads for training and evaluation: how many, and how they wait.

What slowed the demo's warm-up 16-29x on a busy machine: torch's CPU kernels run each parallel region on an
OpenMP team of `torch.get_num_threads()` threads, and the region ends at a barrier. GNU OpenMP's default is to
*spin* at that barrier for a while before sleeping. When the machine has more runnable threads than cores, the
scheduler takes one team member off its core for a time slice while its sibling spins, burning the slice the
descheduled member needs; a model of many small ops (the demo's) loses a slice per op. Measured (docs/demo.md,
one audio warm-up epoch of 2490 clips, each run beside `yes > /dev/null` on a 2-core machine shared with other
jobs, load average 9-12): 2 threads spinning 238 s, 1 thread 25.5 s, 2 threads with OMP_WAIT_POLICY=PASSIVE
(sleep at once) 15.7 s.

So the command line sets OMP_WAIT_POLICY=PASSIVE (unless the user set it) before torch is imported, and keeps
the thread count at the cores this process may use. The count is not chosen from the load: torch's kernels sum
in a different order with a different team size, so 1 and 2 threads give results that differ in the last bits
and drift apart over a run; a seeded run must compute the same whatever else the machine is doing.
"""
from __future__ import annotations

import os
import sys

__all__ = ["available_cores", "passive_openmp", "apply_threads"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def passive_openmp() -> bool:
    """OpenMP threads sleep at once when they wait (OMP_WAIT_POLICY=PASSIVE), unless the environment says
    otherwise. Only effective before torch (and its OpenMP runtime) is loaded; returns whether it was."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count: `threads` when given (>= 1), else the available cores. Returns it."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    n = available_cores() if threads is None else int(threads)
    torch.set_num_threads(n)
    return n
