"""Compile every Triton kernel the launchers use, for sm_80 and sm_90, without a GPU, and report its resources.

Triton's real compile chain runs (TTIR -> TTGIR -> LLIR -> PTX -> ptxas cubin) against a mock driver whose
get_current_target() is GPUTarget("cuda", arch, 32); the launchers themselves are called on "meta" tensors with
JITFunction.run forced to warmup=True, so exactly the kernels, constexprs and launch options they would use are
compiled and nothing is launched. Per kernel this collects the registers, spill bytes and stack frame (from the
`ptxas -v` log of Triton's own ptxas run, which is captured), the shared memory (`metadata.shared`), and whether
the PTX holds tensor-core instructions (`mma` / `wgmma`).

    python -m omniret_kernels.compile_check      # prints the table; exits 1 if a row breaks a rule

`compile_rows()` returns the rows (the check tool and tests/test_triton_compile.py call it). TRITON_INTERPRET
must not be set in the process that calls it (the kernels would be interpreter functions), so `compile_rows`
re-runs itself in a subprocess when it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Iterator, Optional

import torch

# Shared memory per block a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
from omniret_kernels.triton._launch import SMEM_OPTIN_BY_ARCH as SMEM_OPTIN_LIMIT  # noqa: E402
ARCHS = (80, 90)
DTYPES = (torch.float32, torch.bfloat16)


@dataclasses.dataclass
class KernelRow:
    kernel: str  # the launch site, e.g. "resampler_attention media: bwd"
    arch: int
    dtype: str
    regs: int
    smem: int  # bytes, static + dynamic, as the launch requests it
    spill_bytes: int  # spill stores + loads, as ptxas -v reports them
    stack: int  # bytes of stack frame per thread
    mma: str  # "wgmma", "mma" or "" (no tensor-core instruction in the PTX)
    has_matmul: bool  # the kernel's TTIR holds a tt.dot (helpers inlined)
    num_warps: int
    num_stages: int

    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} spill bytes")
        if self.smem > SMEM_OPTIN_LIMIT[self.arch]:
            out.append(f"smem {self.smem} B > opt-in limit {SMEM_OPTIN_LIMIT[self.arch]} B")
        if self.has_matmul and not self.mma:
            out.append("matmul kernel without mma/wgmma")
        return out


class _MockCudaDriver:
    """The part of Triton's CUDA driver that compiling (not launching) touches, for a GPU that is not here.

    The device index is the arch, so JITFunction's per-device caches (binder, target, compiled kernels) keep the
    two targets apart."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device):
        return 0

    def get_device_capability(self, device):
        return divmod(self.arch, 10)

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


_target_arch: Optional[int] = None


def target_arch() -> Optional[int]:
    """The arch the compile check is compiling for (launchers size their blocks from its opt-in limit), or None."""
    return _target_arch


@contextlib.contextmanager
def _compile_only(arch: int, compiled: list, log: io.StringIO) -> Iterator[None]:
    """Point Triton at the mock target and turn every launch into a compile; compiled kernels are appended."""
    global _target_arch
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:  # a launch (the launchers' own warmup compiles, which pick the config, are not)
            compiled.append((self, kernel))
        return kernel

    driver.set_active(_MockCudaDriver(arch))
    JITFunction.run = run
    _target_arch = arch
    # Always compile (an on-disk cache hit would skip ptxas) and print ptxas -v's log, which `log` collects.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        try:
            yield
        finally:
            _target_arch = None
            JITFunction.run = original_run
            driver.reset_active() if driver._default is not None else driver.set_active(None)


def _ptxas_resources(log: str) -> dict[str, tuple[int, int, int]]:
    """{kernel name: (registers, spill bytes, stack bytes)} from the `ptxas -v` log of Triton's own compile."""
    out = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        name = re.search(r"Compiling entry function '(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        if not (name and regs):
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        stack = re.search(r"(\d+) bytes stack frame", block)
        out[name.group(1)] = (int(regs.group(1)), int(spill.group(1)) + int(spill.group(2)), int(stack.group(1)))
    return out


def _dtype_label(dtype: torch.dtype, fp32_precision: str) -> str:
    if dtype == torch.float32:
        return "float32 (ieee)" if fp32_precision == "highest" else "float32 (tf32)"
    return str(dtype).removeprefix("torch.")


def _mma_kind(ptx: str) -> str:
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# The paper's shapes, through the launchers. Each case calls forward and backward launchers on meta tensors.


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _aswp_cases(dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from omniret_kernels.triton import aswp_pool
    B, N, M, D, L = 8, 128, 128, 1536, 4096
    x, dirs, refs = _meta(B, N, D, dtype=dtype), _meta(L, D, dtype=dtype), _meta(M, L, dtype=dtype)

    def fwd():
        aswp_pool.aswp_pool_forward(x, dirs, refs, None, None, "stm", True, 0.1)

    def bwd():
        sorted_values = _meta(B, N, L, dtype=torch.float32)
        tokens = _meta(B, N, L, dtype=torch.uint8)
        aswp_pool.aswp_pool_backward(_meta(B, L, dtype=dtype), x, dirs, refs, None, None, sorted_values, tokens,
                                     "stm", True, 0.1, True, True)
    yield "aswp_pool B8 N=M128 D1536 L4096: fwd", fwd
    yield "aswp_pool B8 N=M128 D1536 L4096: bwd", bwd


def _resampler_cases(dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from omniret_kernels.triton import resampler_attention
    shapes = {"media d96 Nq64 H16": (96, 64, 16, 16), "output d128 Nq128 H16/Hk4": (128, 128, 16, 4)}
    B, T = 8, 8 * 700
    for name, (d, Nq, H, Hk) in shapes.items():
        q, k, v = _meta(B, H, Nq, d, dtype=dtype), _meta(T, Hk, d, dtype=dtype), _meta(T, Hk, d, dtype=dtype)
        cu = _meta(B + 1, dtype=torch.int32)

        def fwd(q=q, k=k, v=v, cu=cu, d=d):
            resampler_attention.forward(q, k, v, cu, d ** -0.5)

        def bwd(q=q, k=k, v=v, cu=cu, d=d):
            lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            lse = _meta(*q.shape[:3], dtype=lse_dtype)
            resampler_attention.backward(torch.empty_like(q), q, k, v, torch.empty_like(q), lse, cu, d ** -0.5)
        yield f"resampler_attention {name}: fwd", fwd
        yield f"resampler_attention {name}: bwd", bwd


def _diversity_cases(dtype) -> Iterator[tuple[str, Callable[[], None]]]:
    from omniret_kernels.triton import diversity_loss
    B, N, D = 8, 64, 1536
    m, seed = _meta(B, N, D, dtype=dtype), _meta(1, dtype=torch.int64)
    threshold = int(0.1 * 2 ** 32)
    yield "diversity_loss B8 N64 D1536: fwd", lambda: diversity_loss.diversity_loss_forward(
        m, seed, threshold, 0.1, 0.5, True)
    yield "diversity_loss B8 N64 D1536: bwd", lambda: diversity_loss.diversity_loss_backward(
        _meta((), dtype=dtype), m, seed, threshold, 0.1, 0.5, True)
    if dtype == DTYPES[0]:  # the keep mask does not depend on m's dtype
        yield "diversity_keep_mask B8 N64", lambda: diversity_loss.diversity_keep_mask(seed, B, N, threshold)


CASES = (_aswp_cases, _resampler_cases, _diversity_cases)


@contextlib.contextmanager
def _matmul_precision(dtype: torch.dtype, fp32_precision: str = "high") -> Iterator[None]:
    """float32 compiles with torch's "high" matmul precision by default: the tf32 tensor-core kernels users get
    when they allow tf32 (under "highest" the same launchers compile ieee FMA loops; --json can ask for them)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_precision if dtype == torch.float32 else before)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _compile_rows_here(archs, dtypes, verbose=False, only=(), fp32_precision="high") -> list[KernelRow]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile check: TRITON_INTERPRET is set, so the kernels are interpreter functions")
    rows: list[KernelRow] = []
    resources: dict[tuple[int, str], tuple[int, int, int]] = {}  # (arch, kernel hash) -> ptxas numbers
    for arch in archs:
        for dtype in dtypes:
            for cases in CASES:
                for name, launch in cases(dtype):
                    if only and not any(part in name for part in only):
                        continue
                    compiled: list = []
                    log = io.StringIO()
                    started = time.perf_counter()
                    with _compile_only(arch, compiled, log), _matmul_precision(dtype, fp32_precision):
                        launch()
                    fresh = _ptxas_resources(log.getvalue())
                    if verbose:
                        print(f"compiled sm_{arch} {dtype} {name} in {time.perf_counter() - started:.1f} s",
                              file=sys.stderr, flush=True)
                    if not compiled:
                        raise RuntimeError(f"compile check: {name} launched no Triton kernel")
                    for fn, kernel in compiled:
                        key = (arch, kernel.hash)
                        if key not in resources:  # compiled by this launch (else an earlier one did)
                            resources[key] = fresh[kernel.metadata.name]
                        regs, spills, stack = resources[key]
                        label = name if len(compiled) == 1 else f"{name} [{fn.fn.__name__}]"
                        rows.append(KernelRow(
                            kernel=label, arch=arch, dtype=_dtype_label(dtype, fp32_precision), regs=regs,
                            smem=kernel.metadata.shared, spill_bytes=spills, stack=stack,
                            mma=_mma_kind(kernel.asm["ptx"]), has_matmul="tt.dot" in kernel.asm["ttir"],
                            num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages))
    return rows


def compile_rows(archs=ARCHS, dtypes=DTYPES) -> list[KernelRow]:
    """Compile the launchers' kernels for each arch and dtype; one KernelRow per launched kernel.

    In a process where TRITON_INTERPRET is set (the test suite), each arch compiles in its own subprocess without
    it, the archs side by side (Triton compiles one kernel per thread; CI has 2 cores)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return _compile_rows_here(archs, dtypes)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = [str(d).removeprefix("torch.") for d in dtypes]
    procs = [subprocess.Popen([sys.executable, "-m", "omniret_kernels.compile_check", "--json",
                               json.dumps({"archs": [arch], "dtypes": names})],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in archs]
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"compile check subprocess failed:\n{err[-4000:]}")
        rows += [KernelRow(**row) for row in json.loads(out.strip().splitlines()[-1])]
    return rows


def format_table(rows: list[KernelRow]) -> str:
    header = ("kernel", "arch", "dtype", "regs", "smem B", "spill B", "stack B", "warps", "stages", "MMA",
              "problems")
    lines = [header] + [(r.kernel, f"sm_{r.arch}", r.dtype, str(r.regs), str(r.smem), str(r.spill_bytes),
                         str(r.stack), str(r.num_warps), str(r.num_stages),
                         r.mma or ("none" if r.has_matmul else "-"), "; ".join(r.problems()) or "ok")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--json"]:
        spec = json.loads(argv[1])
        rows = _compile_rows_here(spec["archs"], [getattr(torch, d) for d in spec["dtypes"]], verbose=True,
                                  only=spec.get("only", ()), fp32_precision=spec.get("fp32_precision", "high"))
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    else:
        rows = compile_rows()
        print(format_table(rows))
    return 1 if any(r.problems() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
