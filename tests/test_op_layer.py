"""The one op layer (omniret_kernels/_op.py) and the dispatch rule (omniret_kernels/_dispatch.py, docs/gpu.md)."""
import importlib
import warnings

import pytest
import torch

from omniret_kernels import _dispatch, _ext, _op, aswp_pool, reference
from omniret_kernels._checks import KernelLimitError

OP_MODULES = {op: importlib.import_module(f"omniret_kernels.{op}") for op in _ext.OPS}
needs_cpu = pytest.mark.skipif(not _ext.cpu_extension_built(), reason="omniret_kernels._C is not built")


@needs_cpu
@pytest.mark.parametrize("op", _ext.OPS)
@pytest.mark.parametrize("half", ["fwd", "bwd"])
def test_triton_op_has_the_cpp_schema(op, half):
    """The Python schema given to the Triton custom op is the C++ library's (csrc/ops.cpp)."""
    pair = OP_MODULES[op].OPS
    variants = pair.fwd if half == "fwd" else pair.bwd
    assert variants.native is not None and variants.triton is not None
    assert _op.schema_of(variants.triton) == _op.schema_of(variants.native)


@pytest.mark.parametrize("op", _ext.OPS)
def test_every_op_file_registers_through_define_pair(op):
    assert isinstance(OP_MODULES[op].OPS, _op.OpPair)


def test_reference_backend_keeps_float64():
    """The reference fallback once computed float64 input in float32."""
    g = torch.Generator().manual_seed(3)
    x, d, r = torch.randn(2, 9, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g,
                                                                                  dtype=torch.float64), None
    r = torch.randn(4, 11, generator=g, dtype=torch.float64)
    x = x * 1e-4 + 1.0  # projections that differ only past float32's precision
    out = aswp_pool(x, d, r, backend="reference")
    assert out.dtype == torch.float64
    assert torch.equal(out, reference.aswp_pool(x, d, r))
    assert _op.reference_dtype(torch.bfloat16) == torch.float32 and _op.reference_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("archs,capability,runs", [
    (("sm_80", "sm_90", "sm_90a"), (8, 0), True),
    (("sm_80", "sm_90", "sm_90a"), (8, 6), True),    # same major, newer minor: SASS runs
    (("sm_80", "sm_90", "sm_90a"), (7, 5), False),
    (("sm_80", "sm_90", "sm_90a"), (10, 0), False),  # no PTX: a newer GPU cannot JIT
    (("sm_80", "sm_90a", "compute_90"), (10, 0), True),  # +PTX on the newest arch
    (("sm_90a",), (9, 0), True),
    (("sm_90a",), (9, 1), False),                     # arch-specific code runs on exactly 9.0
    ((), (9, 0), False),
])
def test_built_archs_against_compute_capability(archs, capability, runs):
    assert _ext.arch_runs_on(archs, capability) is runs


def _fake_gpu(monkeypatch, capability, varlen=True, flash=False):
    """Pretend tensors on 'cuda' live on a GPU of this capability (the plan never launches anything)."""
    monkeypatch.setattr(_dispatch, "_capability", lambda device: capability)
    monkeypatch.setattr(_dispatch, "has_varlen_attn", lambda: varlen)
    monkeypatch.setattr(_dispatch, "has_flash_attn", lambda: flash)
    monkeypatch.setattr(_ext, "triton_importable", lambda: True)
    monkeypatch.setattr(_dispatch, "_WARNED", set())


@pytest.mark.skipif(not _ext.triton_importable(), reason="triton is not installed")
def test_plan_on_a_gpu(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0))
    cuda = torch.device("cuda")
    plan = lambda op, dtype, **sizes: _dispatch.plan(op, cuda, dtype, **sizes)  # noqa: E731
    assert plan("resampler_attention", torch.bfloat16, H=16, Hk=16, Nq=64, d=96) == ("varlen_attn", "triton",
                                                                                     "reference")
    assert plan("resampler_attention", torch.float32, H=16, Hk=16, Nq=64, d=96) == ("triton", "reference")
    assert plan("resampler_attention", torch.bfloat16, H=4, Hk=4, Nq=8, d=20) == ("triton", "reference")
    monkeypatch.setattr(_dispatch, "has_flash_attn", lambda: True)
    assert plan("resampler_attention", torch.float16, H=8, Hk=2, Nq=8, d=64)[:3] == ("varlen_attn", "flash_attn",
                                                                                     "triton")
    if _ext.cuda_extension_built():
        assert plan("aswp_pool", torch.float32, B=2, N=8, D=4, L=16, M=8) == ("cuda", "triton", "reference")
        assert plan("diversity_loss", torch.float32, B=2, N=64, D=16) == ("cuda", "triton", "reference")
        # beyond the Triton kernel's documented N limit: it is not a candidate
        assert plan("diversity_loss", torch.float32, B=2, N=4096, D=16) == ("cuda", "reference")


@pytest.mark.skipif(not _ext.cuda_extension_built(), reason="omniret_kernels._C_cuda was not built")
def test_cuda_kernel_not_built_for_the_gpu_is_skipped(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5))
    with pytest.warns(RuntimeWarning, match="no fast backend can run here .*compute capability 7.5"):
        assert _dispatch.plan("aswp_pool", torch.device("cuda"), torch.float32, B=1, N=2, D=2, L=2, M=2) == (
            "reference",)
    with pytest.raises(ValueError, match="none of which runs on compute capability 7.5"):
        _dispatch.plan("aswp_pool", torch.device("cuda"), torch.float32, "cuda")


@needs_cpu
def test_launch_failure_falls_back_with_one_warning(monkeypatch):
    """A backend that raises at launch hands over to the next one, with one warning; then it is skipped."""
    monkeypatch.setattr(_dispatch, "_FAILED", set())
    module = OP_MODULES["aswp_pool"]

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(module, "OPS", _op.OpPair(_op.Variants(broken, None), module.OPS.bwd))
    x, d, r = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64), torch.randn(
        4, 7, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' failed .*no kernel image.* using 'reference'"):
        out = aswp_pool(x, d, r)
    torch.testing.assert_close(out, reference.aswp_pool(x, d, r), rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither tries the broken backend nor warns again
        aswp_pool(x, d, r)
    with pytest.raises(RuntimeError, match="no kernel image"):  # an explicit backend is never replaced
        aswp_pool(x, d, r, backend="cpu")


def test_run_falls_back_on_kernel_limits_but_raises_input_errors(monkeypatch):
    monkeypatch.setattr(_dispatch, "_FAILED", set())
    cpu = torch.device("cpu")

    def limit(backend):
        if backend == "triton":
            raise KernelLimitError("d = 512 is beyond the kernel's 256")
        return backend

    with pytest.warns(RuntimeWarning, match="KernelLimitError"):
        assert _dispatch.run("aswp_pool", ("triton", "reference"), limit, device=cpu, dtype=torch.float32) == (
            "reference")

    def bad_input(backend):
        raise ValueError("m[1, 3] is a zero vector")

    with pytest.raises(ValueError, match="zero vector"):
        _dispatch.run("diversity_loss", ("cpu", "reference"), bad_input, device=cpu, dtype=torch.float32)
    with pytest.raises(KernelLimitError):  # the last backend has nobody to hand over to
        _dispatch.run("aswp_pool", ("triton",), limit, device=cpu, dtype=torch.float32)
