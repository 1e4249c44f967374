// Torch glue of diversity_loss for the CUDA key: csrc/cuda/diversity_loss.cu. COMPILED ONLY: never run on the
// development machine (no GPU).
#include <torch/library.h>

#include <string>

#include "cuda_glue.h"
#include "diversity_loss.h"
#include "omniret/counter_rng.h"
#include "omniret/diversity_loss_checks.h"

namespace omniret {
namespace {

// The checks every backend shares, then what only the CUDA kernels limit: float32 compute and 32-bit indexing.
void diversity_check_cuda(const at::Tensor& m, const at::Tensor& seed, double p, double gamma) {
  check_diversity_loss_args(m, seed, p, gamma);
  TORCH_CHECK_VALUE(seed.device() == m.device(), "diversity_loss: seed must be on m's device ", m.device(),
                    ", got ", seed.device());
  TORCH_CHECK_VALUE(m.scalar_type() != at::kDouble, "diversity_loss: m: float64 runs on the cpu backend only");
  TORCH_CHECK_VALUE(m.numel() < (int64_t(1) << 31) && m.size(0) * m.size(1) < (int64_t(1) << 31),
                    "diversity_loss: m is too large for the CUDA kernel's 32-bit indexing");
}

at::Tensor diversity_loss_fwd_cuda(const at::Tensor& m, const at::Tensor& seed, double p, double gamma,
                                   bool normalize) {
  diversity_check_cuda(m, seed, p, gamma);
  const c10::cuda::CUDAGuard guard(m.device());
  const int64_t B = m.size(0), N = m.size(1), D = m.size(2);
  const at::Tensor mc = m.to(at::kFloat).contiguous();
  const at::Tensor seed_c = seed.reshape({1}).contiguous();
  at::Tensor inv_norm = at::empty({B * N}, mc.options());
  at::Tensor partial = at::empty({B * N}, mc.options());
  C10_CUDA_CHECK(cuda::diversity_loss_forward(
      mc.data_ptr<float>(), seed_c.data_ptr<int64_t>(), int(B), int(N), int(D), keep_threshold(p),
      float(1.0 / (1.0 - p)), float(gamma), normalize, inv_norm.data_ptr<float>(), partial.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  const double count = double(B) * double(N) * double(N);
  return (partial.sum(at::kDouble) / count).to(m.scalar_type());
}

at::Tensor diversity_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& m, const at::Tensor& seed, double p,
                                   double gamma, bool normalize) {
  diversity_check_cuda(m, seed, p, gamma);
  check_diversity_loss_grad(grad);
  const c10::cuda::CUDAGuard guard(m.device());
  const int64_t B = m.size(0), N = m.size(1), D = m.size(2);
  // The backward keeps one row of N coefficients in shared memory: refuse an N past the device's limit here,
  // before launch, rather than fail inside the launch.
  cuda::check_shared_memory_fits("diversity_loss backward", "N=" + std::to_string(N),
                                 cuda::diversity_loss_backward_shared_bytes(int(N)));
  const at::Tensor mc = m.to(at::kFloat).contiguous();
  const at::Tensor seed_c = seed.reshape({1}).contiguous();
  const at::Tensor grad_c = grad.to(mc.options()).reshape({1}).contiguous();
  at::Tensor inv_norm = at::empty({B * N}, mc.options());
  at::Tensor grad_m = at::empty_like(mc);
  C10_CUDA_CHECK(cuda::diversity_loss_backward(
      grad_c.data_ptr<float>(), mc.data_ptr<float>(), seed_c.data_ptr<int64_t>(), int(B), int(N), int(D),
      keep_threshold(p), float(1.0 / (1.0 - p)), float(gamma), normalize,
      float(1.0 / (double(B) * double(N) * double(N))), inv_norm.data_ptr<float>(), grad_m.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  return grad_m.to(m.scalar_type());
}

at::Tensor diversity_keep_mask_cuda(const at::Tensor& seed, int64_t batch, int64_t n, double p) {
  check_diversity_keep_mask_args(seed, batch, n, p);
  TORCH_CHECK_VALUE(n <= 46340 && batch * n * n < (int64_t(1) << 38),
                    "diversity_keep_mask: the CUDA kernel takes n <= 46340 and batch * n^2 < 2^38 (its grid), got n=",
                    n, ", batch=", batch);
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor seed_c = seed.reshape({1}).contiguous();
  at::Tensor keep = at::empty({batch, n, n}, seed.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::diversity_keep_mask(seed_c.data_ptr<int64_t>(), int(batch), int(n), keep_threshold(p),
                                           keep.data_ptr<uint8_t>(), c10::cuda::getCurrentCUDAStream()));
  return keep.to(at::kBool);
}

}  // namespace
}  // namespace omniret

TORCH_LIBRARY_IMPL(omniret, CUDA, m) {
  m.impl("diversity_loss_fwd", &omniret::diversity_loss_fwd_cuda);
  m.impl("diversity_loss_bwd", &omniret::diversity_loss_bwd_cuda);
  m.impl("diversity_keep_mask", &omniret::diversity_keep_mask_cuda);
}
