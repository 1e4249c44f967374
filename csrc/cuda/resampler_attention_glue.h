// Torch glue of the resampler_attention CUDA launchers, included once by csrc/cuda/register_cuda.cpp (kept in its
// own header so the shared glue file only gains an include and two m.impl lines).
// COMPILED HERE, NEVER RUN: there is no GPU on the machine this was written on.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "resampler_attention.h"

namespace omniret {
namespace resampler_cuda {

inline void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 3 && k.size(2) == q.size(3) && v.sizes() == k.sizes(),
                    "resampler_attention: q must be (B, H, Nq, d) and k, v (T, Hk, d)");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "resampler_attention: q heads (", q.size(1),
                    ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(q.scalar_type() != at::kDouble, "resampler_attention: float64 runs on the cpu backend only");
  TORCH_CHECK_VALUE(q.size(3) <= cuda::kResamplerMaxHeadDim, "resampler_attention: the CUDA kernel takes d <= ",
                    cuda::kResamplerMaxHeadDim, ", got ", q.size(3), " (use backend='triton')");
  TORCH_CHECK_VALUE(q.size(2) <= 1024, "resampler_attention: the CUDA kernel takes Nq <= 1024, got ", q.size(2));
  TORCH_CHECK_VALUE(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                        cu_seqlens.size(0) == q.size(0) + 1,
                    "resampler_attention: cu_seqlens must be int32 of shape (B + 1,)");
}

inline std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens, double scale) {
  check_cuda_inputs(q, k, v, cu_seqlens);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous();
  const auto vf = v.to(at::kFloat).contiguous(), cu = cu_seqlens.contiguous();
  auto out = at::empty(qf.sizes(), qf.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, qf.options());
  C10_CUDA_CHECK(cuda::resampler_attention_forward(
      qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), cu.data_ptr<int>(), int(q.size(0)),
      int(q.size(1)), int(k.size(1)), int(q.size(2)), int(q.size(3)), float(scale), out.data_ptr<float>(),
      lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {out.to(q.scalar_type()), lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& out, const at::Tensor& lse,
                                                          const at::Tensor& cu_seqlens, double scale) {
  check_cuda_inputs(q, k, v, cu_seqlens);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous();
  const auto vf = v.to(at::kFloat).contiguous(), dof = grad_out.to(at::kFloat).contiguous();
  const auto lsef = lse.to(at::kFloat).contiguous(), cu = cu_seqlens.contiguous();
  const auto delta = (dof * out.to(at::kFloat)).sum(-1).contiguous();
  auto dq = at::empty(qf.sizes(), qf.options());
  auto dk = at::zeros(kf.sizes(), kf.options());
  auto dv = at::zeros(vf.sizes(), vf.options());
  C10_CUDA_CHECK(cuda::resampler_attention_backward(
      dof.data_ptr<float>(), qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), lsef.data_ptr<float>(),
      delta.data_ptr<float>(), cu.data_ptr<int>(), int(q.size(0)), int(q.size(1)), int(k.size(1)), int(q.size(2)),
      int(q.size(3)), float(scale), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace resampler_cuda
}  // namespace omniret
