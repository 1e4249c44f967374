// Torch glue of aswp_pool for the CUDA key: cuBLAS projection (at::mm) + the sort/couple/pool kernels of
// csrc/cuda/aswp_pool.cu, and the backward's two GEMMs. COMPILED ONLY: never run on the development machine.
#include <torch/library.h>

#include <string>

#include "aswp_pool.h"
#include "cuda_glue.h"
#include "omniret/aswp_pool_checks.h"

namespace omniret {
namespace {

std::string aswp_shape(int64_t N, int64_t M) {
  return "N=" + std::to_string(N) + " tokens, M=" + std::to_string(M) + " references";
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
  TORCH_CHECK_VALUE(x.size(0) < (int64_t(1) << 16) && x.size(1) < (int64_t(1) << 24) &&
                        directions.size(0) < (int64_t(1) << 30) && references.size(0) < (int64_t(1) << 22),
                    "aswp_pool: the CUDA kernel takes B < 65536, N < 2^24, L < 2^30 and M < 2^22, got x ",
                    x.sizes(), ", ", directions.size(0), " directions, ", references.size(0), " references");
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
  // the checks every backend shares (shapes, dtypes, devices, sizes, an empty mask row), then the CUDA limits
  const int code = aswp::check_aswp_pool_fwd_args(x, directions, references, mask, weights, pooling, temperature);
  aswp::check_aswp_pool_mask_rows(mask);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = directions.size(0), M = references.size(0);
  cuda::check_shared_memory_fits("aswp_pool forward", aswp_shape(N, M),
                                 cuda::aswp_launch::forward_shared_bytes(int(N), int(M)));
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
  const int code = aswp::check_aswp_pool_bwd_args(grad_out, x, directions, references, mask, weights, sorted,
                                                  sorted_tokens, pooling, temperature);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = directions.size(0), M = references.size(0);
  aswp::check_aswp_pool_sorted_tokens(sorted_tokens, N);  // the backward scatters through these indices
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_shared_memory_fits("aswp_pool backward", aswp_shape(N, M),
                                 cuda::aswp_launch::backward_shared_bytes(int(N), int(M)));
  AswpPrepared P = aswp_prepare(x, directions, references, mask, weights, code == 3, normalize_directions);
  at::Tensor g = grad_out.to(at::kFloat).contiguous();
  at::Tensor s = sorted.to(at::kFloat).contiguous(), tr = sorted_tokens.contiguous();
  const auto f32 = s.options();
  at::Tensor dp = at::empty({B * N, L}, f32);  // the kernel writes every element (masked tokens: 0)
  // Per-sample reference/weight gradients (the samples run in parallel), summed over B here: deterministic.
  at::Tensor dref_partial = at::empty({B, M, L}, f32);
  at::Tensor dw_partial = code == 3 ? at::empty({B, M, L}, f32) : at::Tensor();
  C10_CUDA_CHECK(cuda::aswp_pool_backward(
      g.data_ptr<float>(), P.n_valid.data_ptr<int>(), P.ref_sorted.data_ptr<float>(), P.order32.data_ptr<int>(),
      code == 3 ? P.weight_sorted.data_ptr<float>() : nullptr, s.data_ptr<float>(), tr.data_ptr(),
      tr.scalar_type() == at::kByte, int(B), int(N), int(L), int(M), code, float(1.0 / temperature),
      dp.data_ptr<float>(), dref_partial.data_ptr<float>(), code == 3 ? dw_partial.data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  at::Tensor gx = need_x ? at::mm(dp, P.theta).view({B, N, D}).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor gd = at::empty({0}, directions.options());
  if (need_directions) {
    at::Tensor dtheta = at::mm(dp.t(), x.to(at::kFloat).reshape({B * N, D}));
    if (normalize_directions) dtheta = (dtheta - P.theta * (dtheta * P.theta).sum(1, true)) * P.inv_norm;
    gd = dtheta.to(directions.scalar_type());
  }
  const at::Tensor dref_s = dref_partial.sum(0);
  at::Tensor gr = at::empty_like(dref_s).scatter_(0, P.order, dref_s).to(references.scalar_type());
  at::Tensor gw = at::empty({0}, references.options());
  if (code == 3) {
    const at::Tensor dw_s = dw_partial.sum(0);
    gw = at::empty_like(dw_s).scatter_(0, P.order, dw_s).to(weights->scalar_type());
  }
  return {gx, gd, gr, gw};
}

}  // namespace
}  // namespace omniret

TORCH_LIBRARY_IMPL(omniret, CUDA, m) {
  m.impl("aswp_pool_fwd", &omniret::aswp_pool_fwd_cuda);
  m.impl("aswp_pool_bwd", &omniret::aswp_pool_bwd_cuda);
}
