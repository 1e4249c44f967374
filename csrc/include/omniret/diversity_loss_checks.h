// Argument checks of omniret::diversity_loss_fwd / _bwd / _fwd_grad and diversity_keep_mask, shared by every
// backend's glue (CPU: csrc/cpu/diversity_loss.cpp; the CUDA glue can call the same functions). A direct
// dispatcher call with a bad argument gets a ValueError naming it (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/ATen.h>

namespace omniret {

inline void check_diversity_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.defined() && seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                    ": seed must be a one-element int64 tensor");
}

// m (B, N, D) floating, non-empty; B and N fit the 32-bit Philox counter, N^2 pair indices fit int32;
// p in [0, 1), gamma > 0.
inline void check_diversity_loss_args(const at::Tensor& m, const at::Tensor& seed, double p, double gamma) {
  TORCH_CHECK_VALUE(m.defined() && m.dim() == 3, "diversity_loss: m must have shape (B, N, D), got ",
                    m.defined() ? m.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(at::isFloatingType(m.scalar_type()), "diversity_loss: m must be floating point, got ",
                    m.scalar_type());
  TORCH_CHECK_VALUE(m.size(0) > 0 && m.size(1) > 0 && m.size(2) > 0,
                    "diversity_loss: m must be non-empty, got shape ", m.sizes());
  TORCH_CHECK_VALUE(m.size(1) <= (int64_t(1) << 31) && m.size(0) <= (int64_t(1) << 32),
                    "diversity_loss: B and N must fit the 32-bit Philox counter");
  TORCH_CHECK_VALUE(m.size(1) <= 46340, "diversity_loss: N must be <= 46340 (N^2 pair indices fit int32), got ",
                    m.size(1));
  check_diversity_seed("diversity_loss", seed);
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "diversity_loss: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(gamma > 0.0, "diversity_loss: gamma must be > 0, got ", gamma);
}

// The backward's incoming gradient: a one-element floating tensor.
inline void check_diversity_loss_grad(const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(grad_loss.defined() && grad_loss.numel() == 1, "diversity_loss: grad must be a scalar, got ",
                    grad_loss.defined() ? grad_loss.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(at::isFloatingType(grad_loss.scalar_type()), "diversity_loss: grad must be floating point, got ",
                    grad_loss.scalar_type());
}

// batch and n in the 32-bit Philox counter's range (the mask is (batch, n, n) bool), p in [0, 1).
inline void check_diversity_keep_mask_args(const at::Tensor& seed, int64_t batch, int64_t n, double p) {
  TORCH_CHECK_VALUE(batch >= 0 && n >= 0, "diversity_keep_mask: batch and n must be >= 0, got ", batch, " and ", n);
  TORCH_CHECK_VALUE(batch <= (int64_t(1) << 32) && n <= (int64_t(1) << 31),
                    "diversity_keep_mask: batch and n must fit the 32-bit Philox counter, got ", batch, " and ", n);
  check_diversity_seed("diversity_keep_mask", seed);
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "diversity_keep_mask: p must be in [0, 1), got ", p);
}

}  // namespace omniret
