// CPU kernel of omniret::aswp_pool_fwd / _bwd (SPEC section 1).
//
// Forward, per work item (a group of whole samples x a tile of slices): project the tile with ATen's GEMM
// (MKL here, the same GEMM the floor is timed with), then per sample and per 32-column block: pack each
// projection with its token index into a uint64 key, sort every column with the bitonic network of
// aswp_pool_math.h (each comparator is an AVX-512 min/max over the 32 columns, in L1), then couple to the
// reference quantiles and pool walking the references in rank order (row operations, no gathers). Written: the
// (B, L) output, and for backward the sorted values (B, N, L) and the token at each sorted position (uint8
// when N <= 256). The (B, N, L) projection itself is never materialised.
//
// Backward, per 32-column block (all samples, so the reference and weight gradients need no atomics):
// recompute psi from the saved sorted values, take the pooling gradient, push it through the coupling and the
// sort into dp (B * N, L), then two GEMMs give dx = dp d and d(d) = dp^T x. theta = d / ||d|| is never
// materialised: the GEMMs use `directions` as is and the 1 / ||d|| scale is applied to the (L)-wide projection
// rows in cache (forward) and to dp as it is written (backward). Storing the sorted values
// (4 B per projection) instead of recomputing the projection saves a fourth GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace {

using namespace omniret::aswp;

constexpr int kSortWidth = 32;      // columns sorted together: 128 rows x 32 x 8 B = 32 KiB, inside L1
constexpr int64_t kSliceTile = 256;  // GEMM tile width; measured best of 64/128/256 for the paper shape
constexpr int64_t kGemmRows = 1024;  // rows of x per GEMM tile (whole samples)
constexpr int64_t kBackwardChunk = 1024;  // slices of dp alive at once in backward (multiple of kSortWidth)

int pooling_code(c10::string_view pooling) {
  if (pooling == "stm") return kStm;
  if (pooling == "max") return kMax;
  if (pooling == "mean") return kMean;
  if (pooling == "weighted") return kWeighted;
  TORCH_CHECK_VALUE(false, "pooling must be one of stm, max, mean, weighted, got ", pooling);
  return kStm;
}

// One step (size, STEP <= 8) of the bitonic network on a group of 16 rows held in registers (8 columns each);
// the comparator rule is the shared one (bitonic_comparator): the pair (i, i + STEP) ascends when row i has
// bit `size` clear.
template <int STEP>
__attribute__((target("avx512f"), always_inline)) inline void register_step(__m512i* r, int g0, int size) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if ((i & STEP) == 0) {
      const __m512i lo = _mm512_min_epu64(r[i], r[i + STEP]), hi = _mm512_max_epu64(r[i], r[i + STEP]);
      const bool ascending = ((g0 + i) & size) == 0;
      r[i] = ascending ? lo : hi;
      r[i + STEP] = ascending ? hi : lo;
    }
  }
}

// Sorts the 32 columns of a (n_pow2 x kSortWidth) row-major key block with the shared bitonic network; unused
// columns hold kPadKey. Steps of stride >= 16 run row pair by row pair through L1; the (many more) steps of
// stride <= 8 stay inside aligned groups of 16 rows, which are loaded into 16 registers once per merge.
__attribute__((target("avx512f"))) void sort_key_block_avx512(uint64_t* keys, int n_pow2) {
  constexpr int W = kSortWidth;
  if (n_pow2 < 16) {
    for (int size = 2, log_size = 1; size <= n_pow2; size <<= 1, ++log_size)
      for (int log_step = log_size - 1; log_step >= 0; --log_step)
        for (int p = 0; p < n_pow2 / 2; ++p) {
          int a, b;
          bitonic_comparator(size, log_step, p, a, b);
          for (int v = 0; v < W; v += 8) {
            const __m512i x = _mm512_loadu_si512(keys + a * W + v), y = _mm512_loadu_si512(keys + b * W + v);
            _mm512_storeu_si512(keys + a * W + v, _mm512_min_epu64(x, y));
            _mm512_storeu_si512(keys + b * W + v, _mm512_max_epu64(x, y));
          }
        }
    return;
  }
  __m512i r[16];
  for (int v = 0; v < W; v += 8) {  // column groups are independent: finish one before the next (8 KiB)
    uint64_t* col = keys + v;
    for (int g0 = 0; g0 < n_pow2; g0 += 16) {  // sizes 2..16 entirely in registers
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(col + (g0 + i) * W);
      register_step<1>(r, g0, 2);
      register_step<2>(r, g0, 4), register_step<1>(r, g0, 4);
      register_step<4>(r, g0, 8), register_step<2>(r, g0, 8), register_step<1>(r, g0, 8);
      register_step<8>(r, g0, 16), register_step<4>(r, g0, 16), register_step<2>(r, g0, 16);
      register_step<1>(r, g0, 16);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(col + (g0 + i) * W, r[i]);
    }
    for (int size = 32, log_size = 5; size <= n_pow2; size <<= 1, ++log_size) {
      for (int log_step = log_size - 1; log_step >= 4; --log_step)
        for (int p = 0; p < n_pow2 / 2; ++p) {
          int a, b;
          bitonic_comparator(size, log_step, p, a, b);
          const __m512i x = _mm512_loadu_si512(col + a * W), y = _mm512_loadu_si512(col + b * W);
          _mm512_storeu_si512(col + a * W, _mm512_min_epu64(x, y));
          _mm512_storeu_si512(col + b * W, _mm512_max_epu64(x, y));
        }
      for (int g0 = 0; g0 < n_pow2; g0 += 16) {
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(col + (g0 + i) * W);
        register_step<8>(r, g0, size), register_step<4>(r, g0, size), register_step<2>(r, g0, size);
        register_step<1>(r, g0, size);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(col + (g0 + i) * W, r[i]);
      }
    }
  }
}

void sort_key_block_scalar(uint64_t* keys, int n_pow2) {
  for (int c = 0; c < kSortWidth; ++c) bitonic_sort(keys + c, n_pow2, kSortWidth);
}

void sort_key_block(uint64_t* keys, int n_pow2) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  if (has_avx512)
    sort_key_block_avx512(keys, n_pow2);
  else
    sort_key_block_scalar(keys, n_pow2);
}

void sort_key_block(KeyF64* keys, int n_pow2) {
  for (int c = 0; c < kSortWidth; ++c) bitonic_sort(keys + c, n_pow2, kSortWidth);
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

// Stable sort of every column of references (M, L) with the key network: the values in rank order and the
// index j of each rank. (at::sort along dim 0 of a row-major matrix costs more than the kernel around it.)
template <class scalar_t>
void sort_references(const at::Tensor& references, at::Tensor& ref_sorted, at::Tensor& order) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::type;
  constexpr int W = kSortWidth;
  const int64_t M = references.size(0), L = references.size(1);
  const int m_pow2 = next_pow2(int(M));
  ref_sorted = at::empty({M, L}, references.options());
  order = at::empty({M, L}, references.options().dtype(at::kInt));
  const scalar_t* src = references.data_ptr<scalar_t>();
  scalar_t* dst = ref_sorted.data_ptr<scalar_t>();
  int* ord = order.data_ptr<int>();
  at::parallel_for(0, (L + W - 1) / W, 4, [&](int64_t begin, int64_t end) {
    std::vector<Key> keys(size_t(m_pow2) * W);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t l = blk * W;
      const int width = int(std::min<int64_t>(W, L - l));
      for (int i = 0; i < m_pow2; ++i) {
        Key* row = keys.data() + size_t(i) * W;
        int c = 0;
        if (i < M)
          for (; c < width; ++c) row[c] = K::make(src[i * L + l + c], i);
        for (; c < W; ++c) row[c] = K::pad();
      }
      sort_key_block(keys.data(), m_pow2);
      for (int64_t r = 0; r < M; ++r) {
        const Key* row = keys.data() + size_t(r) * W;
        for (int c = 0; c < width; ++c) dst[r * L + l + c] = K::value(row[c]), ord[r * L + l + c] = K::index(row[c]);
      }
    }
  });
}

// What both directions need: x and the directions in the compute type, 1 / ||d|| per slice, the references sorted per column with the
// index j of each rank (so the kernels walk references in rank order), and each sample's quantile table.
template <class scalar_t>
struct Prepared {
  int64_t B, N, D, L, M;
  at::Tensor x2d;          // (B * N, D) compute type (when asked for)
  at::Tensor dir;           // (L, D) directions, not normalised
  std::vector<scalar_t> scale;  // (L): 1 / ||d_l|| when normalising, else 1
  at::Tensor ref_sorted;   // (M, L): ref_sorted[r, l] = references[order[r, l], l]
  at::Tensor order;        // (M, L) int64: j of rank r in column l (stable)
  at::Tensor order32;      // (M, L) int32
  at::Tensor weight_sorted;  // (M, L) or undefined
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
  // Detached: at::parallel_for's worker threads do not inherit the caller's below-autograd guard, and at::mm_out
  // on a tensor that requires grad refuses to run there.
  if (need_x) P.x2d = x.detach().to(dt).contiguous().view({P.B * P.N, P.D});
  at::Tensor d = directions.detach().to(dt).contiguous();
  P.dir = d;
  P.scale.assign(P.L, scalar_t(1));
  if (normalize_directions) {
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const int64_t D = P.D;
    at::parallel_for(0, P.L, 64, [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) {
        double sq = 0;
        for (int64_t k = 0; k < D; ++k) sq += double(dp[l * D + k]) * double(dp[l * D + k]);
        P.scale[l] = scalar_t(1.0 / std::sqrt(sq));
      }
    });
  }
  sort_references<scalar_t>(references.to(dt).contiguous(), P.ref_sorted, P.order32);
  P.order = P.order32.to(at::kLong);
  if (weights.has_value()) P.weight_sorted = weights->to(dt).gather(0, P.order).contiguous();
  const int64_t M = P.M, B = P.B, N = P.N;
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
                    at::Tensor& sorted_tokens) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::type;
  constexpr int W = kSortWidth;
  const int64_t B = P.B, N = P.N, L = P.L, M = P.M;
  const int n_pow2 = next_pow2(int(N));
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(B, kGemmRows / N));
  const int64_t tile = std::min<int64_t>(kSliceTile, L);
  const int64_t n_groups = (B + group - 1) / group, n_tiles = (L + tile - 1) / tile;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* sorted_p = sorted.data_ptr<scalar_t>();
  index_t* tokens_p = sorted_tokens.data_ptr<index_t>();
  const scalar_t* ref_s = P.ref_sorted.template data_ptr<scalar_t>();
  const scalar_t* w_s = P.weight_sorted.defined() ? P.weight_sorted.template data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, n_groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor proj = at::empty({group * N, tile}, P.x2d.options());
    std::vector<Key> keys(size_t(n_pow2) * W);
    std::vector<scalar_t> block(size_t(N) * W);
    scalar_t psi[W], acc[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / n_tiles, l0 = (item % n_tiles) * tile;
      const int64_t b0 = g * group, nb = std::min(group, B - b0), width_tile = std::min(tile, L - l0);
      at::Tensor proj_view = proj.narrow(0, 0, nb * N).narrow(1, 0, width_tile);
      at::mm_out(proj_view, P.x2d.narrow(0, b0 * N, nb * N), P.dir.narrow(0, l0, width_tile).t());
      const scalar_t* pj = proj.data_ptr<scalar_t>();
      for (int64_t bl = 0; bl < nb; ++bl) {
        const int64_t b = b0 + bl;
        const int n_b = P.n_valid[b];
        const uint8_t* valid = P.valid.data() + b * N;
        const int* lo = P.q_lo.data() + b * M;
        const int* hi = P.q_hi.data() + b * M;
        const scalar_t* qw = P.q_w.data() + b * M;
        for (int64_t c0 = 0; c0 < width_tile; c0 += W) {
          const int width = int(std::min<int64_t>(W, width_tile - c0));
          const int64_t l = l0 + c0;
          for (int i = 0; i < n_pow2; ++i) {
            Key* row = keys.data() + size_t(i) * W;
            int c = 0;
            if (i < N && valid[i]) {
              const scalar_t* src = pj + (bl * N + i) * tile + c0;
              const scalar_t* sc = P.scale.data() + l;  // the projection onto d / ||d||
              for (; c < width; ++c) row[c] = K::make(src[c] * sc[c], i);
            }
            for (; c < W; ++c) row[c] = K::pad();
          }
          sort_key_block(keys.data(), n_pow2);
          // Unpack, row by row (vectorised): sorted values and the token at each sorted position, both kept
          // for backward; positions past the sample's valid tokens hold 0.
          for (int64_t i = 0; i < N; ++i) {
            const Key* row = keys.data() + size_t(i) * W;
            scalar_t* s_dst = sorted_p + (b * N + i) * L + l;
            index_t* t_dst = tokens_p + (b * N + i) * L + l;
            scalar_t* blk = block.data() + size_t(i) * W;
            if (i < n_b) {
              for (int c = 0; c < width; ++c) s_dst[c] = blk[c] = K::value(row[c]);
              for (int c = 0; c < width; ++c) t_dst[c] = index_t(K::index(row[c]));
            } else {
              for (int c = 0; c < width; ++c) s_dst[c] = scalar_t(0), t_dst[c] = index_t(0);
            }
          }
          // Couple and pool, walking the references in rank order (one row of 32 columns per rank).
          for (int c = 0; c < width; ++c) acc[c] = pool_initial<scalar_t>(pooling);
          for (int64_t r = 0; r < M; ++r) {
            couple_row(block.data() + size_t(lo[r]) * W, block.data() + size_t(hi[r]) * W, qw[r],
                       ref_s + r * L + l, psi, width);
            pool_accumulate_row(pooling, psi, w_s ? w_s + r * L + l : nullptr, acc, width);
          }
          pool_finish_row(pooling, int(M), acc, width);
          for (int c = 0; c < width; ++c) out_p[b * L + l + c] = acc[c];
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
  const auto index_dtype = N <= 256 ? at::kByte : at::kInt;
  at::Tensor out = at::empty({B, L}, x.options().dtype(compute));
  at::Tensor sorted = at::empty({B, N, L}, x.options().dtype(compute));
  at::Tensor sorted_tokens = at::empty({B, N, L}, x.options().dtype(index_dtype));
  std::optional<at::Tensor> wopt = code == kWeighted ? weights : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(compute, "aswp_pool_fwd_cpu", [&] {
    auto P = prepare<scalar_t>(x, directions, references, mask, wopt, normalize_directions, true);
    if (index_dtype == at::kByte)
      forward_kernel<scalar_t, uint8_t>(P, code, out, sorted, sorted_tokens);
    else
      forward_kernel<scalar_t, int32_t>(P, code, out, sorted, sorted_tokens);
  });
  return {out.to(x.scalar_type()), sorted, sorted_tokens};
}

template <class scalar_t, class index_t>
void backward_kernel(const Prepared<scalar_t>& P, int pooling, scalar_t temperature, const at::Tensor& grad,
                     const at::Tensor& sorted, const at::Tensor& sorted_tokens, int64_t l_begin, int64_t l_end,
                     scalar_t* dq, int64_t ld, at::Tensor& dref_s,
                     at::Tensor& dweight_s) {
  constexpr int W = kSortWidth;
  const int64_t B = P.B, N = P.N, L = P.L, M = P.M;
  const scalar_t* g_p = grad.data_ptr<scalar_t>();
  const scalar_t* sorted_p = sorted.data_ptr<scalar_t>();
  const index_t* tokens_p = sorted_tokens.data_ptr<index_t>();
  const scalar_t* ref_s = P.ref_sorted.template data_ptr<scalar_t>();
  const int* order = P.order32.template data_ptr<int>();
  const scalar_t* w_s = P.weight_sorted.defined() ? P.weight_sorted.template data_ptr<scalar_t>() : nullptr;
  // dq holds columns [l_begin, l_end) of dp, row stride ld
  scalar_t* dp_p = dq - l_begin;
  scalar_t* dref_p = dref_s.data_ptr<scalar_t>();
  scalar_t* dw_p = dweight_s.defined() ? dweight_s.data_ptr<scalar_t>() : nullptr;
  const int64_t n_blocks = (l_end - l_begin + W - 1) / W;
  const scalar_t inv_t = scalar_t(1) / temperature;
  const bool needs_argmax = pooling == kStm || pooling == kMax;

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> block(size_t(N) * W), ds(size_t(N) * W), psi(size_t(M) * W), e(size_t(M) * W);
    scalar_t best[W], z[W], num[W], dpsi[W];
    int best_j[W], best_r[W];
    for (int64_t blk_i = begin; blk_i < end; ++blk_i) {
      const int64_t l = l_begin + blk_i * W;
      const int width = int(std::min<int64_t>(W, l_end - l));
      for (int64_t r = 0; r < M; ++r) {
        std::fill_n(dref_p + r * L + l, width, scalar_t(0));
        if (dw_p) std::fill_n(dw_p + r * L + l, width, scalar_t(0));
      }
      for (int64_t b = 0; b < B; ++b) {
        const int n_b = P.n_valid[b];
        const int* lo = P.q_lo.data() + b * M;
        const int* hi = P.q_hi.data() + b * M;
        const scalar_t* qw = P.q_w.data() + b * M;
        const scalar_t* g = g_p + b * L + l;
        for (int i = 0; i < n_b; ++i) {
          const scalar_t* src = sorted_p + (b * N + i) * L + l;
          scalar_t* dst = block.data() + size_t(i) * W;
          for (int c = 0; c < width; ++c) dst[c] = src[c];
        }
        for (int64_t r = 0; r < M; ++r)
          couple_row(block.data() + size_t(lo[r]) * W, block.data() + size_t(hi[r]) * W, qw[r], ref_s + r * L + l,
                     psi.data() + r * W, width);
        if (needs_argmax) {
          for (int c = 0; c < width; ++c) best[c] = -INFINITY, best_j[c] = INT32_MAX, best_r[c] = 0;
          for (int64_t r = 0; r < M; ++r)
            argmax_update(psi.data() + r * W, order + r * L + l, int(r), best, best_j, best_r, width);
        }
        if (pooling == kStm) {
          std::fill_n(z, W, scalar_t(0));
          std::fill_n(num, W, scalar_t(0));
          for (int64_t r = 0; r < M; ++r)
            stm_softmax_row(psi.data() + r * W, best, inv_t, e.data() + r * W, z, num, width);
          stm_normalize(z, num, width);
        }
        std::fill_n(ds.data(), size_t(n_b) * W, scalar_t(0));
        for (int64_t r = 0; r < M; ++r) {
          const scalar_t* psi_r = psi.data() + r * W;
          pool_grad_row(pooling, int(M), int(r), psi_r, e.data() + r * W, z, num, best_r,
                        w_s ? w_s + r * L + l : nullptr, g, inv_t, dpsi, width);
          scalar_t* dr = dref_p + r * L + l;
          for (int c = 0; c < width; ++c) dr[c] -= dpsi[c];
          if (dw_p) {
            scalar_t* dw = dw_p + r * L + l;
            for (int c = 0; c < width; ++c) dw[c] += g[c] * psi_r[c];
          }
          couple_row_backward(dpsi, qw[r], ds.data() + size_t(lo[r]) * W, ds.data() + size_t(hi[r]) * W, width);
        }
        // Through the sort: the token at sorted position i receives ds[i]; masked tokens receive 0.
        if (n_b < N) {
          const uint8_t* valid = P.valid.data() + b * N;
          for (int64_t n = 0; n < N; ++n)
            if (!valid[n]) std::fill_n(dp_p + (b * N + n) * ld + l, width, scalar_t(0));
        }
        for (int i = 0; i < n_b; ++i) {
          const index_t* tok = tokens_p + (b * N + i) * L + l;
          const scalar_t* d = ds.data() + size_t(i) * W;
          const scalar_t* sc = P.scale.data() + l;  // chain rule through p = (x . d) / ||d||
          scalar_t* dst = dp_p + b * N * ld + l;
          for (int c = 0; c < width; ++c) dst[int64_t(tok[c]) * ld + c] = d[c] * sc[c];
        }
      }
    }
  });
}

// With theta = d s (s = 1 / ||d||) and G = dq^T x (dq = dp s, what the kernel wrote), the gradient to d is
// s (dtheta - theta <theta, dtheta>) = G - s^2 d <d, G>: one pass per row, in place on G.
template <class scalar_t>
void normalize_backward(at::Tensor& grad, const at::Tensor& dir, const std::vector<scalar_t>& scale) {
  const int64_t L = grad.size(0), D = grad.size(1);
  scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* d = dir.data_ptr<scalar_t>();
  at::parallel_for(0, L, 16, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      scalar_t* gr = g + l * D;
      const scalar_t* dr = d + l * D;
      scalar_t dot = 0;
      for (int64_t k = 0; k < D; ++k) dot += gr[k] * dr[k];
      const scalar_t f = scale[l] * scale[l] * dot;
      for (int64_t k = 0; k < D; ++k) gr[k] -= f * dr[k];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aswp_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, const at::Tensor& sorted,
    const at::Tensor& sorted_tokens, c10::string_view pooling, bool normalize_directions, double temperature, bool need_x,
    bool need_directions) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int code = pooling_code(pooling);
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0), M = references.size(0);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == L,
                    "grad_out must be (B, L)");
  TORCH_CHECK_VALUE(sorted.sizes() == sorted_tokens.sizes() && sorted.dim() == 3 && sorted.size(0) == B &&
                        sorted.size(1) == N && sorted.size(2) == L,
                    "sorted/sorted_tokens must be (B, N, L)");
  const auto compute = sorted.scalar_type();
  at::Tensor grad_x, grad_dir;
  at::Tensor grad_ref_s = at::empty({M, L}, sorted.options());  // in rank order, unpermuted at the end
  at::Tensor grad_w_s = code == kWeighted ? at::empty({M, L}, sorted.options()) : at::Tensor();
  at::Tensor order;
  std::optional<at::Tensor> wopt = code == kWeighted ? weights : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(compute, "aswp_pool_bwd_cpu", [&] {
    auto P = prepare<scalar_t>(x, directions, references, mask, wopt, normalize_directions, need_directions);
    at::Tensor g = grad_out.to(compute).contiguous();
    at::Tensor s = sorted.contiguous(), pm = sorted_tokens.contiguous();
    // dp (B * N, L) is produced and consumed in chunks of slices (a quarter of the paper shape's 16 MiB at a
    // time): each chunk's d(directions) rows are one GEMM into their place, and dx accumulates chunk by chunk.
    const int64_t chunk = std::min<int64_t>(L, kBackwardChunk);
    at::Tensor dq = at::empty({B * N, chunk}, sorted.options());
    at::Tensor dx = need_x ? at::zeros({B * N, x.size(2)}, sorted.options()) : at::Tensor();
    at::Tensor dtheta = need_directions ? at::empty({L, x.size(2)}, sorted.options()) : at::Tensor();
    for (int64_t c0 = 0; c0 < L; c0 += chunk) {
      const int64_t w = std::min(chunk, L - c0);
      if (pm.scalar_type() == at::kByte)
        backward_kernel<scalar_t, uint8_t>(P, code, scalar_t(temperature), g, s, pm, c0, c0 + w,
                                           dq.data_ptr<scalar_t>(), chunk, grad_ref_s, grad_w_s);
      else
        backward_kernel<scalar_t, int32_t>(P, code, scalar_t(temperature), g, s, pm, c0, c0 + w,
                                           dq.data_ptr<scalar_t>(), chunk, grad_ref_s, grad_w_s);
      at::Tensor dq_view = dq.narrow(1, 0, w);
      if (need_x) dx.addmm_(dq_view, P.dir.narrow(0, c0, w));
      if (need_directions) {
        at::Tensor rows = dtheta.narrow(0, c0, w);
        at::mm_out(rows, dq_view.t(), P.x2d);
      }
    }
    order = P.order;
    if (need_x) grad_x = dx.view({B, N, x.size(2)}).to(x.scalar_type());
    if (need_directions) {
      if (normalize_directions) normalize_backward<scalar_t>(dtheta, P.dir, P.scale);
      grad_dir = dtheta.to(directions.scalar_type());
    }
  });
  if (!grad_x.defined()) grad_x = at::empty({0}, x.options());
  if (!grad_dir.defined()) grad_dir = at::empty({0}, directions.options());
  at::Tensor grad_ref = at::empty_like(grad_ref_s).scatter_(0, order, grad_ref_s).to(references.scalar_type());
  at::Tensor grad_w = code == kWeighted
                          ? at::empty_like(grad_w_s).scatter_(0, order, grad_w_s).to(weights->scalar_type())
                          : at::empty({0}, references.options());
  return {grad_x, grad_dir, grad_ref, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(omniret, CPU, m) {
  m.impl("aswp_pool_fwd", &aswp_pool_fwd_cpu);
  m.impl("aswp_pool_bwd", &aswp_pool_bwd_cpu);
}

}  // namespace omniret
