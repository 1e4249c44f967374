"""The foundation: the extensions are built and loaded, every op is registered per device, and the one backend
rule picks kernels or says clearly why it cannot."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

import omniret_kernels
from omniret_kernels import _dispatch, _ext

CUDA_TORCH = torch.version.cuda is not None
NVCC = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def test_cpu_extension_is_built_and_loaded():
    assert _ext.cpu_extension_built(), _ext.cpu_extension_error()
    assert "cpu" in omniret_kernels.available_backends()


@pytest.mark.parametrize("op", _ext.OPS)
@pytest.mark.parametrize("half", ["fwd", "bwd"])
def test_every_op_has_a_cpu_kernel(op, half):
    assert _ext.has_kernel(f"{op}_{half}", "CPU"), f"omniret::{op}_{half} has no CPU kernel"


@pytest.mark.skipif(not (CUDA_TORCH and NVCC and os.environ.get("OMNIRET_BUILD_CUDA") != "0"),
                    reason="the CUDA extension is built only with a CUDA torch and nvcc")
def test_cuda_extension_is_compiled_with_a_cuda_torch():
    assert _ext.cuda_extension_built(), "torch has CUDA and nvcc exists, but omniret_kernels._C_cuda is missing"
    assert _ext.has_kernel("aswp_pool_fwd", "CUDA") and _ext.has_kernel("aswp_pool_bwd", "CUDA")
    listed = omniret_kernels.available_backends()
    assert ("cuda" in listed) if torch.cuda.is_available() else ("cuda (compiled, no device)" in listed)
    # asking the CUDA backend to work on CPU tensors is a clear error, not a crash
    x, directions, references = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        omniret_kernels.aswp_pool(x, directions, references, backend="cuda")


def test_available_backends_from_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import omniret_kernels; print(omniret_kernels.available_backends())"],
                         capture_output=True, text=True, check=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    listed = out.stdout
    assert "'cpu'" in listed and "'reference'" in listed
    if _ext.triton_importable():
        assert "triton" in listed


def test_default_backend_on_cpu_tensors_is_the_cpu_kernel():
    for op in _ext.OPS:
        assert _dispatch.resolve_backend(op, torch.device("cpu")) == "cpu"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve_backend("aswp_pool", torch.device("cpu"), "tpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.resolve_backend("aswp_pool", torch.device("cpu"), "triton")


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _dispatch.resolve_backend("diversity_loss", torch.device("cpu"), "cuda")


def test_missing_kernel_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: False)
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="no CPU kernel"):
        assert _dispatch.resolve_backend("aswp_pool", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="no CPU kernel"):  # an explicit request is never silently replaced
        _dispatch.resolve_backend("aswp_pool", torch.device("cpu"), "cpu")


def test_tensors_on_two_devices_are_rejected():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="one device"):
        omniret_kernels.aswp_pool(x, torch.randn(5, 4, device="meta"), torch.randn(3, 5))
