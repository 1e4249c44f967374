"""diversity_loss benchmarks: ratios against baselines timed in the same run (issue 5).

Shape: B = 256, N = 64, D = 1536 fp32, p = 0.9 (OMNIRET_BENCH_SMALL=1 shrinks B to 16 for a quick look).
- baseline: the dense eager PyTorch loss (Gram, relu, eye, F.dropout, F.smooth_l1_loss), forward + backward;
- floor: the memory traffic any forward + backward must pay: read m twice (one pass each) and write a gradient of
  m's size once (m.sum() + m.clone(), the clone allocating its output as the kernel must); also reported: the
  stricter floor m.sum() + out.copy_(m) into a buffer already paged in;
- ours: omniret_kernels.diversity_loss(backend="cpu"), forward + backward; on a GPU, bfloat16 CUDA tensors and the
  dispatch rule's CUDA backend (the memory goal stays the CPU kernel's host memory).
Goals: ours >= 10x faster than the baseline, within 3x of the floor, peak extra memory <= 25% of the baseline's.

Run: `PYTHONPATH=$PWD python -m pytest benchmarks/test_diversity.py -q -s`
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, OP_BACKEND, OP_DTYPE, goal, synced, median_time, peak_rss_growth  # stateless
from omniret_kernels import _ext
from omniret_kernels.diversity_loss import diversity_loss

pytestmark = pytest.mark.skipif(not _ext.cpu_extension_built(), reason="omniret_kernels._C is not built")

B = 16 if os.environ.get("OMNIRET_BENCH_SMALL") == "1" else 256
N, D, P, GAMMA = 64, 1536, 0.9, 0.5
TABLE = "diversity"


def dense_baseline(m: torch.Tensor) -> torch.Tensor:
    """What one writes in eager PyTorch: the full Gram matrix, dropout on all of it."""
    u = F.normalize(m, dim=-1)
    a = torch.relu(u @ u.transpose(1, 2)) - torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
    a = F.dropout(a, p=P, training=True)
    return F.smooth_l1_loss(a, torch.zeros_like(a), beta=GAMMA)


def fused(m: torch.Tensor) -> torch.Tensor:
    return diversity_loss(m, p=P, gamma=GAMMA, backend=OP_BACKEND if m.is_cuda else "cpu")


def _fwd_bwd(loss_fn, m):
    def run():
        m.grad = None
        loss_fn(m).backward()

    return run


def _floor(m):
    def run():
        m.sum()
        return m.clone()

    return run


def _floor_preallocated(m):
    """Stricter floor: the same traffic into a buffer that is already paged in (no allocation, no page faults)."""
    out = torch.empty_like(m).fill_(0)

    def run():
        m.sum()
        out.copy_(m)

    return run


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    return torch.randn(B, N, D, device=DEVICE).to(OP_DTYPE).requires_grad_(True)


def test_diversity_speed(benchmark, bench_record, m):
    baseline_s = median_time(_fwd_bwd(dense_baseline, m), warmup=1, repeat=3)
    floor_s = median_time(_floor(m.detach()), warmup=1, repeat=5)
    floor_pre_s = median_time(_floor_preallocated(m.detach()), warmup=1, repeat=5)
    fwd_s = median_time(lambda: fused(m.detach()), warmup=1, repeat=5)
    ours_s = median_time(_fwd_bwd(fused, m), warmup=1, repeat=5)
    benchmark.pedantic(synced(_fwd_bwd(fused, m)), rounds=3, iterations=1)
    row = dict(shape=f"B={B} N={N} D={D} p={P} {str(OP_DTYPE)[6:]} on {DEVICE.type}", baseline_ms=baseline_s * 1e3, floor_ms=floor_s * 1e3,
               ours_fwd_ms=fwd_s * 1e3, ours_fwd_bwd_ms=ours_s * 1e3, speedup_vs_baseline=baseline_s / ours_s,
               ratio_to_floor=ours_s / floor_s, floor_prealloc_ms=floor_pre_s * 1e3,
               ratio_to_prealloc_floor=ours_s / floor_pre_s, load=os.getloadavg()[0])
    benchmark.extra_info.update(row)
    bench_record(TABLE, metric="time", **row)


@goal
def test_diversity_memory(bench_record):
    """Host memory (RSS) of the CPU kernel, on a GPU machine too."""
    setup = f"""
import torch, torch.nn.functional as F
from benchmarks.test_diversity import dense_baseline, fused
torch.manual_seed(0)
m = torch.randn({B}, {N}, {D}).requires_grad_(True)
"""
    baseline = peak_rss_growth(setup, "dense_baseline(m).backward()")
    ours = peak_rss_growth(setup, "fused(m).backward()")
    grad_bytes = B * N * D * 4
    row = dict(shape=f"B={B} N={N} D={D} p={P}", baseline_extra_MB=baseline / 2**20, ours_extra_MB=ours / 2**20,
               ratio=ours / baseline, grad_MB=grad_bytes / 2**20)
    bench_record(TABLE, metric="peak extra memory", **row)
    # Memory is deterministic enough to assert: the fused op keeps only the gradient it returns.
    assert ours <= 0.25 * baseline, row
