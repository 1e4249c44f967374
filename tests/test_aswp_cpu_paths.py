"""aswp_pool CPU kernel paths: the AVX-512 block (pack, sort, unpack) against the paths CPUs without AVX-512 take
(OMNIRET_ASWP_NO_AVX512=1: the AVX2 sort network; with OMNIRET_ASWP_NO_AVX2=1 too: scalar code; all run here and
must agree bit for bit, with and without saving for backward), all
against the reference at odd N (1, 3, 127, 129, 255), ties and masks, float32 with full and partial 32-column
blocks; the vectorised STM softmax of the backward; the saved tensors of masked rows staying zero."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from omniret_kernels import _ext, aswp_pool, reference

pytestmark = pytest.mark.skipif(not _ext.cpu_extension_built(), reason="omniret_kernels._C is not built")
ROOT = Path(__file__).resolve().parents[1]

# (B, N, D, L, M, masked): L = 96 is three full blocks, L = 70 ends in a partial block of 6 columns.
CASES = [(2, 1, 8, 96, 4, False), (2, 3, 8, 70, 5, True), (2, 127, 16, 96, 64, True), (2, 129, 16, 70, 128, False),
         (1, 255, 8, 64, 200, True)]

RUN_CASES = textwrap.dedent("""
    import sys, torch
    from omniret_kernels import aswp_pool
    cases, path = eval(sys.argv[1]), sys.argv[2]
    results = []
    for i, (B, N, D, L, M, masked) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(B, N, D, generator=g)
        x[:, 1::3] = x[:, 0:1]  # tied tokens: equal projections, order decided by the token index
        d = torch.randn(L, D, generator=g)
        r = torch.randn(M, L, generator=g)
        mask = None
        if masked:
            mask = torch.rand(B, N, generator=g) > 0.3
            mask[:, 0] = True
        leaves = [t.requires_grad_() for t in (x, d, r)]
        out = aswp_pool(x, d, r, mask, pooling="stm", temperature=0.3, backend="cpu")
        grads = torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g))
        saved = torch.ops.omniret.aswp_pool_fwd(x.detach(), d.detach(), r.detach(), mask, None, "stm", True, 0.3)
        with torch.no_grad():  # the value-only sort (nothing saved)
            lean = aswp_pool(x, d, r, mask, pooling="stm", temperature=0.3, backend="cpu")
        results.append((out.detach(), *grads, saved[1], saved[2], lean))
    torch.save(results, path)
""")


def _run_cases(tmp_path, name, env_extra):
    path = tmp_path / f"{name}.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           **env_extra}
    for flag in ("OMNIRET_ASWP_NO_AVX512", "OMNIRET_ASWP_NO_AVX2"):  # only what the case asks for
        if flag not in env_extra:
            env.pop(flag, None)
    proc = subprocess.run([sys.executable, "-c", RUN_CASES, repr(CASES), str(path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


def test_avx512_and_portable_paths_agree_bit_for_bit(tmp_path):
    fast = _run_cases(tmp_path, "default", {})
    avx2 = _run_cases(tmp_path, "avx2", {"OMNIRET_ASWP_NO_AVX512": "1"})  # AVX2 network, portable pack/unpack
    portable = _run_cases(tmp_path, "portable", {"OMNIRET_ASWP_NO_AVX512": "1", "OMNIRET_ASWP_NO_AVX2": "1"})
    for other_name, other in (("avx2", avx2), ("portable", portable)):
        for case, a, b in zip(CASES, fast, other):
            for name, u, v in zip(("out", "dx", "dd", "dr", "sorted", "tokens", "out_no_save"), a, b):
                assert torch.equal(u, v), (other_name, case, name)
    for case, a in zip(CASES, fast):
        assert torch.equal(a[-1], a[0]), case  # the value-only sort gives the keyed sort's output


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}N{}D{}L{}M{}{}".format(*c[:5], "m" if c[5] else ""))
def test_float32_matches_reference_with_ties_and_masks(case):
    B, N, D, L, M, masked = case
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, N, D, dtype=torch.float64, generator=g)
    x[:, 1::3] = x[:, 0:1]
    d = torch.randn(L, D, dtype=torch.float64, generator=g)
    r = torch.randn(M, L, dtype=torch.float64, generator=g)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[:, 0] = True
    leaves32 = [t.float().requires_grad_() for t in (x, d, r)]
    leaves64 = [t.clone().requires_grad_() for t in (x, d, r)]
    out = aswp_pool(*leaves32, mask, pooling="stm", temperature=0.3, backend="cpu")
    ref = reference.aswp_pool(*leaves64, mask, pooling="stm", temperature=0.3)
    upstream = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(out, leaves32, upstream.float())
    ref_grads = torch.autograd.grad(ref, leaves64, upstream)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    # Tied tokens (0 and 1, 4, 7, ...) may take their sorted positions in either order (GEMM rounding can split
    # a tie in float32): their gradients are compared as a group sum, every other token's one by one.
    tied = torch.zeros(N, dtype=torch.bool)
    tied[0], tied[1::3] = True, True
    dx, ref_dx = grads[0].double(), ref_grads[0]
    torch.testing.assert_close(dx[:, ~tied], ref_dx[:, ~tied], atol=5e-4, rtol=5e-4)
    torch.testing.assert_close(dx[:, tied].sum(1), ref_dx[:, tied].sum(1), atol=5e-4, rtol=5e-4)
    for name, a, b in zip(("directions", "references"), grads[1:], ref_grads[1:]):
        torch.testing.assert_close(a.double(), b, atol=5e-4, rtol=5e-4, msg=lambda m: f"grad {name}: {m}")


def test_masked_rows_of_the_saved_tensors_are_zero():
    """Ragged batches: rows past a sample's valid count are never written and read as zero (fresh pages)."""
    g = torch.Generator().manual_seed(3)
    B, N, D, L, M = 3, 64, 16, 2048, 32  # (B, N, L) float32 = 1.5 MiB: the page-backed allocation
    x, d, r = torch.randn(B, N, D, generator=g), torch.randn(L, D, generator=g), torch.randn(M, L, generator=g)
    mask = torch.arange(N)[None, :] < torch.tensor([64, 10, 33])[:, None]
    _, sorted_values, tokens = torch.ops.omniret.aswp_pool_fwd(x, d, r, mask, None, "stm", True, 1.0)
    for b, n_valid in enumerate((64, 10, 33)):
        assert (sorted_values[b, n_valid:] == 0).all() and (tokens[b, n_valid:] == 0).all()
        proj = (x[b, :n_valid] @ torch.nn.functional.normalize(d, dim=1).t())
        torch.testing.assert_close(sorted_values[b, :n_valid], proj.sort(dim=0).values, atol=1e-5, rtol=1e-5)
