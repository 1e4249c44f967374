// CPU kernels of omniret::diversity_loss_fwd / _bwd / _fwd_grad and diversity_keep_mask (SPEC section 3).
//
// One pass per sample does everything the loss and its gradient need, while the sample (N x D) sits in L2:
//   1. the keep bits of the whole N x N mask (Philox4x32-10, eight blocks at a time with AVX2);
//   2. the inverse norms (the only read of the sample from memory);
//   3. the dot products of the kept pairs only (about 1 - p of the Gram work), four columns per row load;
//   4. the loss and, when a gradient is wanted, the coefficient matrix W (nonzero only on kept pairs in either
//      direction and on the diagonal) that folds smooth-L1', relu', the dropout scale and the normalization
//      Jacobian: dm_i = sum_j W_ij m_j;
//   5. the gradient rows, D-chunk by D-chunk so that the chunk of all N rows stays in L1, written once with
//      non-temporal stores (the gradient is not read again soon; streaming skips the read-for-ownership).
// diversity_loss_fwd runs 1-4 without W; diversity_loss_bwd and diversity_loss_fwd_grad run all of it (the
// latter is what autograd uses on CPU: the gradient is computed in the forward and handed to backward, so m is
// read and the mask drawn once per step instead of twice). Extra memory: O(N^2) per thread, the gradient, and a
// float copy of m for 16-bit input; no (B, N, N) tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <vector>

#include "omniret/counter_rng.h"
#include "omniret/diversity_loss_checks.h"
#include "omniret/diversity_loss_math.h"

namespace omniret {
namespace {

// ---- inner kernels -------------------------------------------------------------------------------------------
// Explicit AVX2/FMA with several independent accumulators: one FMA chain per output would stall on FMA latency,
// and ISO C++ mode (-std=c++20) keeps g++ from contracting a * b + c into an FMA on its own.
#if defined(__AVX2__) && defined(__FMA__)
#define OMNIRET_DIVERSITY_AVX2 1
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static V broadcast(float x) { return _mm256_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};
template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int kWidth = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm256_stream_pd(p, v); }  // p 32-byte aligned
  static V broadcast(double x) { return _mm256_set1_pd(x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static double sum(V v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

// out[k] = <a, b[k]> for K columns at once: a is loaded once per K FMAs, 2K accumulators in flight.
template <typename T, int K>
inline void dot_k(const T* __restrict a, const T* const* b, int64_t d, T* out) {
  using S = Simd<T>;
  constexpr int W = S::kWidth;
  typename S::V acc[K][2];
  for (int k = 0; k < K; ++k) acc[k][0] = acc[k][1] = S::zero();
  int64_t x = 0;
  for (; x + 2 * W <= d; x += 2 * W) {
    const typename S::V a0 = S::load(a + x), a1 = S::load(a + x + W);
    for (int k = 0; k < K; ++k) {
      acc[k][0] = S::fmadd(a0, S::load(b[k] + x), acc[k][0]);
      acc[k][1] = S::fmadd(a1, S::load(b[k] + x + W), acc[k][1]);
    }
  }
  for (int k = 0; k < K; ++k) {
    T s = S::sum(acc[k][0]) + S::sum(acc[k][1]);
    for (int64_t t = x; t < d; ++t) s += a[t] * b[k][t];
    out[k] = s;
  }
}

// out[x0:x1] = sum_k w[k] * rows[js[k]][x0:x1]: eight vector accumulators per 8 vectors of columns, each output
// element written once (streamed when `aligned`: out + x0 is then 32-byte aligned at every full vector).
template <typename T>
inline void combine_range(T* __restrict out, const T* w, const int32_t* js, int64_t count, const T* rows,
                          int64_t d, int64_t x0, int64_t x1, bool aligned) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::kWidth;
  int64_t x = x0;
  for (; x + 8 * W <= x1; x += 8 * W) {
    V a[8];
    for (int u = 0; u < 8; ++u) a[u] = S::zero();
    for (int64_t k = 0; k < count; ++k) {
      const V wk = S::broadcast(w[k]);
      const T* r = rows + js[k] * d + x;
      for (int u = 0; u < 8; ++u) a[u] = S::fmadd(wk, S::load(r + u * W), a[u]);
    }
    if (aligned) {
      for (int u = 0; u < 8; ++u) S::stream(out + x + u * W, a[u]);
    } else {
      for (int u = 0; u < 8; ++u) S::store(out + x + u * W, a[u]);
    }
  }
  for (; x + W <= x1; x += W) {
    V a = S::zero();
    for (int64_t k = 0; k < count; ++k) a = S::fmadd(S::broadcast(w[k]), S::load(rows + js[k] * d + x), a);
    if (aligned)
      S::stream(out + x, a);
    else
      S::store(out + x, a);
  }
  for (; x < x1; ++x) {
    T s = 0;
    for (int64_t k = 0; k < count; ++k) s += w[k] * rows[js[k] * d + x];
    out[x] = s;
  }
}

inline void stream_fence() { _mm_sfence(); }
#else  // portable fallback
template <typename T, int K>
inline void dot_k(const T* __restrict a, const T* const* b, int64_t d, T* out) {
  for (int k = 0; k < K; ++k) {
    T s = 0;
    for (int64_t x = 0; x < d; ++x) s += a[x] * b[k][x];
    out[k] = s;
  }
}

template <typename T>
inline void combine_range(T* __restrict out, const T* w, const int32_t* js, int64_t count, const T* rows,
                          int64_t d, int64_t x0, int64_t x1, bool /*aligned*/) {
  for (int64_t x = x0; x < x1; ++x) {
    T s = 0;
    for (int64_t k = 0; k < count; ++k) s += w[k] * rows[js[k] * d + x];
    out[x] = s;
  }
}

inline void stream_fence() {}
#endif

template <typename T>
inline void dot_group(const T* a, const T* const* b, int count, int64_t d, T* out) {
  switch (count) {
    case 4: dot_k<T, 4>(a, b, d, out); break;
    case 3: dot_k<T, 3>(a, b, d, out); break;
    case 2: dot_k<T, 2>(a, b, d, out); break;
    default: dot_k<T, 1>(a, b, d, out); break;
  }
}

// ---- keep bits -----------------------------------------------------------------------------------------------
// Bit j % 64 of words[j / 64] = keep[b, i, j] for j < n (higher bits of the last word are 0). The same Philox
// blocks as diversity_keep_block in counter_rng.h (tested bit for bit against Python through diversity_keep_mask).
#if defined(OMNIRET_DIVERSITY_AVX2)
// hi and lo 32-bit halves of a * m in each of the 8 lanes (m a broadcast constant).
inline __m256i mul_hi_lo(__m256i a, __m256i m, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // 64-bit products of lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // and of lanes 1, 3, 5, 7
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Bit 4k of spread_bits(m) = bit k of m (k < 8): moves a lane mask to the columns 4 * block + word.
constexpr std::array<uint32_t, 256> make_spread_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t m = 0; m < 256; ++m)
    for (uint32_t k = 0; k < 8; ++k)
      if (m >> k & 1u) t[m] |= 1u << (4 * k);
  return t;
}
constexpr std::array<uint32_t, 256> kSpread = make_spread_table();

void keep_row_bits(uint64_t seed, uint32_t b, uint32_t i, int64_t n, uint32_t threshold, uint64_t* words) {
  const int64_t num_words = (n + 63) / 64;
  std::memset(words, 0, num_words * sizeof(uint64_t));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  // 8 Philox blocks = 32 columns per step.
  for (int64_t col = 0; col < n; col += 32) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(col / 4)), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(i)), c2 = _mm256_set1_epi32(static_cast<int>(b));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(kDiversityStream));
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m256i lo0, lo1;
      const __m256i hi0 = mul_hi_lo(c0, m0, &lo0), hi1 = mul_hi_lo(c2, m1, &lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    // word >= threshold (unsigned) <=> max(word, threshold) == word
    const __m256i words_out[4] = {c0, c1, c2, c3};
    uint32_t bits = 0;
    for (int w = 0; w < 4; ++w) {
      const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(words_out[w], thr), words_out[w]);
      bits |= kSpread[static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(keep)))] << w;
    }
    if (n - col < 32) bits &= (uint32_t(1) << (n - col)) - 1u;
    words[col / 64] |= static_cast<uint64_t>(bits) << (col % 64);
  }
}
#else
void keep_row_bits(uint64_t seed, uint32_t b, uint32_t i, int64_t n, uint32_t threshold, uint64_t* words) {
  const int64_t num_words = (n + 63) / 64;
  std::memset(words, 0, num_words * sizeof(uint64_t));
  for (int64_t jb = 0; jb * 4 < n; ++jb) {
    const Philox4x32 block = diversity_keep_block(seed, b, i, static_cast<uint32_t>(jb));
    for (int lane = 0; lane < 4 && jb * 4 + lane < n; ++lane)
      if (block.v[lane] >= threshold) words[(jb * 4 + lane) / 64] |= uint64_t(1) << ((jb * 4 + lane) % 64);
  }
}
#endif

// Pulls the next sample into L2 a few cache lines at a time while the current one is computed from cache: the
// norm pass of that sample then reads L2 instead of waiting on memory.
class Prefetcher {
 public:
  void start(const void* p, int64_t bytes, int64_t steps) {
    next_ = static_cast<const char*>(p);
    end_ = p == nullptr ? next_ : next_ + bytes;
    lines_per_step_ = steps > 0 ? (bytes / 64 + steps - 1) / steps : 0;
  }
  void step() {
#if defined(OMNIRET_DIVERSITY_AVX2)
    for (int64_t k = 0; k < lines_per_step_ && next_ < end_; ++k, next_ += 64) _mm_prefetch(next_, _MM_HINT_T1);
#endif
  }

 private:
  const char* next_ = nullptr;
  const char* end_ = nullptr;
  int64_t lines_per_step_ = 0;
};

// ---- one sample ----------------------------------------------------------------------------------------------
struct LossParams {
  uint64_t seed;
  uint32_t threshold;
  double scale;   // 1 / (1 - p)
  double gamma;
  bool normalize;
};

// Per-thread scratch and the pass over one sample (steps 1-5 of the file comment).
template <typename T>
class SampleKernel {
 public:
  SampleKernel(int64_t n, int64_t d, const LossParams& params)
      : n_(n), d_(d), words_((n + 63) / 64), params_(params), inv_(n), keep_(n * words_), kept_start_(n + 1),
        kept_cols_(n * n), dots_(n * n) {}

  // Returns the sum over kept pairs of the smooth-L1 terms of sample x (N x D, row-major). When grad is not
  // null, also writes grad = weight * d(sum)/dx (N x D).
  double run(const T* x, const T* x_next, int64_t b, T* grad, T weight) {
    const int64_t chunks = grad == nullptr ? 0 : (d_ + kChunk - 1) / kChunk;
    prefetch_.start(x_next, n_ * d_ * static_cast<int64_t>(sizeof(T)), n_ * (1 + chunks));
    draw_mask(b);
    inverse_norms(x, b);
    kept_dots(x);
    const T scale = static_cast<T>(params_.scale), gamma = static_cast<T>(params_.gamma);
    double total = 0.0;
    for (int64_t i = 0; i < n_; ++i)
      for (int32_t e = kept_start_[i]; e < kept_start_[i + 1]; ++e)
        total += static_cast<double>(diversity_pair_loss(dots_[e], kept_cols_[e] == i, scale, gamma));
    TORCH_CHECK_VALUE(std::isfinite(total), "diversity_loss: sample ", b,
                      " gives a non-finite loss (m contains NaN or Inf)");
    if (grad != nullptr) {
      build_coefficients(weight);
      write_gradient(x, grad);
    }
    return total;
  }

 private:
  void draw_mask(int64_t b) {
    int32_t count = 0;
    for (int64_t i = 0; i < n_; ++i) {
      uint64_t* row = keep_.data() + i * words_;
      keep_row_bits(params_.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(i), n_, params_.threshold, row);
      kept_start_[i] = count;
      for (int64_t w = 0; w < words_; ++w)
        for (uint64_t bits = row[w]; bits != 0; bits &= bits - 1)
          kept_cols_[count++] = static_cast<int32_t>(w * 64 + __builtin_ctzll(bits));
    }
    kept_start_[n_] = count;
  }

  // 1 / ||m_i|| for every row (1 when not normalizing); raises on zero or non-finite rows.
  void inverse_norms(const T* x, int64_t b) {
    for (int64_t i = 0; i < n_; ++i) {
      if (!params_.normalize) {
        inv_[i] = T(1);
        continue;
      }
      const T* row = x + i * d_;
      T ss;
      dot_k<T, 1>(row, &row, d_, &ss);
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(ss)), "diversity_loss: m[", b, ", ", i,
                        "] contains NaN or Inf (or its squared norm overflows)");
      TORCH_CHECK_VALUE(ss > T(0), "diversity_loss: m[", b, ", ", i,
                        "] is a zero vector; normalize=True needs every token to have a nonzero norm");
      inv_[i] = T(1) / std::sqrt(ss);
    }
  }

  // dots_[e] = g of kept pair e: <m_i, m_j> * inv_i * inv_j.
  void kept_dots(const T* x) {
    for (int64_t i = 0; i < n_; ++i) {
      const T* xi = x + i * d_;
      for (int32_t e = kept_start_[i]; e < kept_start_[i + 1]; e += 4) {
        const int count = static_cast<int>(std::min<int32_t>(4, kept_start_[i + 1] - e));
        const T* rows[4];
        for (int k = 0; k < count; ++k) rows[k] = x + kept_cols_[e + k] * d_;
        dot_group(xi, rows, count, d_, dots_.data() + e);
        for (int k = 0; k < count; ++k) dots_[e + k] *= inv_[i] * inv_[kept_cols_[e + k]];
      }
      prefetch_.step();
    }
  }

  // W (dense N x N scratch, zero outside the nonzero lists) and the nonzero lists of its rows:
  //   c_ij = weight * dL/dg_ij on kept pairs; g_ij feeds u_i and u_j, so C = c + c^T;
  //   dm_i = inv_i * (sum_j C_ij inv_j m_j - <dL/du_i, u_i> inv_i m_i),  <dL/du_i, u_i> = sum_j C_ij g_ij.
  void build_coefficients(T weight) {
    if (coef_.empty()) {
      coef_.assign(n_ * n_, T(0));
      diag_.assign(n_, T(0));
      nonzero_bits_.assign(n_ * words_, 0);
      nz_start_.resize(n_ + 1);
      nz_cols_.resize(n_ * n_);
      nz_weights_.resize(n_ * n_);
    }
    const T scale = static_cast<T>(params_.scale), gamma = static_cast<T>(params_.gamma);
    std::fill(diag_.begin(), diag_.end(), T(0));
    std::fill(nonzero_bits_.begin(), nonzero_bits_.end(), 0);
    for (int64_t i = 0; i < n_; ++i) {
      for (int32_t e = kept_start_[i]; e < kept_start_[i + 1]; ++e) {
        const int64_t j = kept_cols_[e];
        const T g = dots_[e];
        const T c = weight * diversity_pair_grad(g, j == i, scale, gamma);
        if (c == T(0)) continue;
        const T w = c * inv_[i] * inv_[j];
        coef_[i * n_ + j] += w;
        coef_[j * n_ + i] += w;
        diag_[i] += c * g;
        diag_[j] += c * g;
        nonzero_bits_[i * words_ + j / 64] |= uint64_t(1) << (j % 64);
        nonzero_bits_[j * words_ + i / 64] |= uint64_t(1) << (i % 64);
      }
    }
    int32_t count = 0;
    for (int64_t i = 0; i < n_; ++i) {
      if (params_.normalize && diag_[i] != T(0)) {
        coef_[i * n_ + i] -= diag_[i] * inv_[i] * inv_[i];
        nonzero_bits_[i * words_ + i / 64] |= uint64_t(1) << (i % 64);
      }
      nz_start_[i] = count;
      for (int64_t w = 0; w < words_; ++w) {
        for (uint64_t bits = nonzero_bits_[i * words_ + w]; bits != 0; bits &= bits - 1) {
          const int64_t j = w * 64 + __builtin_ctzll(bits);
          nz_cols_[count] = static_cast<int32_t>(j);
          nz_weights_[count++] = coef_[i * n_ + j];
          coef_[i * n_ + j] = T(0);  // leave the scratch zero for the next sample
        }
      }
    }
    nz_start_[n_] = count;
  }

  // grad_i = sum_j W_ij m_j, in chunks of D that keep all N rows' chunk in L1 (512 bytes a row).
  void write_gradient(const T* x, T* grad) {
    const bool aligned = reinterpret_cast<uintptr_t>(grad) % 32 == 0 && (d_ * sizeof(T)) % 32 == 0;
    for (int64_t x0 = 0; x0 < d_; x0 += kChunk) {
      const int64_t x1 = std::min(d_, x0 + kChunk);
      for (int64_t i = 0; i < n_; ++i) {
        combine_range(grad + i * d_, nz_weights_.data() + nz_start_[i], nz_cols_.data() + nz_start_[i],
                      nz_start_[i + 1] - nz_start_[i], x, d_, x0, x1, aligned);
        prefetch_.step();
      }
    }
  }

  static constexpr int64_t kChunk = 512 / sizeof(T);  // gradient columns per pass: N rows x 512 B stay in L1
  const int64_t n_, d_, words_;
  const LossParams params_;
  Prefetcher prefetch_;
  std::vector<T> inv_;
  std::vector<uint64_t> keep_;       // N x words_ keep bits
  std::vector<int32_t> kept_start_;  // CSR of the kept pairs, row by row
  std::vector<int32_t> kept_cols_;
  std::vector<T> dots_;              // g of each kept pair
  std::vector<T> coef_, diag_;       // gradient only
  std::vector<uint64_t> nonzero_bits_;
  std::vector<int32_t> nz_start_, nz_cols_;
  std::vector<T> nz_weights_;
};

// Sum over samples of the kept pairs' loss terms divided by B N^2 (the loss); with grad defined, also
// grad = grad_out * dloss/dm. Per-sample sums are added in order: deterministic for any thread count.
template <typename T>
double run_all(const at::Tensor& mc, const LossParams& params, double grad_out, T* grad) {
  const int64_t B = mc.size(0), N = mc.size(1), D = mc.size(2);
  const T* data = mc.const_data_ptr<T>();
  const double count = static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(N);
  const T weight = static_cast<T>(grad_out / count);
  std::vector<double> per_sample(B, 0.0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    SampleKernel<T> kernel(N, D, params);
    for (int64_t b = begin; b < end; ++b)
      per_sample[b] = kernel.run(data + b * N * D, b + 1 < end ? data + (b + 1) * N * D : nullptr, b,
                                 grad == nullptr ? nullptr : grad + b * N * D, weight);
    stream_fence();  // the streamed gradient stores are visible before the op returns
  });
  double sum = 0.0;
  for (double v : per_sample) sum += v;
  return sum / count;
}

// The compute copy of m: float for float/half/bfloat16, double for double; contiguous.
at::Tensor compute_copy(const at::Tensor& m) {
  const auto dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return m.to(dtype).contiguous();
}

// A fresh gradient as large as m comes from mmap, and first-touching it 4 KiB page by page costs more than the
// kernel's arithmetic (~25k faults per 100 MB). Asking for transparent huge pages on it (the system default here
// is THP "madvise") cuts that 512-fold. Only a hint: without THP nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

LossParams make_params(const at::Tensor& seed, double p, double gamma, bool normalize) {
  return LossParams{static_cast<uint64_t>(seed.item<int64_t>()), keep_threshold(p), 1.0 / (1.0 - p), gamma,
                    normalize};
}

// The loss, and the gradient grad_out * dloss/dm in m's dtype when want_grad.
std::tuple<at::Tensor, at::Tensor> loss_and_grad(const at::Tensor& m, const at::Tensor& seed, double p,
                                                 double gamma, bool normalize, bool want_grad, double grad_out) {
  check_diversity_loss_args(m, seed, p, gamma);
  const at::Tensor mc = compute_copy(m);
  const LossParams params = make_params(seed, p, gamma, normalize);
  at::Tensor grad;
  if (want_grad) {
    grad = at::empty_like(mc);
    advise_huge_pages(grad);
  }
  double loss;
  if (mc.scalar_type() == at::kDouble)
    loss = run_all<double>(mc, params, grad_out, want_grad ? grad.mutable_data_ptr<double>() : nullptr);
  else
    loss = run_all<float>(mc, params, grad_out, want_grad ? grad.mutable_data_ptr<float>() : nullptr);
  return {at::scalar_tensor(loss, m.options()), want_grad ? grad.to(m.scalar_type()) : grad};
}

at::Tensor diversity_loss_fwd_cpu(const at::Tensor& m, const at::Tensor& seed, double p, double gamma,
                                  bool normalize) {
  return std::get<0>(loss_and_grad(m, seed, p, gamma, normalize, /*want_grad=*/false, 0.0));
}

at::Tensor diversity_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& m, const at::Tensor& seed,
                                  double p, double gamma, bool normalize) {
  check_diversity_loss_grad(grad_loss);
  return std::get<1>(loss_and_grad(m, seed, p, gamma, normalize, /*want_grad=*/true, grad_loss.item<double>()));
}

std::tuple<at::Tensor, at::Tensor> diversity_loss_fwd_grad_cpu(const at::Tensor& m, const at::Tensor& seed,
                                                               double p, double gamma, bool normalize) {
  return loss_and_grad(m, seed, p, gamma, normalize, /*want_grad=*/true, 1.0);
}

at::Tensor diversity_keep_mask_cpu(const at::Tensor& seed, int64_t batch, int64_t n, double p) {
  check_diversity_keep_mask_args(seed, batch, n, p);
  at::Tensor mask = at::empty({batch, n, n}, seed.options().dtype(at::kBool));
  bool* out = mask.mutable_data_ptr<bool>();
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = keep_threshold(p);
  // The same row generator as the loss kernels, so the tests that compare this mask with Python's check it.
  at::parallel_for(0, batch * n, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> words((n + 63) / 64);
    for (int64_t row = begin; row < end; ++row) {
      keep_row_bits(s, static_cast<uint32_t>(row / n), static_cast<uint32_t>(row % n), n, threshold, words.data());
      for (int64_t j = 0; j < n; ++j) out[row * n + j] = (words[j / 64] >> (j % 64)) & 1u;
    }
  });
  return mask;
}

}  // namespace
}  // namespace omniret

// The fused forward + gradient op is CPU-only and internal (omniret_kernels/diversity.py uses it when autograd
// will need the gradient), so its schema lives beside its only kernel rather than in csrc/ops.cpp.
TORCH_LIBRARY_FRAGMENT(omniret, m) {
  m.def("diversity_loss_fwd_grad(Tensor m, Tensor seed, float p, float gamma, bool normalize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(omniret, CPU, m) {
  m.impl("diversity_loss_fwd", &omniret::diversity_loss_fwd_cpu);
  m.impl("diversity_loss_bwd", &omniret::diversity_loss_bwd_cpu);
  m.impl("diversity_loss_fwd_grad", &omniret::diversity_loss_fwd_grad_cpu);
  m.impl("diversity_keep_mask", &omniret::diversity_keep_mask_cpu);
}
