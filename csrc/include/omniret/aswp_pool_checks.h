// Argument checks of omniret::aswp_pool_fwd / _bwd, shared by every backend's glue (CPU: csrc/cpu/aswp_pool.cpp;
// the CUDA glue can call the same functions). A direct dispatcher call with a bad argument gets a ValueError
// naming it (TORCH_CHECK_VALUE), never an out-of-bounds access, a hang or an abort. Shapes, dtypes and devices
// are checked on metadata only; the two data-dependent checks (mask rows, saved token range) are separate
// functions written with ATen ops, so they run on any device (one host sync on a GPU).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>

#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace aswp {

// N (tokens per sample) and M (references): the sorting network pads a column to the next power of two and
// indexes its rows with int, and quantile tables hold int positions. 2^30 rows pad to at most 2^30.
constexpr int64_t kMaxRows = int64_t(1) << 30;

inline int check_aswp_pool_pooling(c10::string_view pooling) {
  if (pooling == "stm") return kStm;
  if (pooling == "max") return kMax;
  if (pooling == "mean") return kMean;
  if (pooling == "weighted") return kWeighted;
  TORCH_CHECK_VALUE(false, "aswp_pool: pooling must be one of stm, max, mean, weighted, got ", pooling);
  return kStm;
}

inline void check_aswp_pool_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "aswp_pool: ", name, " is undefined");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "aswp_pool: ", name, " must be floating point, got ",
                    t.scalar_type());
}

inline void check_aswp_pool_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "aswp_pool: ", name, " must be on x's device ", x.device(), ", got ",
                    t.device());
}

// Everything the forward reads: x (B, N, D), directions (L, D), references (M, L), mask (B, N) bool, weights
// (M, L) (checked whenever given; required for pooling='weighted'), temperature > 0. Returns the pooling code.
inline int check_aswp_pool_fwd_args(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
                                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights,
                                    c10::string_view pooling, double temperature) {
  check_aswp_pool_float("x", x);
  check_aswp_pool_float("directions", directions);
  check_aswp_pool_float("references", references);
  TORCH_CHECK_VALUE(x.dim() == 3, "aswp_pool: x must be (B, N, D), got ", x.sizes());
  TORCH_CHECK_VALUE(directions.dim() == 2 && directions.size(1) == x.size(2),
                    "aswp_pool: directions must be (L, D) with D = ", x.size(2), ", got ", directions.sizes());
  TORCH_CHECK_VALUE(references.dim() == 2 && references.size(1) == directions.size(0),
                    "aswp_pool: references must be (M, L) with L = ", directions.size(0), ", got ",
                    references.sizes());
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0), M = references.size(0);
  TORCH_CHECK_VALUE(B > 0 && N > 0 && L > 0 && M > 0, "aswp_pool: x, directions and references must be non-empty, "
                    "got x ", x.sizes(), ", directions ", directions.sizes(), ", references ", references.sizes());
  TORCH_CHECK_VALUE(N <= kMaxRows, "aswp_pool: x has N = ", N, " tokens per sample; at most 2^30 are supported");
  TORCH_CHECK_VALUE(M <= kMaxRows, "aswp_pool: references has M = ", M, " rows; at most 2^30 are supported");
  check_aswp_pool_device("directions", directions, x);
  check_aswp_pool_device("references", references, x);
  TORCH_CHECK_VALUE(temperature > 0, "aswp_pool: temperature must be > 0, got ", temperature);
  const int code = check_aswp_pool_pooling(pooling);
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool, "aswp_pool: mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N, "aswp_pool: mask must be (B, N) = (",
                      B, ", ", N, "), got ", mask->sizes());
    check_aswp_pool_device("mask", *mask, x);
  }
  TORCH_CHECK_VALUE(code != kWeighted || weights.has_value(), "aswp_pool: weights: pooling='weighted' needs weights");
  if (weights.has_value()) {
    check_aswp_pool_float("weights", *weights);
    TORCH_CHECK_VALUE(weights->dim() == 2 && weights->size(0) == M && weights->size(1) == L,
                      "aswp_pool: weights must be (M, L) = (", M, ", ", L, "), got ", weights->sizes());
    check_aswp_pool_device("weights", *weights, x);
  }
  return code;
}

// Data check of the mask: every sample keeps at least one token (a sample without tokens has no quantiles).
inline void check_aswp_pool_mask_rows(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return;
  const at::Tensor empty_rows = at::logical_not(mask->any(1));
  TORCH_CHECK_VALUE(!empty_rows.any().item<bool>(), "aswp_pool: mask: samples ",
                    empty_rows.nonzero().flatten().cpu(), " have no valid token");
}

// The backward's extra inputs: grad_out (B, L); the forward's saved `sorted` (B, N, L) in the compute dtype
// (float64 for float64 x, else float32) and `sorted_tokens` (B, N, L), uint8 for N <= 256 else int32.
inline int check_aswp_pool_bwd_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& directions,
                                    const at::Tensor& references, const std::optional<at::Tensor>& mask,
                                    const std::optional<at::Tensor>& weights, const at::Tensor& sorted,
                                    const at::Tensor& sorted_tokens, c10::string_view pooling, double temperature) {
  const int code = check_aswp_pool_fwd_args(x, directions, references, mask, weights, pooling, temperature);
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0);
  check_aswp_pool_float("grad_out", grad_out);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == L,
                    "aswp_pool: grad_out must be (B, L) = (", B, ", ", L, "), got ", grad_out.sizes());
  check_aswp_pool_device("grad_out", grad_out, x);
  TORCH_CHECK_VALUE(sorted.defined() && sorted_tokens.defined(), "aswp_pool: sorted/sorted_tokens are undefined");
  TORCH_CHECK_VALUE(sorted.numel() > 0,
                    "aswp_pool backward: the forward ran with save_for_backward=False and kept nothing for backward; "
                    "run it with save_for_backward=True (aswp_pool() does when grad is enabled and an input requires "
                    "grad)");
  TORCH_CHECK_VALUE(sorted.dim() == 3 && sorted.size(0) == B && sorted.size(1) == N && sorted.size(2) == L,
                    "aswp_pool: sorted must be (B, N, L) = (", B, ", ", N, ", ", L, "), got ", sorted.sizes());
  TORCH_CHECK_VALUE(sorted_tokens.sizes() == sorted.sizes(), "aswp_pool: sorted_tokens must be (B, N, L) = (", B,
                    ", ", N, ", ", L, "), got ", sorted_tokens.sizes());
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(sorted.scalar_type() == compute, "aswp_pool: sorted must be ", compute, " for x of dtype ",
                    x.scalar_type(), ", got ", sorted.scalar_type());
  const auto index = N <= 256 ? at::kByte : at::kInt;
  TORCH_CHECK_VALUE(sorted_tokens.scalar_type() == index, "aswp_pool: sorted_tokens must be ", index, " for N = ", N,
                    ", got ", sorted_tokens.scalar_type());
  check_aswp_pool_device("sorted", sorted, x);
  check_aswp_pool_device("sorted_tokens", sorted_tokens, x);
  return code;
}

// Data check of the saved permutation: every token index in [0, N) (the backward scatters through it).
inline void check_aswp_pool_sorted_tokens(const at::Tensor& sorted_tokens, int64_t n) {
  if (sorted_tokens.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(sorted_tokens);
  const int64_t min_index = lo.item<int64_t>(), max_index = hi.item<int64_t>();
  TORCH_CHECK_VALUE(min_index >= 0 && max_index < n, "aswp_pool: sorted_tokens must hold token indices in [0, ", n,
                    "), got values in [", min_index, ", ", max_index, "]");
}

}  // namespace aswp
}  // namespace omniret
