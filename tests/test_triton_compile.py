"""Every Triton kernel the launchers use, compiled for sm_80 and sm_90 through Triton's real compile chain (a mock
driver target, no GPU, no launch) at the paper's shapes, in float32 (tf32) and bfloat16: 0 spill bytes, shared
memory within the target's opt-in limit, and mma/wgmma in every kernel that has a matmul. Prints the table
(docs/triton_compile.md holds a copy). Plus the rules behind it, checked without compiling."""
import pytest
import torch

from omniret_kernels import _ext

needs_triton = pytest.mark.skipif(not _ext.triton_importable(), reason="triton not installed")


@pytest.fixture(scope="module")
def rows():
    from omniret_kernels.compile_check import compile_rows
    return compile_rows()


@needs_triton
def test_every_kernel_compiles_without_spills_within_smem_and_on_tensor_cores(rows):
    from omniret_kernels.compile_check import ARCHS, CASES, DTYPES, format_table
    print("\n" + format_table(rows))
    launches = sum(1 for dtype in DTYPES for cases in CASES for _ in cases(dtype))
    assert len(rows) == launches * len(ARCHS)  # every launch site compiled once per arch and dtype
    assert {r.arch for r in rows} == set(ARCHS)
    bad = [f"{r.kernel} sm_{r.arch} {r.dtype}: {'; '.join(r.problems())}" for r in rows if r.problems()]
    assert not bad, "\n".join(bad)
    assert all(r.regs > 0 for r in rows)
    matmul = [r for r in rows if r.has_matmul]
    assert {r.kernel.split()[0] for r in matmul} == {"aswp_pool", "resampler_attention", "diversity_loss"}
    assert all(r.mma for r in matmul)


def test_row_rules_catch_each_problem():
    from omniret_kernels.compile_check import KernelRow
    ok = KernelRow("k", 80, "bfloat16", 128, 166_912, 0, 0, "mma", True, 4, 3)
    assert ok.problems() == []
    assert "spill" in KernelRow(**{**ok.__dict__, "spill_bytes": 8}).problems()[0]
    assert "opt-in limit" in KernelRow(**{**ok.__dict__, "smem": 166_913}).problems()[0]
    assert KernelRow(**{**ok.__dict__, "arch": 90, "smem": 232_448}).problems() == []
    assert "mma" in KernelRow(**{**ok.__dict__, "mma": ""}).problems()[0]
    assert KernelRow(**{**ok.__dict__, "mma": "", "has_matmul": False}).problems() == []


def test_ptxas_log_and_ptx_parsing():
    from omniret_kernels.compile_check import _mma_kind, _ptxas_resources
    log = ("ptxas info    : Compiling entry function 'a_kernel' for 'sm_80'\n"
           "ptxas info    : Function properties for a_kernel\n"
           "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 416 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function 'b_kernel' for 'sm_80'\n"
           "ptxas info    : Function properties for b_kernel\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]\n")
    assert _ptxas_resources(log) == {"a_kernel": (255, 28, 24), "b_kernel": (40, 0, 0)}
    assert _mma_kind("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {") == "wgmma"
    assert _mma_kind("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {") == "mma"
    assert _mma_kind("\tfma.rn.f32 %f1, %f2, %f3, %f4;") == ""


@needs_triton
def test_dot_precision_rule():
    import triton.language as tl

    from omniret_kernels.triton._precision import dot_precision
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32).input_precision == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32)[:3] == (tl.float32, "tf32", tl.float32)
        assert dot_precision(torch.float64)[:3] == (tl.float64, "ieee", tl.float64)
        # compiled kernels keep bfloat16 operands; the interpreter (this process) widens them to float32
        assert dot_precision(torch.bfloat16).operand == (tl.float32 if _ext.triton_interpreting() else tl.bfloat16)
        assert dot_precision(torch.bfloat16).acc == tl.float32
    finally:
        torch.set_float32_matmul_precision(before)


@needs_triton
def test_launch_fitting_raises_before_launch_when_no_config_fits(monkeypatch):
    from types import SimpleNamespace

    from omniret_kernels.triton import _launch
    launched = []

    class FakeKernel:
        def warmup(self, *args, grid, **kwargs):
            return SimpleNamespace(metadata=SimpleNamespace(shared=300_000 if kwargs["BLOCK"] == 64 else 40_000))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["BLOCK"])

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = [_launch.Config((("BLOCK", 64),), 4, 3), _launch.Config((("BLOCK", 32),), 4, 3)]
    cpu = torch.device("cpu")  # not CUDA and no compile-check target: the sm_80 limit
    assert _launch.launch_fitting(FakeKernel(), (1,), (), {}, configs, cpu, "op").constexprs == (("BLOCK", 32),)
    assert launched == [32]
    with pytest.raises(ValueError, match="166912 B opt-in limit; the smallest config needs 300000 B"):
        _launch.launch_fitting(FakeKernel(), (1,), (), {}, configs[:1], cpu, "op")
    assert launched == [32]


@needs_triton
def test_diversity_beyond_max_n_is_a_value_error():
    from omniret_kernels.triton.diversity_loss import MAX_N, _configs
    _configs(MAX_N, 64, torch.float32)
    with pytest.raises(ValueError, match=f"N <= {MAX_N}, got N = {MAX_N + 1}"):
        _configs(MAX_N + 1, 64, torch.float32)
