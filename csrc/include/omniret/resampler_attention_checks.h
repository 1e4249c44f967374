// Argument checks of omniret::resampler_attention_fwd / _bwd, shared by every backend's glue (CPU:
// csrc/cpu/resampler_attention.cpp; the CUDA glue can call the same functions). A direct dispatcher call with a
// bad argument gets a ValueError naming it (TORCH_CHECK_VALUE), never an out-of-bounds read or an abort.
// cu_seqlens is read on the host (a copy, one sync, when it lives on a GPU).
#pragma once

#include <ATen/ATen.h>

#include <climits>

namespace omniret {
namespace resampler {

inline void check_resampler_attention_float(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.defined(), "resampler_attention: ", name, " is undefined");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "resampler_attention: ", name,
                    " must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "resampler_attention: ", name, " must be on q's device ", q.device(),
                    ", got ", t.device());
}

// q (B, H, Nq, d), k and v (T, Hk, d) packed, H a multiple of Hk, d > 0, cu_seqlens int32 (B + 1,) running
// strictly increasing from 0 to T. The kernels pass G * Nq, d and Hk * d to 32-bit BLAS arguments.
inline void check_resampler_attention_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& cu_seqlens) {
  check_resampler_attention_float("q", q, q);
  check_resampler_attention_float("k", k, q);
  check_resampler_attention_float("v", v, q);
  TORCH_CHECK_VALUE(q.dim() == 4, "resampler_attention: q must be (B, H, Nq, d), got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(2) == q.size(3), "resampler_attention: k must be (T, Hk, d) with d = ",
                    q.size(3), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "resampler_attention: v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "resampler_attention: q heads (", q.size(1),
                    ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(q.size(3) > 0, "resampler_attention: the head dimension d must be > 0, got q ", q.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "resampler_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  const int64_t group_rows = (q.size(1) / k.size(1)) * q.size(2), kv_row = k.size(1) * q.size(3);
  TORCH_CHECK_VALUE(group_rows <= INT_MAX && kv_row <= INT_MAX,
                    "resampler_attention: (H / Hk) * Nq and Hk * d must fit 32 bits (BLAS sizes), got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.defined() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                        cu_seqlens.size(0) == q.size(0) + 1,
                    "resampler_attention: cu_seqlens must be int32 of shape (B + 1,) = (", q.size(0) + 1, ",)");
  const at::Tensor cu = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0 && c[q.size(0)] == k.size(0), "resampler_attention: cu_seqlens must run from 0 to T = ",
                    k.size(0), ", got ", c[0], " .. ", c[q.size(0)]);
  for (int64_t b = 0; b < q.size(0); ++b)
    TORCH_CHECK_VALUE(c[b + 1] > c[b], "resampler_attention: cu_seqlens must be strictly increasing (sample ", b,
                      " has no keys)");
}

// The backward's extra inputs: grad_out and out of q's shape, lse (B, H, Nq).
inline void check_resampler_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                               const at::Tensor& cu_seqlens) {
  check_resampler_attention_fwd_args(q, k, v, cu_seqlens);
  check_resampler_attention_float("grad_out", grad_out, q);
  check_resampler_attention_float("out", out, q);
  check_resampler_attention_float("lse", lse, q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "resampler_attention_bwd: grad_out and out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    "resampler_attention_bwd: lse must be (B, H, Nq) = (", q.size(0), ", ", q.size(1), ", ",
                    q.size(2), "), got ", lse.sizes());
}

}  // namespace resampler
}  // namespace omniret
