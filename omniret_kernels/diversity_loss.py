"""diversity_loss: the dropout-masked diversity loss of Eq. 5-6 (SPEC section 3).

Every backend draws the keep mask from Philox4x32-10 keyed by a seed taken from `generator` (or torch's default
generator) and the pair index (b, i, j) (omniret_kernels/_counter_rng.py). The seed travels as a 0-dim int64
tensor: forward and backward regenerate the mask from it instead of storing it, restoring the generator's state
replays it, and torch.compile traces it without a graph break.

Ops: omniret::diversity_loss_fwd / _bwd and omniret::diversity_keep_mask (C++, csrc/cpu/diversity_loss.cpp),
omniret::diversity_loss_triton_fwd / _bwd and omniret::diversity_keep_mask_triton (Python custom ops around
omniret_kernels/triton/diversity_loss.py). Fake kernels and the autograd formula are registered here, once,
through omniret_kernels/_op.py.

On CPU tensors that need a gradient (eager mode), the loss goes through omniret::diversity_loss_fwd_grad instead:
one pass over m computes the loss and its gradient together (the mask drawn and m read once per step instead of
twice), the gradient is kept on the autograd node and handed over in backward (`_CpuLossWithGrad`).
"""
from __future__ import annotations

from typing import Optional

import torch

from omniret_kernels import _ext, reference
from omniret_kernels._checks import FLOAT_DTYPES, check_tensor
from omniret_kernels._checks import check_finite as _check_finite
from omniret_kernels._counter_rng import draw_seed, keep_mask, keep_threshold
from omniret_kernels._dispatch import plan, run
from omniret_kernels._op import define, define_pair, reference_dtype

__all__ = ["diversity_loss"]


# ----------------------------------------------------------------------------------------------------------
# omniret::diversity_loss_fwd / _bwd (C++ CPU and CUDA kernels) and the Triton pair, registered by
# _op.define_pair with one fake kernel per direction and one backward formula; the keep-mask ops by _op.define.
# ----------------------------------------------------------------------------------------------------------
FWD_SCHEMA = "(Tensor m, Tensor seed, float p, float gamma, bool normalize) -> Tensor"
BWD_SCHEMA = "(Tensor grad, Tensor m, Tensor seed, float p, float gamma, bool normalize) -> Tensor"
KEEP_MASK_SCHEMA = "(Tensor seed, SymInt batch, SymInt n, float p) -> Tensor"


def _fwd_fake(m, seed, p, gamma, normalize):
    return m.new_empty(())


def _bwd_fake(grad, m, seed, p, gamma, normalize):
    return torch.empty_like(m)


def _keep_mask_fake(seed, batch, n, p):
    return seed.new_empty((batch, n, n), dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    m, seed, p, gamma, normalize = inputs
    ctx.save_for_backward(m, seed)  # the mask is regenerated from the seed, never saved
    ctx.args = (p, gamma, normalize)


def _backward(ctx, bwd_op, grad):
    m, seed = ctx.saved_tensors
    grad_m = bwd_op(grad, m, seed, *ctx.args) if ctx.needs_input_grad[0] else None
    return grad_m, None, None, None, None


def _triton_fwd(m, seed, p, gamma, normalize):
    from omniret_kernels.triton.diversity_loss import diversity_loss_forward
    return diversity_loss_forward(m, seed, keep_threshold(p), p, gamma, normalize)


def _triton_bwd(grad, m, seed, p, gamma, normalize):
    from omniret_kernels.triton.diversity_loss import diversity_loss_backward
    return diversity_loss_backward(grad, m, seed, keep_threshold(p), p, gamma, normalize)


def _triton_keep_mask(seed, batch, n, p):
    from omniret_kernels.triton.diversity_loss import diversity_keep_mask
    return diversity_keep_mask(seed, batch, n, keep_threshold(p))


OPS = define_pair("diversity_loss", fwd_schema=FWD_SCHEMA, bwd_schema=BWD_SCHEMA, fwd_fake=_fwd_fake,
                  bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward, triton_fwd=_triton_fwd,
                  triton_bwd=_triton_bwd)
KEEP_MASK = define("diversity_keep_mask", KEEP_MASK_SCHEMA, _keep_mask_fake, triton_name="diversity_keep_mask_triton",
                   triton_impl=_triton_keep_mask)


def _fwd_grad_fake(m, seed, p, gamma, normalize):
    return m.new_empty(()), torch.empty_like(m)


# CPU only: the loss and its gradient in one pass (no Triton variant).
define("diversity_loss_fwd_grad", "(Tensor m, Tensor seed, float p, float gamma, bool normalize) -> (Tensor, Tensor)",
       _fwd_grad_fake)
_HAS_FUSED_CPU = _ext.cpu_extension_built() and _ext.has_kernel("diversity_loss_fwd_grad", "CPU")


class _CpuLossWithGrad(torch.autograd.Function):
    """The loss of omniret::diversity_loss_fwd_grad, whose gradient (grad_out = 1) was computed in the forward.

    The node holds that gradient (the size of m) until backward hands it over: scaled in place by grad_out (a
    no-op for the usual 1) and returned, so AccumulateGrad takes it as m.grad without a copy; peak memory is
    the same as computing it in backward. A second backward through a retained graph recomputes it with
    omniret::diversity_loss_bwd. Not twice differentiable (neither is the op pair)."""

    @staticmethod
    def forward(ctx, m, seed, p, gamma, normalize):
        loss, grad_m = torch.ops.omniret.diversity_loss_fwd_grad(m, seed, p, gamma, normalize)
        ctx.save_for_backward(m, seed)
        ctx.args = (p, gamma, normalize)
        ctx.grad_m = grad_m
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad_m = getattr(ctx, "grad_m", None)
        ctx.grad_m = None  # the node lets go of it: m.grad becomes this very tensor
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if grad_m is None:  # a second backward through a retained graph
            m, seed = ctx.saved_tensors
            return torch.ops.omniret.diversity_loss_bwd(grad, m, seed, *ctx.args), None, None, None, None
        if grad.item() != 1.0:
            grad_m.mul_(grad.to(grad_m.dtype))
        return grad_m, None, None, None, None


def _use_fused_cpu_gradient(m: torch.Tensor) -> bool:
    return (m.requires_grad and torch.is_grad_enabled() and m.device.type == "cpu"
            and not torch.compiler.is_compiling() and _HAS_FUSED_CPU)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def _check_args(m, p, gamma):
    check_tensor("m", m, ndim=3, dtypes=FLOAT_DTYPES)
    if m.numel() == 0:
        raise ValueError(f"m must be non-empty (B, N, D all > 0), got shape {tuple(m.shape)}")
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    if not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a number > 0, got {gamma!r}")


def _reference_loss(m, seed, p, gamma, normalize):
    B, N, _ = m.shape
    keep = keep_mask(seed, B, N, p) if p > 0 else None
    mc = m.to(reference_dtype(m.dtype))
    return reference.diversity_loss(mc, keep, p=p, gamma=gamma, normalize=normalize).to(m.dtype)


def diversity_loss(m: torch.Tensor, *, p: float = 0.9, gamma: float = 0.5, normalize: bool = True,
                   generator: Optional[torch.Generator] = None, return_keep_mask: bool = False,
                   check_finite: bool = False, backend: Optional[str] = None):
    """m (B, N, D) -> scalar loss in m's dtype (SPEC section 3).

    keep[b, i, j] ~ Bernoulli(1 - p) from Philox keyed by a seed drawn from `generator` (torch's default
    generator of m's device when None); restoring that generator's state replays the mask.
    `return_keep_mask=True` returns (loss, keep) with keep the (B, N, N) bool mask as the chosen backend's own
    generator produces it. `check_finite=True` raises on NaN/Inf in m before any kernel runs (the CPU
    kernel also raises on non-finite or, with normalize=True, zero tokens on its own)."""
    _check_args(m, p, gamma)
    if check_finite:
        _check_finite("m", m)
    p, gamma, normalize = float(p), float(gamma), bool(normalize)
    B, N, D = m.shape
    sizes = dict(B=B, N=N, D=D)
    backends = plan("diversity_loss", m.device, m.dtype, backend, **sizes)
    if p > 0:
        seed = draw_seed(generator, m.device).to(m.device)
    else:  # no dropout: leave the generator untouched, so p = 0 does not shift anyone else's random stream
        seed = torch.zeros((), dtype=torch.int64, device=m.device)

    def call(chosen: str):
        if chosen == "reference":
            return _reference_loss(m, seed, p, gamma, normalize), keep_mask
        if chosen == "cpu" and _use_fused_cpu_gradient(m):
            return _CpuLossWithGrad.apply(m, seed, p, gamma, normalize), KEEP_MASK.native
        return OPS.fwd.get(chosen)(m, seed, p, gamma, normalize), KEEP_MASK.get(chosen)

    loss, keep_fn = run("diversity_loss", backends, call, device=m.device, dtype=m.dtype, **sizes)
    if return_keep_mask:
        return loss, keep_fn(seed, B, N, p)
    return loss
