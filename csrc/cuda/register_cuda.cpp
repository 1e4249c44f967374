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
    bool normalize_directions, double temperature) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int code = aswp_pooling_code(pooling);
  TORCH_CHECK_VALUE(code != 3 || weights.has_value(), "weights: pooling='weighted' needs weights");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = directions.size(0), M = references.size(0);
  AswpPrepared P = aswp_prepare(x, directions, references, mask, weights, code == 3, normalize_directions);
  at::Tensor proj = at::mm(x.to(at::kFloat).reshape({B * N, D}), P.theta.t()).contiguous();
  at::Tensor out = at::empty({B, L}, x.options().dtype(at::kFloat));
  at::Tensor sorted = at::empty({B, N, L}, x.options().dtype(at::kFloat));
  const bool rank_u8 = N <= 256;
  at::Tensor sorted_tokens = at::empty({B, N, L}, x.options().dtype(rank_u8 ? at::kByte : at::kInt));
  C10_CUDA_CHECK(cuda::aswp_pool_forward(
      proj.data_ptr<float>(), P.valid.defined() ? P.valid.data_ptr<uint8_t>() : nullptr, P.n_valid.data_ptr<int>(),
      P.ref_sorted.data_ptr<float>(), code == 3 ? P.weight_sorted.data_ptr<float>() : nullptr, int(B), int(N),
      int(L), int(M), code, out.data_ptr<float>(), sorted.data_ptr<float>(), sorted_tokens.data_ptr(), rank_u8,
      c10::cuda::getCurrentCUDAStream()));
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

TORCH_LIBRARY_IMPL(omniret, CUDA, m) {
  // ---- aswp_pool ----
  m.impl("aswp_pool_fwd", &omniret::aswp_pool_fwd_cuda);
  m.impl("aswp_pool_bwd", &omniret::aswp_pool_bwd_cuda);

  // ---- resampler_attention ----
  m.impl("resampler_attention_fwd", &omniret::resampler_cuda::fwd);
  m.impl("resampler_attention_bwd", &omniret::resampler_cuda::bwd);

  // ---- diversity_loss ----
}
