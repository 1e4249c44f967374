"""Promises of the C++ kernels (issue #21), one test per finding, each failing on the kernels before the fix:

1. the dispatcher ops called directly with a bad argument raise ValueError naming it, never read or write out of
   bounds, hang or abort (checks in csrc/include/omniret/*_checks.h);
2. aswp_pool refuses N or M above 2^30 at once instead of looping forever in next_pow2;
3. NaN/Inf in the inputs give the reference's NaN pattern: aswp_pool on every CPU sort path (AVX-512, AVX2,
   scalar), with and without saving for backward; resampler_attention with NaN/Inf in k.

Not tested at run time: the int64 block offsets (a sample needs 2^26 valid tokens, over 16 GiB of sort keys per
thread). All inputs are tiny or zero-byte (expand / D = 0 tricks); the file runs in a few seconds.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from omniret_kernels import _ext, reference

pytestmark = pytest.mark.skipif(not _ext.cpu_extension_built(), reason="omniret_kernels._C is not built")
ROOT = Path(__file__).resolve().parents[1]
ops = torch.ops.omniret


def _aswp_inputs(B=2, N=7, D=5, L=40, M=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=dtype)
    d = torch.randn(L, D, generator=g, dtype=dtype)
    r = torch.randn(M, L, generator=g, dtype=dtype)
    w = torch.rand(M, L, generator=g, dtype=dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    return x, d, r, w, mask


def _aswp_fwd(x, d, r, mask=None, w=None, pooling="stm", save=True):
    return ops.aswp_pool_fwd(x, d, r, mask, w, pooling, True, 1.0, save)


# ---- 1. direct dispatcher calls check their arguments ---------------------------------------------------------
def _bad_aswp_fwd_calls():
    x, d, r, w, mask = _aswp_inputs()
    return {
        "mask_too_short": lambda: _aswp_fwd(x, d, r, mask[:, :3]),
        "mask_too_few_rows": lambda: _aswp_fwd(x, d, r, mask[:1]),
        "mask_not_bool": lambda: _aswp_fwd(x, d, r, mask.float()),
        "weights_too_small": lambda: _aswp_fwd(x, d, r, None, w[:2, :10], pooling="weighted"),
        "x_integer": lambda: _aswp_fwd(x.long(), d, r),
    }


@pytest.mark.parametrize("case", list(_bad_aswp_fwd_calls()))
def test_aswp_pool_fwd_direct_call_rejects_bad_arguments(case):
    with pytest.raises(ValueError, match="aswp_pool"):
        _bad_aswp_fwd_calls()[case]()


def _bad_aswp_bwd_calls():
    x, d, r, _, _ = _aswp_inputs()
    out, s, t = _aswp_fwd(x, d, r)
    g = torch.ones_like(out)

    def bwd(grad=g, sorted_values=s, tokens=t, mask=None):
        return ops.aswp_pool_bwd(grad, x, d, r, mask, None, sorted_values, tokens, "stm", True, 1.0, True, True)

    big = t.clone()
    big[0, 0, 0] = 200  # N = 7: the backward scatters through this index
    return {
        "tokens_out_of_range": lambda: bwd(tokens=big),
        "tokens_int64": lambda: bwd(tokens=t.long()),
        "sorted_float16": lambda: bwd(sorted_values=s.half()),
        "sorted_wrong_shape": lambda: bwd(sorted_values=s[:, :3], tokens=t[:, :3]),
        "grad_wrong_shape": lambda: bwd(grad=g[:, :5]),
        "mask_wrong_shape": lambda: bwd(mask=torch.ones(2, 3, dtype=torch.bool)),
    }


@pytest.mark.parametrize("case", list(_bad_aswp_bwd_calls()))
def test_aswp_pool_bwd_direct_call_rejects_bad_arguments(case):
    with pytest.raises(ValueError, match="aswp_pool"):
        _bad_aswp_bwd_calls()[case]()


def test_aswp_pool_bwd_accepts_its_own_saved_tensors():
    """The new checks let the forward's own outputs through (N = 300: int32 tokens)."""
    x, d, r, _, mask = _aswp_inputs(N=300)
    mask[1, 100:] = False
    out, s, t = _aswp_fwd(x, d, r, mask)
    gx, gd, gr, _ = ops.aswp_pool_bwd(torch.ones_like(out), x, d, r, mask, None, s, t, "stm", True, 1.0, True, True)
    assert t.dtype == torch.int32 and gx.shape == x.shape and gd.shape == d.shape and gr.shape == r.shape


def _bad_resampler_calls():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8, generator=g), torch.randn(9, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = ops.resampler_attention_fwd(q, k, v, cu, 0.3)
    return {
        "d_zero": lambda: ops.resampler_attention_fwd(q[..., :0], k[..., :0], v[..., :0], cu, 1.0),
        "q_integer": lambda: ops.resampler_attention_fwd(q.long(), k.long(), v.long(), cu, 0.3),
        "cu_decreasing": lambda: ops.resampler_attention_fwd(q, k, v, torch.tensor([0, 9, 9], dtype=torch.int32), 0.3),
        "bwd_lse_wrong_shape": lambda: ops.resampler_attention_bwd(out, q, k, v, out, lse[:, :1], cu, 0.3),
        "bwd_lse_integer": lambda: ops.resampler_attention_bwd(out, q, k, v, out, lse.long(), cu, 0.3),
    }


@pytest.mark.parametrize("case", list(_bad_resampler_calls()))
def test_resampler_attention_direct_call_rejects_bad_arguments(case):
    with pytest.raises(ValueError, match="resampler_attention"):
        _bad_resampler_calls()[case]()


def _bad_diversity_calls():
    m, seed = torch.randn(2, 5, 8), torch.tensor(3)
    return {
        "keep_mask_n_beyond_counter": lambda: ops.diversity_keep_mask(seed, 0, 2**31 + 1, 0.5),
        "bwd_grad_integer": lambda: ops.diversity_loss_bwd(torch.tensor(1), m, seed, 0.5, 0.5, True),
        "fwd_seed_int32": lambda: ops.diversity_loss_fwd(m, seed.int(), 0.5, 0.5, True),
    }


@pytest.mark.parametrize("case", list(_bad_diversity_calls()))
def test_diversity_direct_call_rejects_bad_arguments(case):
    with pytest.raises(ValueError, match="diversity"):
        _bad_diversity_calls()[case]()


# ---- 2. sizes the ASWP math cannot handle are refused, not looped on ------------------------------------------
def test_aswp_pool_refuses_more_than_2_30_tokens_without_hanging():
    """N = 2^30 + 1 tokens of dimension 0 (no memory): next_pow2 looped forever here. In a subprocess with a
    timeout, so a regression fails instead of hanging the suite."""
    code = textwrap.dedent("""
        import torch, omniret_kernels
        x = torch.empty(1, 2**30 + 1, 0)
        try:
            torch.ops.omniret.aswp_pool_fwd(x, torch.empty(4, 0), torch.zeros(3, 4), None, None, "max", False, 1.0,
                                            False)
        except ValueError as e:
            print("ValueError:", e)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("aswp_pool_fwd with N = 2^30 + 1 did not return within 60 s")
    assert "ValueError" in proc.stdout and "2^30" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_aswp_pool_refuses_more_than_2_30_references():
    """M = 2^30 + 1 references as a stride-0 view (4 bytes): refused before anything is copied."""
    x, d, _, _, _ = _aswp_inputs(L=1)
    refs = torch.zeros(1, 1).expand(2**30 + 1, 1)
    with pytest.raises(ValueError, match="2\\^30"):
        _aswp_fwd(x, d, refs, save=False)


# ---- 3. NaN / Inf propagate as in the reference ---------------------------------------------------------------
NAN_PATTERN_SCRIPT = textwrap.dedent("""
    import torch
    from omniret_kernels import reference
    bad = []
    g = torch.Generator().manual_seed(0)
    # N = 40 pads to 64 rows; L = 70 ends in a partial block. M = 50 couples every sorted row (NaN outputs
    # expected); M = 6 leaves the extreme rows uncoupled, where the NaN sort position decides the pattern.
    for dtype, M in ((torch.float32, 50), (torch.float64, 50), (torch.float32, 6), (torch.float64, 6)):
        x = torch.randn(3, 40, 5, generator=g, dtype=dtype)
        d = torch.randn(70, 5, generator=g, dtype=dtype)
        r = torch.randn(M, 70, generator=g, dtype=dtype)
        w = torch.rand(M, 70, generator=g, dtype=dtype)
        for value in (float("nan"), float("inf"), -float("inf")):
            xx = x.clone()
            xx[0, 2, 1] = value  # one coordinate: +-inf or NaN projections in some columns
            xx[1, 3, :] = value  # a whole token: NaN projections (inf - inf) in most columns
            xx[2, 5, 0] = -value if value == value else value
            for pooling in ("stm", "max", "mean", "weighted"):
                ref = reference.aswp_pool(xx, d, r, pooling=pooling, weights=w)
                for save in (True, False):
                    out = torch.ops.omniret.aswp_pool_fwd(xx, d, r, None, w if pooling == "weighted" else None,
                                                          pooling, True, 1.0, save)[0]
                    same = (out.isnan() == ref.isnan()).all() and (out.isinf() == ref.isinf()).all()
                    finite = ref.isfinite()
                    close = torch.allclose(out[finite], ref[finite], rtol=1e-4, atol=1e-4)
                    if not (same and close) or (M == 50 and not ref.isnan().any()):
                        bad.append((str(dtype), M, value, pooling, save, int(ref.isnan().sum()), int(out.isnan().sum())))
    print("BAD", bad)
""")


@pytest.mark.parametrize("path", ["avx512", "avx2", "scalar"])
def test_aswp_pool_nan_inf_in_x_give_the_reference_nan_pattern(path):
    """stm and max returned finite values where the reference is NaN: max pooling dropped NaN (NaN > acc is
    false), the sort keys put a negative NaN first, and STM's forward (the max) ignored +-inf psi where the
    reference's psi * (hard - y + y) is inf * 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("OMNIRET_ASWP_NO_AVX512", None), env.pop("OMNIRET_ASWP_NO_AVX2", None)
    if path != "avx512":
        env["OMNIRET_ASWP_NO_AVX512"] = "1"
    if path == "scalar":
        env["OMNIRET_ASWP_NO_AVX2"] = "1"
    proc = subprocess.run([sys.executable, "-c", NAN_PATTERN_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "BAD []", proc.stdout[-3000:]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resampler_attention_nan_inf_in_k_give_the_reference_nan_pattern(value, dtype):
    """float32 returned finite rows where the reference is NaN: fast_exp masked a NaN argument to 0."""
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 7, 300, 310], dtype=torch.int32)
    q = torch.randn(3, 4, 5, 8, generator=g, dtype=dtype)
    k, v = torch.randn(310, 2, 8, generator=g, dtype=dtype), torch.randn(310, 2, 8, generator=g, dtype=dtype)
    k[3, 0, 2] = value
    k[100, 1, :] = value
    out, lse = ops.resampler_attention_fwd(q, k, v, cu, 0.3)
    ref = reference.resampler_attention(q, k, v, cu, scale=0.3)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-5)
    # the backward of a NaN row is NaN too, never an error
    dq, dk, dv = ops.resampler_attention_bwd(torch.ones_like(out), q, k, v, out, lse, cu, 0.3)
    assert dq[ref.isnan().any(-1)].isnan().all()
