"""The one rule for every tl.dot in omniret_kernels/triton: matmuls run at the input's precision, on tensor cores.

- float16 / bfloat16: the operands stay 16-bit into tl.dot, which accumulates in float32 (mma / wgmma).
- float32: tf32 tensor cores when torch.get_float32_matmul_precision() is "high" or "medium" (torch's own switch
  for its matmuls, so a user who allows tf32 there gets it here too); "ieee" (exact fp32 FMA) for "highest".
- float64: "ieee", float64 accumulation (no tensor-core path in Triton for fp64).

Launchers call `dot_precision(dtype)` and pass the three fields as constexprs (OPERAND, PRECISION, ACC).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton.language as tl


class DotPrecision(NamedTuple):
    operand: tl.dtype  # what tiles are converted to right before tl.dot
    input_precision: str  # tl.dot's input_precision ("tf32" or "ieee"; 16-bit operands ignore it)
    acc: tl.dtype  # the accumulator and the dtype the kernel's other arithmetic uses
    torch_acc: torch.dtype  # acc as a torch dtype (buffers the launcher allocates, e.g. lse)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> DotPrecision:
    if dtype == torch.float64:
        return DotPrecision(tl.float64, "ieee", tl.float64, torch.float64)
    tf32 = torch.get_float32_matmul_precision() != "highest"
    precision = "tf32" if tf32 else "ieee"
    if dtype in (torch.float16, torch.bfloat16) and _interpreting():
        # The interpreter stores bfloat16 as raw uint16 and its tl.dot is a numpy matmul on that storage, so
        # 16-bit operands give wrong numbers there. Under TRITON_INTERPRET (CPU tests only) the tiles are widened
        # to float32 after the load; compiled kernels keep them 16-bit.
        return DotPrecision(tl.float32, precision, tl.float32, torch.float32)
    return DotPrecision(_TL.get(dtype, tl.float32), precision, tl.float32, torch.float32)
