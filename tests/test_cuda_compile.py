"""The CUDA kernels compile cleanly for the GPUs we ship SASS for, checked without a GPU (issue #18, item 6).

Every csrc/cuda/*.cu is compiled to a cubin for sm_80 and sm_90 with `nvcc -Xptxas -v` (the .cu files include no
torch headers, so each takes seconds), and ptxas's report is parsed per kernel: registers, static shared memory,
spill bytes and stack frame. Asserted: every expected kernel is there for both archs, no kernel spills, no kernel
has a stack frame (local memory), and the dynamic shared memory of each kernel at the paper's shapes fits the
arch's opt-in limit. A small host program also checks the float32 quantile table of the ASWP kernel
(csrc/cuda/aswp_quantile.h) against the float64 position of the shared header for every rank at n, M <= 300.

These kernels are COMPILED ONLY on the development machine (no GPU). What they compute is checked by running them
on the CPU: csrc/cuda/emulation/cuda_on_cpu.h stands in for blocks, threads, shared memory, __syncthreads (each
block as blockDim std::threads at a std::barrier) and warp shuffles, and the ASWP forward/backward (every pooling,
ragged masks) and diversity kernels (keep mask, loss, gradient) are compared with the float64 reference. That
executes their thread layout and reductions; it is not a GPU run (no lockstep, no coalescing, no timing). Skipped when nvcc is absent. The ptxas table
is printed (pytest -s) and kept in docs/cuda_compile.md:
    python tests/test_cuda_compile.py            # prints the markdown table that docs/cuda_compile.md holds
Takes ~40-60 s on 2 cores (4 cubins, one host probe, two emulator builds and 19 emulated cases).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = ("sm_80", "sm_90")
# cudaDevAttrMaxSharedMemoryPerBlockOptin of the reference GPU of each arch (A100, H100), in bytes.
OPTIN_SMEM = {"sm_80": 166_912, "sm_90": 232_448}
NVCC_FLAGS = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}", "-Xptxas", "-v"]

# The kernels each .cu must define (short names: file stem + kernel name, template argument in brackets).
EXPECTED = {
    "aswp_pool": {"forward_kernel<uint8>", "forward_kernel<int32>", "backward_kernel<uint8>", "backward_kernel<int32>"},
    "diversity_loss": {"forward_kernel", "backward_kernel", "inverse_norm_kernel", "keep_mask_kernel"},
}
# Paper shapes (issue #18): ASWP B=8 N=M=128 D=1536 L=4096; diversity N=64 D=1536, and its documented MAX_N.
PAPER_ASWP_N, PAPER_ASWP_M = 128, 128
PAPER_DIVERSITY_N, DIVERSITY_MAX_N = 64, 1024


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME): the CUDA ptxas check needs "
                                                     "the CUDA toolkit's compiler, no GPU")


@dataclass
class KernelReport:
    source: str
    kernel: str
    arch: str
    registers: int
    static_smem: int
    stack: int
    spill_stores: int
    spill_loads: int


def short_name(mangled: str) -> str:
    """'forward_kernel<uint8>' from the mangled entry name (no c++filt needed)."""
    # Itanium names are length-prefixed (14forward_kernel); the prefix may follow a hash's digits (..fa114forward..),
    # so every tail of a digit run is a candidate length.
    for digits in re.finditer(r"\d+", mangled):
        for k in range(len(digits.group())):
            start, length = digits.end(), int(digits.group()[k:])
            name = mangled[start:start + length]
            if len(name) == length and name.endswith("_kernel") and re.fullmatch(r"[A-Za-z_]\w*", name):
                argument = re.match(r"I([a-z])E", mangled[start + length:])
                template = {"h": "uint8", "i": "int32", "f": "float"}.get(argument.group(1)) if argument else None
                return name + (f"<{template}>" if template else "")
    return mangled


def parse_ptxas(source: str, text: str) -> list[KernelReport]:
    reports, current = [], None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
        if entry:
            current = KernelReport(source, short_name(entry.group(1)), entry.group(2), -1, 0, -1, -1, -1)
            reports.append(current)
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame and current.stack < 0:
            current.stack, current.spill_stores, current.spill_loads = map(int, frame.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.static_smem = int(smem.group(1)) if smem else 0
    return reports


def compile_cubin(source: Path, arch: str, out_dir: Path) -> list[KernelReport]:
    cubin = out_dir / f"{source.stem}.{arch}.cubin"
    run = subprocess.run([NVCC, *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-o", str(cubin), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"nvcc failed on {source.name} for {arch}:\n{run.stderr[-4000:]}"
    return parse_ptxas(source.stem, run.stdout + run.stderr)


# The host-side facts the kernels' launchers compute: dynamic shared memory at given shapes (the same inline
# functions the launchers and the glue's pre-launch check call) and the float32-vs-float64 quantile comparison.
PROBE = r"""
#include <cmath>
#include <cstdio>
#include "aswp_pool_launch.h"
#include "aswp_quantile.h"
#include "diversity_loss.h"
#include "omniret/aswp_pool_math.h"
int main(int argc, char** argv) {
  using namespace omniret;
  long long checked = 0, position_mismatch = 0, weight_mismatch = 0;
  for (int n = 1; n <= 300; ++n)
    for (int m = 1; m <= 300; ++m)
      for (int r = 0; r < m; ++r) {
        int lo64, hi64, lo32, hi32;
        double w64;
        float w32;
        aswp::quantile_position(r, n, m, lo64, hi64, w64);
        aswp::quantile_position_f32(r, n, m, lo32, hi32, w32);
        ++checked;
        if (lo64 != lo32 || hi64 != hi32) ++position_mismatch;
        const float ref = float(w64);
        if (std::fabs(w32 - ref) > std::nextafter(std::fabs(ref), 2.0f) - std::fabs(ref)) ++weight_mismatch;
      }
  std::printf("quantile %lld %lld %lld\n", checked, position_mismatch, weight_mismatch);
  std::printf("smem aswp_pool forward_kernel %zu\n", cuda::aswp_launch::forward_shared_bytes(@ASWP_N@, @ASWP_M@));
  std::printf("smem aswp_pool backward_kernel %zu\n", cuda::aswp_launch::backward_shared_bytes(@ASWP_N@, @ASWP_M@));
  std::printf("smem diversity_loss forward_kernel %zu\n", cuda::diversity_loss_forward_shared_bytes());
  std::printf("smem diversity_loss backward_kernel %zu\n", cuda::diversity_loss_backward_shared_bytes(@DIV_N@));
  std::printf("smem diversity_loss backward_kernel@max_n %zu\n", cuda::diversity_loss_backward_shared_bytes(@DIV_MAX_N@));
  return 0;
}
"""


def run_probe(out_dir: Path) -> dict:
    source = out_dir / "probe.cpp"
    text = PROBE
    for name, value in {"ASWP_N": PAPER_ASWP_N, "ASWP_M": PAPER_ASWP_M, "DIV_N": PAPER_DIVERSITY_N,
                        "DIV_MAX_N": DIVERSITY_MAX_N}.items():
        text = text.replace(f"@{name}@", str(value))
    source.write_text(text)
    binary = out_dir / "probe"
    build = subprocess.run([NVCC, "-std=c++20", "-O2", "-x", "c++", f"-I{ROOT / 'csrc' / 'include'}",
                            f"-I{CUDA_DIR}", "-o", str(binary), str(source)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, f"the host probe did not build:\n{build.stderr[-4000:]}"
    out = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120, check=True).stdout
    facts = {"smem": {}}
    for line in out.splitlines():
        word, *rest = line.split()
        if word == "quantile":
            facts["quantile"] = tuple(map(int, rest))
        elif word == "smem":
            facts["smem"][(rest[0], rest[1])] = int(rest[2])
    return facts


def collect() -> tuple[list[KernelReport], dict]:
    sources = sorted(CUDA_DIR.glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(compile_cubin, s, arch, Path(tmp)) for s in sources for arch in ARCHS]
        facts = run_probe(Path(tmp))
        reports = [r for job in jobs for r in job.result()]
    return reports, facts


def nvcc_version() -> str:
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]


def dynamic_smem_column(report: KernelReport, facts: dict) -> str:
    paper = facts["smem"].get((report.source, report.kernel.split("<")[0]))
    if paper is None:
        return "0"
    if report.source == "aswp_pool":
        return f"{paper:,} (N=M={PAPER_ASWP_N})"
    at_max = facts["smem"].get((report.source, report.kernel + "@max_n"))
    if at_max is None:
        return f"{paper:,} (any N)"
    return f"{paper:,} (N={PAPER_DIVERSITY_N}); {at_max:,} (N={DIVERSITY_MAX_N})"


def markdown_table(reports: list[KernelReport], facts: dict) -> str:
    lines = [f"nvcc {nvcc_version()}, `nvcc {' '.join(a for a in NVCC_FLAGS if not a.startswith('-I'))} "
             f"-Icsrc/include -arch=<arch> -cubin`",
             "",
             "| source | kernel | arch | registers | static smem (B) | dynamic smem at paper shape (B) | "
             "spill stores/loads (B) | stack frame (B) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(reports, key=lambda r: (r.source, r.kernel, r.arch)):
        lines.append(f"| {r.source}.cu | `{r.kernel}` | {r.arch} | {r.registers} | {r.static_smem} | "
                     f"{dynamic_smem_column(r, facts)} | {r.spill_stores}/{r.spill_loads} | {r.stack} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled():
    reports, facts = collect()
    print("\n" + markdown_table(reports, facts))
    return reports, facts


def test_every_kernel_compiles_for_each_arch(compiled):
    reports, _ = compiled
    for arch in ARCHS:
        for source, kernels in EXPECTED.items():
            found = {r.kernel for r in reports if r.arch == arch and r.source == source}
            assert kernels <= found, f"{source}.cu for {arch}: missing {sorted(kernels - found)}, found {sorted(found)}"
        assert all(r.registers > 0 for r in reports), "ptxas reported no register count for some kernel"


def test_no_spills_and_no_stack_frame(compiled):
    reports, _ = compiled
    spilling = [f"{r.source}:{r.kernel}@{r.arch} stores={r.spill_stores} loads={r.spill_loads}"
                for r in reports if r.spill_stores or r.spill_loads]
    assert not spilling, f"kernels spill registers to local memory: {spilling}"
    with_stack = [f"{r.source}:{r.kernel}@{r.arch} {r.stack} B" for r in reports if r.stack]
    assert not with_stack, f"kernels use a stack frame (local memory): {with_stack}"
    assert all(r.stack == 0 and r.spill_loads == 0 for r in reports)  # every report parsed its frame line


def test_shared_memory_fits_the_optin_limit_at_paper_shapes(compiled):
    reports, facts = compiled
    for r in reports:
        dynamic = facts["smem"].get((r.source, r.kernel.split("<")[0]), 0)
        at_max = facts["smem"].get((r.source, r.kernel.split("<")[0] + "@max_n"), 0)
        for need in (dynamic, at_max):
            assert r.static_smem + need <= OPTIN_SMEM[r.arch], (
                f"{r.source}:{r.kernel}@{r.arch} needs {r.static_smem + need} B of shared memory, over the "
                f"{OPTIN_SMEM[r.arch]} B opt-in limit")
    # The paper shapes stay under the 48 KiB default, so they launch even without the opt-in.
    assert facts["smem"][("aswp_pool", "forward_kernel")] <= 48 * 1024
    assert facts["smem"][("aswp_pool", "backward_kernel")] <= 48 * 1024


def test_float32_quantile_table_matches_the_float64_position(compiled):
    _, facts = compiled
    checked, position_mismatch, weight_mismatch = facts["quantile"]
    assert checked == sum(range(1, 301)) * 300
    assert position_mismatch == 0, f"{position_mismatch} of {checked} (rank, n, M) give another lo/hi"
    assert weight_mismatch == 0, f"{weight_mismatch} of {checked} weights differ by more than one float32 ulp"


# ---- The ASWP kernels' thread layout, executed on the CPU (csrc/cuda/emulation): not a GPU run ----
POOLING_CODES = {"stm": 0, "max": 1, "mean": 2, "weighted": 3}


def build_emulator(tmp_path_factory, op: str) -> Path:
    """csrc/cuda/<op>.cu built with g++ against the CPU stand-in for blocks, threads, shared memory, __syncthreads
    and warp shuffles (csrc/cuda/emulation/cuda_on_cpu.h)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the CPU emulation of the CUDA kernels needs a host C++20 compiler")
    cuda_include = Path(NVCC).resolve().parents[1] / "include"
    binary = tmp_path_factory.mktemp("emulator") / f"{op}_emulated"
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", f"-I{ROOT / 'csrc' / 'include'}",
                            f"-I{cuda_include}", "-o", str(binary), str(CUDA_DIR / "emulation" / f"{op}_emulated.cpp")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"the emulated {op} kernels did not build:\n{build.stderr[-4000:]}"
    return binary


@pytest.fixture(scope="module")
def aswp_emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory, "aswp_pool")


@pytest.fixture(scope="module")
def diversity_emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory, "diversity_loss")


def run_aswp_emulated(binary, tmp_path, proj, valid, references, weights, grad, pooling, temperature, rank_u8):
    import numpy as np
    import torch

    B, N, L = proj.shape
    M = references.shape[0]
    ref_sorted, order = torch.sort(references, dim=0, stable=True)
    weighted = pooling == "weighted"
    header = np.array([B, N, L, M, POOLING_CODES[pooling], int(rank_u8), 1, int(weighted)], dtype=np.int32)
    parts = [header.tobytes(), np.float32(1.0 / temperature).tobytes(), proj.numpy().tobytes(),
             valid.to(torch.uint8).numpy().tobytes(), valid.sum(1).to(torch.int32).numpy().tobytes(),
             ref_sorted.numpy().tobytes(), order.to(torch.int32).numpy().tobytes()]
    if weighted:
        parts.append(weights.gather(0, order).numpy().tobytes())
    parts.append(grad.numpy().tobytes())
    (tmp_path / "in.bin").write_bytes(b"".join(parts))
    subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=300)
    flat = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    sizes = {"out": (B, L), "sorted": (B, N, L), "tokens": (B, N, L), "dp": (B, N, L), "dref": (B, M, L)}
    if weighted:
        sizes["dweight"] = (B, M, L)
    result, at = {}, 0
    for name, shape in sizes.items():
        count = int(np.prod(shape))
        result[name] = flat[at:at + count].view(shape)
        at += count
    assert at == flat.numel(), "the emulator wrote an unexpected amount of output"
    # reference and weight gradients: the glue sums the per-sample partials and scatters them back from rank order
    result["dref"] = torch.empty(M, L).scatter_(0, order, result["dref"].sum(0))
    if weighted:
        result["dweight"] = torch.empty(M, L).scatter_(0, order, result["dweight"].sum(0))
    return result


def tie_group_sums(grad, proj, valid):
    """(B, N, L): each valid token's gradient summed over the valid tokens of its sample whose projection in that
    column equals its own (itself alone when nothing ties); padded tokens keep their own."""
    import torch

    out = grad.clone()
    for b in range(grad.shape[0]):
        rows = valid[b].nonzero().flatten()
        for col in range(grad.shape[2]):
            _, group = torch.unique(proj[b, rows, col], return_inverse=True)
            sums = torch.zeros(int(group.max()) + 1, dtype=grad.dtype).index_add_(0, group, grad[b, rows, col])
            out[b, rows, col] = sums[group]
    return out


def test_tie_group_sums_against_a_direct_sum():
    import torch

    proj = torch.tensor([[[1.0], [2.0], [1.0], [1.0]]])  # tokens 0, 2, 3 tie; token 3 is padding
    valid = torch.tensor([[True, True, True, False]])
    grad = torch.tensor([[[0.25], [5.0], [0.5], [7.0]]], dtype=torch.float64)
    assert tie_group_sums(grad, proj, valid).flatten().tolist() == [0.75, 5.0, 0.75, 7.0]


@pytest.mark.parametrize("pooling", ["stm", "max", "mean", "weighted"])
@pytest.mark.parametrize("B,N,M,L,rank_u8", [
    (3, 13, 7, 37, True),     # M < N, L not a multiple of the 32 columns per block
    (2, 21, 50, 9, False),    # M > N: positions read by several ranks; int32 tokens
    (2, 300, 200, 11, False),  # 4 and 8 columns per block (forward, backward): 32 / 16 thread groups per column
    (1, 2100, 30, 3, False),  # one column per block: 128 thread groups, a 4096-key sort
])
def test_emulated_aswp_kernels_match_the_float64_reference(aswp_emulator, tmp_path, pooling, B, N, M, L, rank_u8):
    """The forward and backward CUDA kernels, run by the CPU stand-in, give the float64 reference's output,
    sorted values and tokens, and gradients for x (dp), references and weights, with a ragged mask."""
    import torch

    from omniret_kernels import reference

    gen = torch.Generator().manual_seed(zlib.crc32(repr((pooling, B, N, M, L)).encode()))  # hash() varies by process
    proj = torch.randn(B, N, L, generator=gen)
    valid = torch.rand(B, N, generator=gen) < 0.7
    valid[:, 0] = True
    valid[-1] = True  # one sample without padding
    references = torch.randn(M, L, generator=gen)
    weights = torch.rand(M, L, generator=gen) / M
    grad = torch.randn(B, L, generator=gen)
    temperature = 0.3
    got = run_aswp_emulated(aswp_emulator, tmp_path, proj, valid, references, weights, grad, pooling, temperature,
                            rank_u8)

    x = proj.double().requires_grad_()
    refs = references.double().requires_grad_()
    w = weights.double().requires_grad_()
    out = reference.aswp_pool(x, torch.eye(L, dtype=torch.float64), refs, valid, pooling=pooling,
                              weights=w if pooling == "weighted" else None, normalize_directions=False,
                              temperature=temperature)
    (out * grad.double()).sum().backward()

    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got["out"].double(), out.detach(), **tol)
    # tokens whose projections tie exactly (float32 normals collide in a few percent of these runs) share their
    # ranks' gradient in whatever split each sort breaks the tie: compare each tie group's sum
    torch.testing.assert_close(tie_group_sums(got["dp"].double(), proj, valid), tie_group_sums(x.grad, proj, valid),
                               **tol)
    torch.testing.assert_close(got["dref"].double(), refs.grad, **tol)
    if pooling == "weighted":
        torch.testing.assert_close(got["dweight"].double(), w.grad, **tol)
    for b in range(B):
        n_b = int(valid[b].sum())
        tokens = valid[b].nonzero().flatten()
        expected = torch.sort(proj[b][valid[b]], dim=0, stable=True)
        assert torch.equal(got["sorted"][b, :n_b], expected.values)
        assert torch.equal(got["tokens"][b, :n_b].long(), tokens[expected.indices])
        assert torch.all(got["sorted"][b, n_b:] == 0) and torch.all(got["tokens"][b, n_b:] == 0)


@pytest.mark.parametrize("B,N,D,p,normalize", [
    (2, 9, 37, 0.0, True),    # no dropout; D not a multiple of the 32 lanes
    (3, 13, 70, 0.5, True),   # dropout: only kept pairs, keep bits from the Philox stream
    (2, 21, 5, 0.3, False),   # D < 32: most lanes idle; no normalization
])
def test_emulated_diversity_kernels_match_the_float64_reference(diversity_emulator, tmp_path, B, N, D, p, normalize):
    """The diversity CUDA kernels (keep mask, inverse norms, forward partial sums, backward), run by the CPU stand-in,
    give the CPU op's keep mask bit for bit and the float64 reference's loss and gradient."""
    import numpy as np
    import torch

    import omniret_kernels  # noqa: F401  (registers torch.ops.omniret)
    from omniret_kernels import reference

    gen = torch.Generator().manual_seed(B * 1000 + N * 10 + D)
    m = torch.randn(B, N, D, generator=gen) + 0.3  # a shared offset: many positive cosines, so relu is active
    seed, gamma, grad = 1234567, 0.5, 0.75
    header = np.array([B, N, D, int(normalize)], dtype=np.int32)
    (tmp_path / "in.bin").write_bytes(header.tobytes() + np.array([p, gamma], dtype=np.float32).tobytes()
                                      + np.int64(seed).tobytes() + m.numpy().tobytes() + np.float32(grad).tobytes())
    subprocess.run([str(diversity_emulator), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True,
                   timeout=300)
    flat = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    keep_got = flat[:B * N * N].view(B, N, N)
    partial = flat[B * N * N:B * N * N + B * N]
    grad_got = flat[B * N * N + B * N:].view(B, N, D)

    keep = torch.ops.omniret.diversity_keep_mask(torch.tensor(seed, dtype=torch.int64), B, N, p)
    assert torch.equal(keep_got.bool(), keep) and torch.all((keep_got == 0) | (keep_got == 1))
    md = m.double().requires_grad_()
    loss = reference.diversity_loss(md, keep if p > 0 else None, p=p, gamma=gamma, normalize=normalize)
    (loss * grad).backward()
    torch.testing.assert_close(partial.double().sum() / (B * N * N), loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_got.double(), md.grad, atol=1e-6, rtol=1e-4)


def test_built_extension_carries_ptx_for_newer_gpus():
    """The built _C_cuda reports its targets, and they include generic PTX at least as new as its newest SASS, so
    GPUs newer than any SASS target JIT-compile it (arch-specific compute_XXa PTX would JIT on X.X only)."""
    from omniret_kernels import _ext

    if not _ext.cuda_extension_built():
        pytest.skip("omniret_kernels._C_cuda is not built here")
    import omniret_kernels._C_cuda as cuda_ext

    archs = cuda_ext.built_archs()
    sass = [int(re.search(r"\d+", a).group()) for a in archs if a.startswith("sm_")]
    ptx = [int(a[len("compute_"):]) for a in archs if re.fullmatch(r"compute_\d+", a)]
    assert sass and ptx, f"_C_cuda carries {archs}: no SASS or no generic PTX"
    assert max(ptx) >= max(sass), f"_C_cuda carries {archs}: its PTX is older than its newest SASS"
    assert "sm_80" in archs, f"_C_cuda carries {archs}: no sm_80 SASS for the 8.x GPUs"


if __name__ == "__main__":
    if NVCC is None:
        sys.exit("nvcc not found (set CUDA_HOME)")
    print(markdown_table(*collect()))
