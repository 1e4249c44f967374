"""The CMake build works: it compiles the operator library against libtorch and the C++ unit tests of the shared
header math, and ctest passes (the header tests, and the embedded library's ops seen through the dispatcher)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    env = {**os.environ, "PYTHON": sys.executable}
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, env=env,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, env=env)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    tests = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True,
                           text=True, env=env)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert "test_ops_dispatch" in tests.stdout
    # every csrc/tests/test_*.cpp ran as its own test
    for source in (ROOT / "csrc" / "tests").glob("test_*.cpp"):
        assert source.stem in tests.stdout, f"{source.name} did not run under ctest"
