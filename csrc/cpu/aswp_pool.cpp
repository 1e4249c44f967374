// CPU kernel of omniret::aswp_pool_fwd / _bwd (SPEC section 1).
//
// Forward, per work item (a group of whole samples x a tile of slices): project the tile with ATen's GEMM
// (MKL here, the same GEMM the floor is timed with), then per sample and per 32-column block: pack each
// projection with its token index into a uint64 key, sort every column with the bitonic network of
// aswp_pool_math.h (each comparator is a vector min/max over the 32 columns, in L1), couple to the reference
// quantiles and pool. Written: the (B, L) output, and for backward the sorted values (B, N, L) and the token
// at each sorted position (uint8 when N <= 256). The (B, N, L) projection itself is never materialised.
//
// Backward, per 32-column block (all samples, so the reference and weight gradients need no atomics):
// recompute psi from the saved sorted values, take the pooling gradient, push it through the coupling and the
// permutation into dp (B * N, L), then two GEMMs give dx = dp theta and dtheta = dp^T x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace {

using namespace omniret::aswp;

constexpr int kSortWidth = 32;      // columns sorted together: 128 rows x 32 x 8 B = 32 KiB, inside L1
constexpr int64_t kSliceTile = 256;  // GEMM tile width; measured best of 64/128/256 for the paper shape
constexpr int64_t kGemmRows = 1024;  // rows of x per GEMM tile (whole samples)

int pooling_code(c10::string_view pooling) {
  if (pooling == "stm") return kStm;
  if (pooling == "max") return kMax;
  if (pooling == "mean") return kMean;
  if (pooling == "weighted") return kWeighted;
  TORCH_CHECK_VALUE(false, "pooling must be one of stm, max, mean, weighted, got ", pooling);
  return kStm;
}

// Sorts `width` columns of a (n_pow2 x kSortWidth) row-major key block. Each comparator of the network is a
// min/max over a row pair; gcc vectorises the row loop (8 uint64 lanes with the AVX-512 clone).
__attribute__((target_clones("avx512f", "default"))) void sort_key_block(uint64_t* keys, int n_pow2,
                                                                         int width) {
  for (int size = 2; size <= n_pow2; size <<= 1) {
    for (int step = size >> 1; step > 0; step >>= 1) {
      for (int p = 0; p < n_pow2 / 2; ++p) {
        int a, b;
        bitonic_comparator(size, step, p, a, b);
        uint64_t* __restrict ra = keys + int64_t(a) * kSortWidth;
        uint64_t* __restrict rb = keys + int64_t(b) * kSortWidth;
        for (int c = 0; c < width; ++c) {
          const uint64_t x = ra[c], y = rb[c];
          ra[c] = x < y ? x : y;
          rb[c] = x < y ? y : x;
        }
      }
    }
  }
}

void sort_key_block(KeyF64* keys, int n_pow2, int width) {
  for (int c = 0; c < width; ++c) bitonic_sort(keys + c, n_pow2, kSortWidth);
}

template <class scalar_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint64_t;
  static uint64_t make(float v, int index) { return pack_key(v, uint32_t(index)); }
  static uint64_t pad() { return kPadKey; }
  static float value(uint64_t k) { return key_value(k); }
  static int index(uint64_t k) { return int(key_index(k)); }
};
template <>
struct KeyOf<double> {
  using type = KeyF64;
  static KeyF64 make(double v, int index) { return KeyF64{v, index}; }
  static KeyF64 pad() { return KeyF64{0.0, -1}; }
  static double value(const KeyF64& k) { return k.value; }
  static int index(const KeyF64& k) { return k.index; }
};

// What both directions need: float inputs in the compute type, the reference ranks and per-sample quantile
// tables, transposed so that one column's M values are contiguous.
template <class scalar_t>
struct Prepared {
  int64_t B, N, D, L, M;
  at::Tensor x2d;       // (B * N, D) compute type
  at::Tensor theta;     // (L, D) normalised or not
  at::Tensor inv_norm;  // (L, 1), only when normalising
  at::Tensor ref_t;     // (L, M)
  at::Tensor weight_t;  // (L, M) or undefined
  std::vector<int> rank_t;  // (L, M)
  std::vector<uint8_t> valid;  // (B, N)
  std::vector<int> n_valid;    // (B)
  std::vector<int> q_lo, q_hi;  // (B, M): quantile table of sample b, indexed by rank
  std::vector<scalar_t> q_w;
};

template <class scalar_t>
Prepared<scalar_t> prepare(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights,
                           bool normalize_directions, bool need_x) {
  Prepared<scalar_t> P;
  const auto dt = c10::CppTypeToScalarType<scalar_t>::value;
  P.B = x.size(0), P.N = x.size(1), P.D = x.size(2), P.L = directions.size(0), P.M = references.size(0);
  if (need_x) P.x2d = x.to(dt).contiguous().view({P.B * P.N, P.D});
  at::Tensor d = directions.to(dt).contiguous();
  if (normalize_directions) {
    P.inv_norm = d.norm(2, {1}, true).reciprocal();
    P.theta = d * P.inv_norm;
  } else {
    P.theta = d;
  }
  P.ref_t = references.to(dt).t().contiguous();
  if (weights.has_value()) P.weight_t = weights->to(dt).t().contiguous();
  const int64_t L = P.L, M = P.M, B = P.B, N = P.N;
  at::Tensor order = std::get<1>(at::sort(P.ref_t, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  order = order.to(at::kLong).contiguous();
  const int64_t* ord = order.data_ptr<int64_t>();
  P.rank_t.resize(L * M);
  at::parallel_for(0, L, 64, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l)
      for (int64_t k = 0; k < M; ++k) P.rank_t[l * M + ord[l * M + k]] = int(k);
  });
  P.valid.assign(B * N, 1);
  P.n_valid.assign(B, int(N));
  if (mask.has_value()) {
    at::Tensor mk = mask->to(at::kBool).contiguous();
    const bool* mp = mk.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      int count = 0;
      for (int64_t n = 0; n < N; ++n) {
        P.valid[b * N + n] = mp[b * N + n] ? 1 : 0;
        count += mp[b * N + n] ? 1 : 0;
      }
      TORCH_CHECK_VALUE(count > 0, "mask: sample ", b, " has no valid token");
      P.n_valid[b] = count;
    }
  }
  P.q_lo.resize(B * M), P.q_hi.resize(B * M), P.q_w.resize(B * M);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < M; ++r) {
      double w;
      quantile_position(int(r), P.n_valid[b], int(M), P.q_lo[b * M + r], P.q_hi[b * M + r], w);
      P.q_w[b * M + r] = scalar_t(w);
    }
  return P;
}

template <class scalar_t, class index_t>
void forward_kernel(const Prepared<scalar_t>& P, int pooling, at::Tensor& out, at::Tensor& sorted,
                    at::Tensor& perm) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::type;
  const int64_t B = P.B, N = P.N, L = P.L, M = P.M;
  const int n_pow2 = next_pow2(int(N));
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(B, kGemmRows / N));
  const int64_t tile = std::min<int64_t>(kSliceTile, L);
  const int64_t n_groups = (B + group - 1) / group, n_tiles = (L + tile - 1) / tile;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* sorted_p = sorted.data_ptr<scalar_t>();
  index_t* perm_p = perm.data_ptr<index_t>();
  const scalar_t* ref_t = P.ref_t.template data_ptr<scalar_t>();
  const scalar_t* w_t = P.weight_t.defined() ? P.weight_t.template data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, n_groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor proj = at::empty({group * N, tile}, P.x2d.options());
    std::vector<Key> keys(size_t(n_pow2) * kSortWidth);
    std::vector<scalar_t> block(size_t(N) * kSortWidth), psi(M);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / n_tiles, l0 = (item % n_tiles) * tile;
      const int64_t b0 = g * group, nb = std::min(group, B - b0), width_tile = std::min(tile, L - l0);
      at::Tensor proj_view = proj.narrow(0, 0, nb * N).narrow(1, 0, width_tile);
      at::mm_out(proj_view, P.x2d.narrow(0, b0 * N, nb * N), P.theta.narrow(0, l0, width_tile).t());
      const scalar_t* pj = proj.data_ptr<scalar_t>();
      for (int64_t bl = 0; bl < nb; ++bl) {
        const int64_t b = b0 + bl;
        const int n_b = P.n_valid[b];
        const uint8_t* valid = P.valid.data() + b * N;
        const int* lo = P.q_lo.data() + b * M;
        const int* hi = P.q_hi.data() + b * M;
        const scalar_t* qw = P.q_w.data() + b * M;
        for (int64_t c0 = 0; c0 < width_tile; c0 += kSortWidth) {
          const int width = int(std::min<int64_t>(kSortWidth, width_tile - c0));
          for (int i = 0; i < n_pow2; ++i) {
            Key* row = keys.data() + size_t(i) * kSortWidth;
            if (i < N && valid[i]) {
              const scalar_t* src = pj + (bl * N + i) * tile + c0;
              for (int c = 0; c < width; ++c) row[c] = K::make(src[c], i);
            } else {
              for (int c = 0; c < width; ++c) row[c] = K::pad();
            }
          }
          sort_key_block(keys.data(), n_pow2, width);
          // Unpack: sorted values and their tokens, row by row (contiguous in the (B, N, L) outputs).
          for (int64_t i = 0; i < N; ++i) {
            const Key* row = keys.data() + size_t(i) * kSortWidth;
            scalar_t* s_dst = sorted_p + (b * N + i) * L + l0 + c0;
            index_t* p_dst = perm_p + (b * N + i) * L + l0 + c0;
            scalar_t* blk = block.data() + size_t(i) * kSortWidth;
            if (i < n_b) {
              for (int c = 0; c < width; ++c) {
                blk[c] = s_dst[c] = K::value(row[c]);
                p_dst[c] = index_t(K::index(row[c]));
              }
            } else {
              for (int c = 0; c < width; ++c) s_dst[c] = scalar_t(0), p_dst[c] = index_t(0);
            }
          }
          for (int c = 0; c < width; ++c) {
            const int64_t l = l0 + c0 + c;
            couple_column(block.data() + c, kSortWidth, P.rank_t.data() + l * M, ref_t + l * M, int(M), lo, hi,
                          qw, psi.data());
            out_p[b * L + l] = pool_forward(pooling, psi.data(), int(M), w_t ? w_t + l * M : nullptr);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aswp_pool_fwd_cpu(
    const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, c10::string_view pooling,
    bool normalize_directions, double temperature) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not part of the graph
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be (B, N, D), got ", x.sizes());
  TORCH_CHECK_VALUE(directions.dim() == 2 && directions.size(1) == x.size(2), "directions must be (L, D), got ",
                    directions.sizes());
  TORCH_CHECK_VALUE(references.dim() == 2 && references.size(1) == directions.size(0),
                    "references must be (M, L), got ", references.sizes());
  TORCH_CHECK_VALUE(x.size(0) > 0 && x.size(1) > 0 && directions.size(0) > 0 && references.size(0) > 0,
                    "x, directions and references must be non-empty");
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0");
  const int code = pooling_code(pooling);
  TORCH_CHECK_VALUE(code != kWeighted || weights.has_value(), "weights: pooling='weighted' needs weights");
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0);
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto perm_dtype = N <= 256 ? at::kByte : at::kInt;
  at::Tensor out = at::empty({B, L}, x.options().dtype(compute));
  at::Tensor sorted = at::empty({B, N, L}, x.options().dtype(compute));
  at::Tensor perm = at::empty({B, N, L}, x.options().dtype(perm_dtype));
  at::Tensor w = code == kWeighted ? *weights : at::Tensor();
  std::optional<at::Tensor> wopt = code == kWeighted ? std::optional<at::Tensor>(w) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(compute, "aswp_pool_fwd_cpu", [&] {
    auto P = prepare<scalar_t>(x, directions, references, mask, wopt, normalize_directions, true);
    if (perm_dtype == at::kByte)
      forward_kernel<scalar_t, uint8_t>(P, code, out, sorted, perm);
    else
      forward_kernel<scalar_t, int32_t>(P, code, out, sorted, perm);
  });
  return {out.to(x.scalar_type()), sorted, perm};
}

template <class scalar_t, class index_t>
void backward_kernel(const Prepared<scalar_t>& P, int pooling, scalar_t temperature, const at::Tensor& grad,
                     const at::Tensor& sorted, const at::Tensor& perm, at::Tensor& dp, at::Tensor& dref_t,
                     at::Tensor& dweight_t) {
  const int64_t B = P.B, N = P.N, L = P.L, M = P.M;
  const scalar_t* g_p = grad.data_ptr<scalar_t>();
  const scalar_t* sorted_p = sorted.data_ptr<scalar_t>();
  const index_t* perm_p = perm.data_ptr<index_t>();
  const scalar_t* ref_t = P.ref_t.template data_ptr<scalar_t>();
  const scalar_t* w_t = P.weight_t.defined() ? P.weight_t.template data_ptr<scalar_t>() : nullptr;
  scalar_t* dp_p = dp.data_ptr<scalar_t>();
  scalar_t* dref_p = dref_t.data_ptr<scalar_t>();
  scalar_t* dw_p = dweight_t.defined() ? dweight_t.data_ptr<scalar_t>() : nullptr;
  const int64_t n_blocks = (L + kSortWidth - 1) / kSortWidth;

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> block(size_t(N) * kSortWidth), ds(size_t(N) * kSortWidth);
    std::vector<scalar_t> psi(M), dpsi(M), scratch(M);
    for (int64_t blk_i = begin; blk_i < end; ++blk_i) {
      const int64_t l0 = blk_i * kSortWidth;
      const int width = int(std::min<int64_t>(kSortWidth, L - l0));
      for (int64_t l = l0; l < l0 + width; ++l)
        for (int64_t j = 0; j < M; ++j) {
          dref_p[l * M + j] = scalar_t(0);
          if (dw_p) dw_p[l * M + j] = scalar_t(0);
        }
      for (int64_t b = 0; b < B; ++b) {
        const int n_b = P.n_valid[b];
        const int* lo = P.q_lo.data() + b * M;
        const int* hi = P.q_hi.data() + b * M;
        const scalar_t* qw = P.q_w.data() + b * M;
        for (int i = 0; i < n_b; ++i) {
          const scalar_t* src = sorted_p + (b * N + i) * L + l0;
          std::copy(src, src + width, block.data() + size_t(i) * kSortWidth);
        }
        std::fill(ds.begin(), ds.end(), scalar_t(0));
        for (int c = 0; c < width; ++c) {
          const int64_t l = l0 + c;
          const scalar_t* wcol = w_t ? w_t + l * M : nullptr;
          couple_column(block.data() + c, kSortWidth, P.rank_t.data() + l * M, ref_t + l * M, int(M), lo, hi, qw,
                        psi.data());
          pool_backward(pooling, psi.data(), int(M), g_p[b * L + l], temperature, wcol, dpsi.data(),
                        scratch.data());
          scalar_t* dr = dref_p + l * M;
          for (int64_t j = 0; j < M; ++j) dr[j] -= dpsi[j];
          if (dw_p) {
            const scalar_t g = g_p[b * L + l];
            scalar_t* dw = dw_p + l * M;
            for (int64_t j = 0; j < M; ++j) dw[j] += g * psi[j];
          }
          // ds of this column lives at stride kSortWidth, like block
          for (int64_t j = 0; j < M; ++j) {
            const int r = P.rank_t[l * M + j];
            ds[size_t(lo[r]) * kSortWidth + c] += dpsi[j] * (scalar_t(1) - qw[r]);
            ds[size_t(hi[r]) * kSortWidth + c] += dpsi[j] * qw[r];
          }
        }
        // Through the permutation: the token at sorted position i receives ds[i]; masked tokens receive 0.
        if (n_b < N) {
          const uint8_t* valid = P.valid.data() + b * N;
          for (int64_t n = 0; n < N; ++n)
            if (!valid[n]) std::fill_n(dp_p + (b * N + n) * L + l0, width, scalar_t(0));
        }
        for (int i = 0; i < n_b; ++i) {
          const index_t* tok = perm_p + (b * N + i) * L + l0;
          const scalar_t* d = ds.data() + size_t(i) * kSortWidth;
          for (int c = 0; c < width; ++c) dp_p[(b * N + int64_t(tok[c])) * L + l0 + c] = d[c];
        }
      }
    }
  });
}

// theta = d / ||d||: d(directions) = (dtheta - theta <dtheta, theta>) / ||d||, row by row, in place on dtheta.
template <class scalar_t>
void normalize_backward(at::Tensor& dtheta, const at::Tensor& theta, const at::Tensor& inv_norm) {
  const int64_t L = dtheta.size(0), D = dtheta.size(1);
  scalar_t* g = dtheta.data_ptr<scalar_t>();
  const scalar_t* t = theta.data_ptr<scalar_t>();
  const scalar_t* inv = inv_norm.data_ptr<scalar_t>();
  at::parallel_for(0, L, 16, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      scalar_t* gr = g + l * D;
      const scalar_t* tr = t + l * D;
      scalar_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += gr[d] * tr[d];
      for (int64_t d = 0; d < D; ++d) gr[d] = (gr[d] - tr[d] * dot) * inv[l];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aswp_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, const at::Tensor& sorted,
    const at::Tensor& perm, c10::string_view pooling, bool normalize_directions, double temperature, bool need_x,
    bool need_directions) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int code = pooling_code(pooling);
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0), M = references.size(0);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == L,
                    "grad_out must be (B, L)");
  TORCH_CHECK_VALUE(sorted.sizes() == perm.sizes() && sorted.dim() == 3 && sorted.size(0) == B &&
                        sorted.size(1) == N && sorted.size(2) == L,
                    "sorted/perm must be (B, N, L)");
  const auto compute = sorted.scalar_type();
  at::Tensor grad_x, grad_dir;
  at::Tensor grad_ref_t = at::empty({L, M}, sorted.options());
  at::Tensor grad_w_t = code == kWeighted ? at::empty({L, M}, sorted.options()) : at::Tensor();
  std::optional<at::Tensor> wopt = code == kWeighted ? weights : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(compute, "aswp_pool_bwd_cpu", [&] {
    auto P = prepare<scalar_t>(x, directions, references, mask, wopt, normalize_directions, need_directions);
    at::Tensor g = grad_out.to(compute).contiguous();
    at::Tensor s = sorted.contiguous(), pm = perm.contiguous();
    at::Tensor dp = at::empty({B * N, L}, sorted.options());
    if (pm.scalar_type() == at::kByte)
      backward_kernel<scalar_t, uint8_t>(P, code, scalar_t(temperature), g, s, pm, dp, grad_ref_t, grad_w_t);
    else
      backward_kernel<scalar_t, int32_t>(P, code, scalar_t(temperature), g, s, pm, dp, grad_ref_t, grad_w_t);
    if (need_x) grad_x = at::mm(dp, P.theta).view({B, N, x.size(2)}).to(x.scalar_type());
    if (need_directions) {
      at::Tensor dtheta = at::mm(dp.t(), P.x2d);
      if (normalize_directions) normalize_backward<scalar_t>(dtheta, P.theta, P.inv_norm);
      grad_dir = dtheta.to(directions.scalar_type());
    }
  });
  if (!grad_x.defined()) grad_x = at::empty({0}, x.options());
  if (!grad_dir.defined()) grad_dir = at::empty({0}, directions.options());
  at::Tensor grad_ref = grad_ref_t.t().contiguous().to(references.scalar_type());
  at::Tensor grad_w = code == kWeighted ? grad_w_t.t().contiguous().to(weights->scalar_type())
                                        : at::empty({0}, references.options());
  return {grad_x, grad_dir, grad_ref, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(omniret, CPU, m) {
  m.impl("aswp_pool_fwd", &aswp_pool_fwd_cpu);
  m.impl("aswp_pool_bwd", &aswp_pool_bwd_cpu);
}

}  // namespace omniret
