"""`python -m omniret_kernels.check`, the user's check of their machine: it runs here and fails when a backend is
wrong. (~20 s each on the 2-core CI machine: one interpreter start with torch, small shapes.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omniret_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _ext.cpu_extension_built(), reason="omniret_kernels._C is not built")


def _run(args, code=None):
    # TRITON_INTERPRET=0: on CPU the check runs the CPU kernels (the interpreter would be slow, and is tested apart)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "omniret_kernels.check", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_check_runs_and_prints_its_tables():
    out = _run(["--repeat", "1"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "device: " in text and "torch 2." in text
    assert "backend plan per op and dtype" in text
    for op in ("aswp_pool", "resampler_attention", "diversity_loss"):
        assert f"{op}  " in text or f"{op} |" in text
    rows = [line for line in text.splitlines() if line.count("|") >= 5 and " cpu " in line and " ok " in line]
    assert len(rows) >= 3 * 5  # five small cases x three dtypes on the CPU kernel
    assert "padded SDPA" in text and "x floor" in text and "eager reference" in text
    assert "all checks passed" in text


BROKEN = """
import sys, torch
import importlib
module = importlib.import_module("omniret_kernels.aswp_pool")
from omniret_kernels import _op
native = module.OPS.fwd.native

def off_by_a_bit(*args):
    out, s, t = native(*args)
    return out * 1.001, s, t  # wrong in the 4th digit: a float32 error of 1e-3 relative

module.OPS = _op.OpPair(_op.Variants(off_by_a_bit, module.OPS.fwd.triton), module.OPS.bwd)
from omniret_kernels.check import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_wrong_backend_makes_it_fail():
    out = _run(["--ops", "aswp_pool", "--no-timing"], code=BROKEN)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    failing = [line for line in out.stdout.splitlines() if "FAIL" in line and "aswp_pool" in line]
    assert any(" fp32 " in line for line in failing) and any(" fp64 " in line for line in failing)
    assert "FAILED" in out.stdout
