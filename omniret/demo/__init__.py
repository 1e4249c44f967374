"""The main job, `omniret demo`: a benchmark written as M-BEIR-format files, trained by the one `Trainer`,
evaluated, indexed. real_demo.py: the real-media benchmark with frozen pretrained encoders and the dual-encoder
baseline (the default); digits_demo.py: the digits fixture; ablations.py: variants x seeds on the real benchmark.
omniret/commands/demo.py is the command line; docs/real_benchmark.md and docs/demo.md the details."""
from __future__ import annotations

import functools
import os


def holds_output_lock(run):
    """A demo's entry point, `run(opts, ...)`, holds the lock of its output folder (omniret.files.RunLock) while
    it writes there: a second demo started on the same folder stops at once with RunLockedError naming the first's
    PID, instead of the two overwriting each other's model, index and results.json."""

    @functools.wraps(run)
    def locked(opts, *args, **kwargs):
        from omniret.files import RunLock

        with RunLock(opts.output):
            return run(opts, *args, **kwargs)

    return locked


def start_run(steps: int, threads, output: str, log=print) -> int:
    """What every demo run does first: check the step count, set the thread count (omniret/threads.py) and say
    it, make the output folder. Returns the thread count."""
    from omniret.threads import apply_threads

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = apply_threads(threads)
    log(f"torch threads: {n} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    os.makedirs(output, exist_ok=True)
    return n
