// The one CUDA glue file: wraps the raw-pointer launchers of csrc/cuda/*.cu as torch ops for the CUDA key.
// The .cu files include no torch headers, so only this file pays for them.
#include <torch/library.h>

#include "omniret/py_module.h"
#include "resampler_attention_glue.h"  // resampler_attention: csrc/cuda/resampler_attention.cu
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

// ---- aswp_pool: cuBLAS projection + csrc/cuda/aswp_pool.cu (sort, couple, pool) ----
#include "aswp_pool.h"

namespace omniret {
namespace {

int aswp_pooling_code(c10::string_view pooling) {
  if (pooling == "stm") return 0;
  if (pooling == "max") return 1;
  if (pooling == "mean") return 2;
  if (pooling == "weighted") return 3;
  TORCH_CHECK_VALUE(false, "pooling must be one of stm, max, mean, weighted, got ", pooling);
  return 0;
}

// The inputs both directions share: float32 theta, references sorted per column (rank order) with the index j
// of each rank, weights in rank order, the mask as uint8 and each sample's count of valid tokens.
struct AswpPrepared {
  at::Tensor theta, inv_norm, ref_sorted, order, order32, weight_sorted, valid, n_valid;
};

AswpPrepared aswp_prepare(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
                          const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights,
                          bool weighted, bool normalize_directions) {
  TORCH_CHECK_VALUE(x.scalar_type() != at::kDouble, "x: float64 runs on the cpu backend only");
  AswpPrepared P;
  at::Tensor d = directions.to(at::kFloat).contiguous();
  if (normalize_directions) {
    P.inv_norm = d.norm(2, {1}, true).reciprocal();
    P.theta = d * P.inv_norm;
  } else {
    P.theta = d;
  }
  auto sorted = at::sort(references.to(at::kFloat), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  P.ref_sorted = std::get<0>(sorted).contiguous();
  P.order = std::get<1>(sorted).contiguous();
  P.order32 = P.order.to(at::kInt);
  if (weighted) P.weight_sorted = weights->to(at::kFloat).gather(0, P.order).contiguous();
  if (mask.has_value()) {
    P.valid = mask->to(at::kByte).contiguous();
    P.n_valid = mask->sum(1).to(at::kInt);
  } else {
    P.n_valid = at::full({x.size(0)}, x.size(1), x.options().dtype(at::kInt));
  }
  return P;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aswp_pool_fwd_cuda(
    const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, c10::string_view pooling,
    bool normalize_directions, double temperature, bool save_for_backward) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = aswp_pooling_code(pooling);
  TORCH_CHECK_VALUE(code != 3 || weights.has_value(), "weights: pooling='weighted' needs weights");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = directions.size(0), M = references.size(0);
  AswpPrepared P = aswp_prepare(x, directions, references, mask, weights, code == 3, normalize_directions);
  at::Tensor proj = at::mm(x.to(at::kFloat).reshape({B * N, D}), P.theta.t()).contiguous();
  at::Tensor out = at::empty({B, L}, x.options().dtype(at::kFloat));
  const bool rank_u8 = N <= 256;
  // Without save_for_backward the saved slots are empty (the schema's contract) and the kernel writes only out.
  const std::vector<int64_t> saved_shape = save_for_backward ? std::vector<int64_t>{B, N, L} : std::vector<int64_t>{0};
  at::Tensor sorted = at::empty(saved_shape, x.options().dtype(at::kFloat));
  at::Tensor sorted_tokens = at::empty(saved_shape, x.options().dtype(rank_u8 ? at::kByte : at::kInt));
  C10_CUDA_CHECK(cuda::aswp_pool_forward(
      proj.data_ptr<float>(), P.valid.defined() ? P.valid.data_ptr<uint8_t>() : nullptr, P.n_valid.data_ptr<int>(),
      P.ref_sorted.data_ptr<float>(), code == 3 ? P.weight_sorted.data_ptr<float>() : nullptr, int(B), int(N),
      int(L), int(M), code, out.data_ptr<float>(), save_for_backward ? sorted.data_ptr<float>() : nullptr,
      save_for_backward ? sorted_tokens.data_ptr() : nullptr, rank_u8, c10::cuda::getCurrentCUDAStream()));
  return {out.to(x.scalar_type()), sorted, sorted_tokens};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aswp_pool_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, const at::Tensor& sorted,
    const at::Tensor& sorted_tokens, c10::string_view pooling, bool normalize_directions, double temperature,
    bool need_x, bool need_directions) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = aswp_pooling_code(pooling);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = directions.size(0), M = references.size(0);
  AswpPrepared P = aswp_prepare(x, directions, references, mask, weights, code == 3, normalize_directions);
  at::Tensor g = grad_out.to(at::kFloat).contiguous();
  at::Tensor s = sorted.contiguous(), tr = sorted_tokens.contiguous();
  at::Tensor dp = at::zeros({B * N, L}, sorted.options());
  at::Tensor dref_s = at::empty({M, L}, sorted.options());
  at::Tensor dw_s = code == 3 ? at::empty({M, L}, sorted.options()) : at::Tensor();
  C10_CUDA_CHECK(cuda::aswp_pool_backward(
      g.data_ptr<float>(), P.valid.defined() ? P.valid.data_ptr<uint8_t>() : nullptr, P.n_valid.data_ptr<int>(),
      P.ref_sorted.data_ptr<float>(), P.order32.data_ptr<int>(),
      code == 3 ? P.weight_sorted.data_ptr<float>() : nullptr, s.data_ptr<float>(), tr.data_ptr(),
      tr.scalar_type() == at::kByte, int(B), int(N), int(L), int(M), code, float(1.0 / temperature),
      dp.data_ptr<float>(), dref_s.data_ptr<float>(), code == 3 ? dw_s.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  at::Tensor gx = need_x ? at::mm(dp, P.theta).view({B, N, D}).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor gd = at::empty({0}, directions.options());
  if (need_directions) {
    at::Tensor dtheta = at::mm(dp.t(), x.to(at::kFloat).reshape({B * N, D}));
    if (normalize_directions) dtheta = (dtheta - P.theta * (dtheta * P.theta).sum(1, true)) * P.inv_norm;
    gd = dtheta.to(directions.scalar_type());
  }
  at::Tensor gr = at::empty_like(dref_s).scatter_(0, P.order, dref_s).to(references.scalar_type());
  at::Tensor gw = code == 3 ? at::empty_like(dw_s).scatter_(0, P.order, dw_s).to(weights->scalar_type())
                            : at::empty({0}, references.options());
  return {gx, gd, gr, gw};
}

}  // namespace
}  // namespace omniret

// ---- diversity_loss: csrc/cuda/diversity_loss.cu (compiled, never run on the development machine) ----
#include "diversity_loss.h"
#include "omniret/counter_rng.h"

namespace omniret {
namespace {

void diversity_check_cuda(const at::Tensor& m, const at::Tensor& seed, double p, double gamma) {
  TORCH_CHECK_VALUE(m.dim() == 3, "diversity_loss: m must have shape (B, N, D), got ", m.sizes());
  TORCH_CHECK_VALUE(m.scalar_type() != at::kDouble, "diversity_loss: m: float64 runs on the cpu backend only");
  TORCH_CHECK_VALUE(at::isFloatingType(m.scalar_type()), "diversity_loss: m must be floating point");
  TORCH_CHECK_VALUE(m.numel() > 0, "diversity_loss: m must be non-empty, got shape ", m.sizes());
  TORCH_CHECK_VALUE(m.size(1) <= cuda::kDiversityMaxN, "diversity_loss: the CUDA kernel supports N <= ",
                    cuda::kDiversityMaxN, ", got ", m.size(1));
  TORCH_CHECK_VALUE(m.numel() < (int64_t(1) << 31) && m.size(0) * m.size(1) < (int64_t(1) << 31),
                    "diversity_loss: m is too large for the CUDA kernel's 32-bit indexing");
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == m.device(),
                    "diversity_loss: seed must be a one-element int64 tensor on m's device");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "diversity_loss: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(gamma > 0.0, "diversity_loss: gamma must be > 0, got ", gamma);
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
  TORCH_CHECK_VALUE(grad.numel() == 1, "diversity_loss: grad must be a scalar, got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(m.device());
  const int64_t B = m.size(0), N = m.size(1), D = m.size(2);
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
  TORCH_CHECK_VALUE(batch >= 0 && n >= 0, "diversity_keep_mask: batch and n must be >= 0");
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "diversity_keep_mask: seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "diversity_keep_mask: p must be in [0, 1), got ", p);
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
  // ---- aswp_pool ----
  m.impl("aswp_pool_fwd", &omniret::aswp_pool_fwd_cuda);
  m.impl("aswp_pool_bwd", &omniret::aswp_pool_bwd_cuda);

  // ---- resampler_attention ----
  m.impl("resampler_attention_fwd", &omniret::resampler_cuda::fwd);
  m.impl("resampler_attention_bwd", &omniret::resampler_cuda::bwd);

  // ---- diversity_loss ----
  m.impl("diversity_loss_fwd", &omniret::diversity_loss_fwd_cuda);
  m.impl("diversity_loss_bwd", &omniret::diversity_loss_bwd_cuda);
  m.impl("diversity_keep_mask", &omniret::diversity_keep_mask_cuda);
}
