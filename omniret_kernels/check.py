"""`python -m omniret_kernels.check`: what runs on this machine, whether it is right, and how fast.

1. the device, the versions, and the backends each op would use per dtype (the dispatch plan);
2. for every op, every backend that can run here and every dtype: forward and gradients against the float64
   reference on small shapes (ragged, masked, grouped-query) and, with --shapes paper (the default on a GPU), on
   the paper's shapes; the error printed is max |got - reference| / max |reference|;
3. torch.compile(fullgraph=True) of each op against eager (inductor on a GPU, aot_eager on CPU unless
   --compile-backend says otherwise);
4. forward + backward times of each backend against the baselines (the eager reference; padded SDPA, and
   varlen_attn, flash-attn and xformers when they can run, for the resampler) and the floors: the three GEMMs of
   ASWP, the resampler's attention FLOPs at the GEMM rate measured now, and a read of m twice plus a write of its
   gradient for the diversity loss; in ms, TFLOP/s or GB/s, and x floor;
5. optionally (--triton-compile-check) the Triton compile check of omniret_kernels.compile_check when present.
Exits 1 when any check fails. On CPU the default (small shapes) takes well under a minute.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import omniret_kernels
from omniret_kernels import _dispatch, _ext, reference
from omniret_kernels._checks import KernelLimitError

OPS = _ext.OPS
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------------------
# Cases: one op call on fresh random inputs, and its float64 reference
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    name: str
    make: Callable  # (dtype, device) -> dict of tensors; leaves requiring grad are under "leaves"
    run: Callable  # (inputs, backend) -> output tensor (the op) or (inputs, "reference") -> the float64 reference
    sizes: dict = field(default_factory=dict)  # what the dispatch gates look at


def _gen(device):
    return torch.Generator(device=device).manual_seed(0)


def _aswp_case(name, B, N, D, L, M, masked):
    def make(dtype, device):
        g = _gen(device)
        x = torch.randn(B, N, D, generator=g, device=device).to(dtype)
        d = torch.randn(L, D, generator=g, device=device).to(dtype)
        r = torch.linspace(-1, 1, M, device=device)[:, None].repeat(1, L).to(dtype)
        mask = None
        if masked:
            lengths = torch.randint(max(1, N // 4), N + 1, (B,), generator=g, device=device)
            mask = torch.arange(N, device=device)[None, :] < lengths[:, None]
        return dict(leaves=[x, d, r], mask=mask)

    def run(inputs, backend):
        x, d, r = inputs["leaves"]
        if backend == "reference":
            return reference.aswp_pool(x, d, r, inputs["mask"])
        return omniret_kernels.aswp_pool(x, d, r, inputs["mask"], backend=backend)

    return Case("aswp_pool", name, make, run, dict(B=B, N=N, D=D, L=L, M=M))


def _resampler_case(name, lengths, H, Hk, Nq, d):
    def make(dtype, device):
        g = _gen(device)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        T = int(cu[-1])
        q = torch.randn(len(lengths), H, Nq, d, generator=g, device=device).to(dtype)
        k = (torch.randn(T, Hk, d, generator=g, device=device) * 2).to(dtype)
        v = torch.randn(T, Hk, d, generator=g, device=device).to(dtype)
        return dict(leaves=[q, k, v], cu=cu.to(device))

    def run(inputs, backend):
        q, k, v = inputs["leaves"]
        if backend == "reference":
            return reference.resampler_attention(q, k, v, inputs["cu"])
        return omniret_kernels.resampler_attention(q, k, v, inputs["cu"], backend=backend)

    return Case("resampler_attention", name, make, run, dict(H=H, Hk=Hk, Nq=Nq, d=d))


def _diversity_case(name, B, N, D):
    def make(dtype, device):
        return dict(leaves=[torch.randn(B, N, D, generator=_gen(device), device=device).to(dtype)])

    def run(inputs, backend):
        (m,) = inputs["leaves"]
        if backend == "reference":  # the backend's own keep mask, saved by its run below
            return reference.diversity_loss(m, inputs["keep"], p=0.5)
        # backend None (the torch.compile check): the default generator, reseeded by the caller
        generator = None if backend is None else torch.Generator(m.device).manual_seed(1)
        loss, keep = omniret_kernels.diversity_loss(m, p=0.5, generator=generator, return_keep_mask=True,
                                                    backend=backend)
        inputs["keep"] = keep
        return loss

    return Case("diversity_loss", name, make, run, dict(B=B, N=N, D=D))


def _ragged(B, low, high, seed=0):
    return torch.randint(low, high + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()


SMALL = [
    _aswp_case("small masked", 3, 37, 24, 70, 20, True),
    _aswp_case("small dense", 2, 16, 8, 33, 16, False),
    _resampler_case("small ragged GQA", [1, 7, 70, 33], 4, 2, 5, 32),
    _resampler_case("small ragged MHA", [3, 129, 40], 2, 2, 8, 16),
    _diversity_case("small", 3, 37, 19),
]
PAPER = [
    _aswp_case("paper B8 N128 D1536 L4096 ragged", 8, 128, 1536, 4096, 128, True),
    _resampler_case("media d96 Nq64 H16 ragged 100..1500", _ragged(32, 100, 1500), 16, 16, 64, 96),
    _resampler_case("output d128 Nq128 GQA 16/4", _ragged(8, 64, 1024, 1), 16, 4, 128, 128),
    _diversity_case("paper B256 N64 D1536", 256, 64, 1536),
]


# ----------------------------------------------------------------------------------------------------------
# What can run here
# ----------------------------------------------------------------------------------------------------------
def backends_here(op: str, device: torch.device) -> list[str]:
    """The backends worth checking on `device`: its dispatch candidates, the CUDA kernel while one is built, and
    Triton on CPU only under the interpreter."""
    names = list(_dispatch.CANDIDATES[op].get(device.type, ()))
    if device.type == "cuda" and "cuda" not in names and _ext.has_kernel(f"{op}_fwd", "CUDA"):
        names.insert(0, "cuda")
    if device.type == "cpu" and _ext.triton_interpreting() and "triton" not in names:
        names.append("triton")
    return names


def dtypes_here(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    return [torch.float32, torch.bfloat16, torch.float64]


def threshold(dtype: torch.dtype, device: torch.device) -> float:
    """Largest accepted max |error| / max |reference|, by the precision rule (tf32 for float32 on CUDA unless
    torch.get_float32_matmul_precision() is "highest")."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        return 1e-2 if tf32 else 1e-4
    return 6e-2 if dtype == torch.bfloat16 else 2e-2


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)


_REFERENCE_CACHE: dict = {}


def _reference_and_grads(case: Case, inputs: dict, leaves, grad_out, dtype):
    """The float64 reference on the same (rounded) inputs; the inputs are seeded, so one per case and dtype is
    computed (the diversity loss's depends on the backend's keep mask: never cached)."""
    key = (case.name, dtype, str(grad_out.device))
    if case.op != "diversity_loss" and key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    ref_inputs = dict(inputs, leaves=[t.detach().double().requires_grad_() for t in leaves])
    want = case.run(ref_inputs, "reference")
    result = (want.detach(), torch.autograd.grad(want, ref_inputs["leaves"], grad_out))
    if case.op != "diversity_loss":
        _REFERENCE_CACHE[key] = result
    return result


def check_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """(status, detail): status "ok", "FAIL" or "n/a" (a documented limit of the backend)."""
    reason = _dispatch.why_not(case.op, backend, device, dtype, **case.sizes)
    if reason is not None:
        return "n/a", reason
    inputs = case.make(dtype, device)
    leaves = [t.requires_grad_() for t in inputs["leaves"]]
    try:
        out = case.run(inputs, backend)
        grad_out = torch.randn(out.shape, generator=_gen(device), device=device, dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    except KernelLimitError as exc:
        return "n/a", f"limit: {exc}"
    want, want_grads = _reference_and_grads(case, inputs, leaves, grad_out, dtype)
    errors = [_relative_error(out, want)] + [_relative_error(g, w) for g, w in zip(grads, want_grads)]
    limit = threshold(dtype, device)
    detail = "fwd {:.1e}, grads {}".format(errors[0], " ".join(f"{e:.1e}" for e in errors[1:]))
    return ("ok" if max(errors) <= limit else "FAIL"), f"{detail} (limit {limit:.0e})"


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------
def check_compile(case: Case, device: torch.device, compile_backend: str) -> tuple[str, str]:
    dtype = torch.float32
    torch._dynamo.reset()
    inputs = case.make(dtype, device)
    leaves = [t.requires_grad_() for t in inputs["leaves"]]
    compiled = torch.compile(lambda *ts: case.run(dict(inputs, leaves=list(ts)), None), fullgraph=True,
                             backend=compile_backend)
    torch.manual_seed(1)
    eager_out = case.run(dict(inputs, leaves=leaves), None)
    eager_grads = torch.autograd.grad(eager_out.sum(), leaves)
    torch.manual_seed(1)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got.sum(), leaves)
    errors = [_relative_error(got, eager_out)] + [_relative_error(g, w) for g, w in zip(got_grads, eager_grads)]
    limit = threshold(dtype, device)
    return ("ok" if max(errors) <= limit else "FAIL"), f"max error vs eager {max(errors):.1e}"


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _fwd_bwd(fn, leaves):
    def run():
        out = fn()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return grads
    return run


def gemm_rate(device, dtype, repeat) -> float:
    """FLOP/s of one square GEMM here now (the compute floor's rate)."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device, repeat) / 1e3)


def _padded_sdpa(q, k, v, cu):
    lengths = cu.diff().tolist()
    B, H, Nq, d = q.shape
    lmax, Hk = max(lengths), k.shape[1]
    kp = k.new_zeros(B, Hk, lmax, d)
    vp = v.new_zeros(B, Hk, lmax, d)
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        kp[b, :, :n] = k.detach()[s:s + n].transpose(0, 1)
        vp[b, :, :n] = v.detach()[s:s + n].transpose(0, 1)
    kp.requires_grad_()
    vp.requires_grad_()
    mask = (torch.arange(lmax, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None])
    mask = mask[:, None, None, :]
    return (lambda: F.scaled_dot_product_attention(q, kp, vp, attn_mask=mask, enable_gqa=H != Hk)), [q, kp, vp]


def _xformers(q, k, v, cu):
    from xformers.ops import fmha

    B, H, Nq, d = q.shape
    lengths = cu.diff().tolist()
    bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=[Nq] * B, kv_seqlen=lengths)
    group = H // k.shape[1]

    def run():
        qp = q.transpose(1, 2).reshape(1, B * Nq, H, d)
        kp = k.repeat_interleave(group, 1)[None]
        vp = v.repeat_interleave(group, 1)[None]
        return fmha.memory_efficient_attention(qp, kp, vp, attn_bias=bias)
    return run, [q, k, v]


def time_case(case: Case, dtype: torch.dtype, device: torch.device, repeat: int) -> list[dict]:
    """Rows (what, ms, rate, x floor) for every runnable backend and baseline of `case`."""
    inputs = case.make(dtype, device)
    leaves = [t.requires_grad_() for t in inputs["leaves"]]
    rows = []
    if case.op == "aswp_pool":
        x, d, _ = leaves
        B, N, D = x.shape
        L = d.shape[0]
        x2, gp = x.detach().reshape(B * N, D), torch.randn(B * N, L, device=device).to(dtype)
        dd = d.detach()
        floor = median_ms(lambda: (x2 @ dd.t(), gp @ dd, gp.t() @ x2), device, repeat)
        work, unit = 3 * 2 * B * N * D * L, "TFLOP/s"
    elif case.op == "resampler_attention":
        q = leaves[0]
        B, H, Nq, d = q.shape
        T = leaves[1].shape[0]
        work, unit = 3.5 * 4 * H * Nq * d * T, "TFLOP/s"
        floor = work / gemm_rate(device, dtype, repeat) * 1e3
    else:
        (m,) = leaves
        md = m.detach()
        floor = median_ms(lambda: (md.sum(), md.clone()), device, repeat)
        work, unit = 3 * md.numel() * md.element_size(), "GB/s"
    rows.append(dict(what="floor", ms=floor))

    def add(what, fn, fn_leaves):
        try:
            rows.append(dict(what=what, ms=median_ms(_fwd_bwd(fn, fn_leaves), device, repeat)))
        except Exception as exc:  # noqa: BLE001 -- a baseline that cannot run here is reported, not fatal
            rows.append(dict(what=what, error=f"{type(exc).__name__}: {str(exc)[:80]}"))

    for backend in backends_here(case.op, device):
        if _dispatch.why_not(case.op, backend, device, dtype, **case.sizes) is None:
            add(backend, lambda b=backend: case.run(inputs, b), leaves)
    if not (device.type == "cuda" and case.op == "aswp_pool" and dtype == torch.float64):
        add("eager reference", lambda: case.run(dict(inputs), "reference"), leaves)
    if case.op == "resampler_attention":
        q, k, v = leaves
        add("padded SDPA", *_padded_sdpa(q, k, v, inputs["cu"]))
        if device.type == "cuda" and importlib.util.find_spec("xformers") is not None:
            add("xformers", *_xformers(q, k, v, inputs["cu"]))
    for row in rows:
        if "ms" in row:
            row["rate"] = f"{work / (row['ms'] / 1e3) / (1e12 if unit == 'TFLOP/s' else 1e9):.3g} {unit}"
            row["x_floor"] = row["ms"] / floor
    return rows


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), no GPU"
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("triton", "flash_attn", "xformers"):
        if importlib.util.find_spec(name) is not None:
            versions.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    return "\n".join([
        f"device: {where}",
        f"versions: {', '.join(versions)}, omniret_kernels {omniret_kernels.__version__}",
        f"extensions: _C {'built' if _ext.cpu_extension_built() else 'missing'}, _C_cuda "
        + (f"built for {', '.join(_ext.cuda_built_archs())}" if _ext.cuda_extension_built() else "not built"),
        f"float32 matmul precision: {torch.get_float32_matmul_precision()}; TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET', '0')}",
    ])


def plan_table(device: torch.device, cases: list[Case]) -> str:
    rows = []
    for op in OPS:
        sizes = next((c.sizes for c in reversed(cases) if c.op == op), {})
        for dtype in dtypes_here(device):
            with _quiet():
                plan = _dispatch.plan(op, device, dtype, **sizes)
            rows.append([op, DTYPE_NAMES[dtype], plan[0], " > ".join(plan[1:]) or "-"])
    return table(["op", "dtype", "uses", "then, if it fails at launch"], rows)


@contextlib.contextmanager
def _quiet():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniret_kernels.check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--shapes", choices=("small", "paper", "all"), default=None,
                        help="small: quick shapes; paper: the paper's; all: both (default: all on a GPU, small on CPU)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    parser.add_argument("--no-timing", action="store_true", help="skip the timing tables")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 20 on a GPU, 3 on CPU)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor on a GPU, "
                                                                "aot_eager on CPU)")
    parser.add_argument("--triton-compile-check", action="store_true",
                        help="also run the Triton compile check (omniret_kernels.compile_check) when present")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = args.shapes or ("all" if device.type == "cuda" else "small")
    cases = (SMALL if shapes in ("small", "all") else []) + (PAPER if shapes in ("paper", "all") else [])
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"--ops: unknown op(s) {unknown}; choose from {', '.join(OPS)}")
    cases = [c for c in cases if c.op in ops]
    repeat = args.repeat or (20 if device.type == "cuda" else 3)
    compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    failures = 0
    started = time.perf_counter()

    print(environment(device))
    print("\nbackend plan per op and dtype (the shapes of the last case checked):")
    print(plan_table(device, cases))

    print("\ncorrectness against the float64 reference (max |error| / max |reference|; fwd, then each input's grad):")
    rows = []
    for case in cases:
        for backend in backends_here(case.op, device):
            for dtype in dtypes_here(device):
                try:
                    status, detail = check_case(case, backend, dtype, device)
                except Exception as exc:  # noqa: BLE001 -- every failure is reported, then the next check runs
                    status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    if os.environ.get("OMNIRET_DEBUG") == "1":
                        traceback.print_exc()
                failures += status == "FAIL"
                rows.append([case.op, case.name, backend, DTYPE_NAMES[dtype], status, detail])
    print(table(["op", "case", "backend", "dtype", "status", "errors"], rows))

    print(f"\ntorch.compile(fullgraph=True, backend={compile_backend!r}) against eager, fp32, default backend:")
    rows = []
    for op in ops:
        case = next(c for c in cases if c.op == op)
        try:
            status, detail = check_compile(case, device, compile_backend)
        except Exception as exc:  # noqa: BLE001
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        failures += status == "FAIL"
        rows.append([op, case.name, status, detail])
    print(table(["op", "case", "status", "detail"], rows))

    if not args.no_timing:
        print(f"\nforward + backward, median of {repeat} (ms; rate; x floor):")
        rows = []
        for case in cases:
            for dtype in ([torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]):
                for row in time_case(case, dtype, device, repeat):
                    if "error" in row:
                        rows.append([case.op, case.name, DTYPE_NAMES[dtype], row["what"], "-", "-", row["error"]])
                    else:
                        rows.append([case.op, case.name, DTYPE_NAMES[dtype], row["what"], f"{row['ms']:.3f}",
                                     row["rate"], f"{row['x_floor']:.2f}"])
        print(table(["op", "case", "dtype", "what", "ms", "rate", "x floor"], rows))

    if args.triton_compile_check:
        print("\nTriton compile check (omniret_kernels.compile_check):")
        if importlib.util.find_spec("omniret_kernels.compile_check") is None:
            print("not present in this installation")
        else:
            failures += importlib.import_module("omniret_kernels.compile_check").main([]) != 0

    print(f"\n{'FAILED: ' + str(failures) + ' check(s)' if failures else 'all checks passed'} "
          f"({time.perf_counter() - started:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
