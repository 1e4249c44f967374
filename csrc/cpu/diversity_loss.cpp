// CPU kernels of omniret::diversity_loss_fwd / _bwd / diversity_keep_mask (SPEC section 3).
//
// Only the kept pairs are computed: for every row i the Philox keep bits of (b, i, 0..N-1) are regenerated, and
// the dot products <m_i, m_j> of the kept j (about 1 - p of the Gram work) are formed four at a time so that
// m_i is loaded once per four columns. Norms are computed once per sample. The backward regenerates the same
// mask, folds smooth-L1', relu', dropout scale and the normalization Jacobian into a per-sample N x N
// coefficient matrix W (thread-local scratch, nonzero only on kept pairs and the diagonal), then writes
// dm_i = sum_j W_ij m_j row by row. Extra memory: O(N^2) per thread, plus one float copy of m for 16-bit input.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <vector>

#include "omniret/counter_rng.h"
#include "omniret/diversity_loss_math.h"

namespace omniret {
namespace {

// ---- inner kernels -------------------------------------------------------------------------------------------
// Explicit AVX2/FMA with several independent accumulators: one FMA chain per output would stall on FMA latency,
// and ISO C++ mode (-std=c++20) keeps g++ from contracting a * b + c into an FMA on its own.
#if defined(__AVX2__) && defined(__FMA__)
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
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

// out = sum_k w[k] * b[k] over all `count` rows, written once: 4 vector accumulators per 32 (float) columns.
template <typename T>
inline void combine_rows(T* __restrict out, const T* w, const T* const* b, int64_t count, int64_t d) {
  using S = Simd<T>;
  constexpr int W = S::kWidth;
  int64_t x = 0;
  for (; x + 4 * W <= d; x += 4 * W) {
    typename S::V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
    for (int64_t k = 0; k < count; ++k) {
      const typename S::V wk = S::broadcast(w[k]);
      const T* bk = b[k] + x;
      a0 = S::fmadd(wk, S::load(bk), a0);
      a1 = S::fmadd(wk, S::load(bk + W), a1);
      a2 = S::fmadd(wk, S::load(bk + 2 * W), a2);
      a3 = S::fmadd(wk, S::load(bk + 3 * W), a3);
    }
    S::store(out + x, a0);
    S::store(out + x + W, a1);
    S::store(out + x + 2 * W, a2);
    S::store(out + x + 3 * W, a3);
  }
  for (; x + W <= d; x += W) {
    typename S::V a0 = S::zero();
    for (int64_t k = 0; k < count; ++k) a0 = S::fmadd(S::broadcast(w[k]), S::load(b[k] + x), a0);
    S::store(out + x, a0);
  }
  for (; x < d; ++x) {
    T s = 0;
    for (int64_t k = 0; k < count; ++k) s += w[k] * b[k][x];
    out[x] = s;
  }
}
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
inline void combine_rows(T* __restrict out, const T* w, const T* const* b, int64_t count, int64_t d) {
  for (int64_t x = 0; x < d; ++x) {
    T s = 0;
    for (int64_t k = 0; k < count; ++k) s += w[k] * b[k][x];
    out[x] = s;
  }
}
#endif

// Calls f(columns, count) on groups of up to four entries of `cols`, dispatching to the K-wide kernels.
template <typename F>
inline void for_each_group_of_four(const std::vector<int64_t>& cols, F&& f) {
  const int64_t n = static_cast<int64_t>(cols.size());
  for (int64_t s = 0; s < n; s += 4) f(cols.data() + s, std::min<int64_t>(4, n - s));
}

template <typename T>
inline void dot_group(const T* a, const T* const* b, int count, int64_t d, T* out) {
  switch (count) {
    case 4: dot_k<T, 4>(a, b, d, out); break;
    case 3: dot_k<T, 3>(a, b, d, out); break;
    case 2: dot_k<T, 2>(a, b, d, out); break;
    default: dot_k<T, 1>(a, b, d, out); break;
  }
}

// The kept columns j of row i of sample b, in increasing order.
inline void kept_columns(uint64_t seed, int64_t b, int64_t i, int64_t n, uint32_t threshold,
                         std::vector<int64_t>& cols) {
  cols.clear();
  for (int64_t jb = 0; jb * 4 < n; ++jb) {
    const Philox4x32 block = diversity_keep_block(seed, static_cast<uint32_t>(b), static_cast<uint32_t>(i),
                                                  static_cast<uint32_t>(jb));
    for (int lane = 0; lane < 4 && jb * 4 + lane < n; ++lane)
      if (block.v[lane] >= threshold) cols.push_back(jb * 4 + lane);
  }
}

// 1 / ||m_i|| for every row of one sample (or 1 when not normalizing); raises on zero or non-finite rows.
template <typename T>
void inverse_norms(const T* x, int64_t b, int64_t n, int64_t d, bool normalize, T* inv) {
  for (int64_t i = 0; i < n; ++i) {
    if (!normalize) {
      inv[i] = T(1);
      continue;
    }
    const T* row = x + i * d;
    T ss;
    dot_k<T, 1>(row, &row, d, &ss);
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(ss)), "diversity_loss: m[", b, ", ", i,
                      "] contains NaN or Inf (or its squared norm overflows)");
    TORCH_CHECK_VALUE(ss > T(0), "diversity_loss: m[", b, ", ", i,
                      "] is a zero vector; normalize=True needs every token to have a nonzero norm");
    inv[i] = T(1) / std::sqrt(ss);
  }
}

void check_args(const at::Tensor& m, const at::Tensor& seed, double p, double gamma) {
  TORCH_CHECK_VALUE(m.dim() == 3, "diversity_loss: m must have shape (B, N, D), got ", m.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(m.scalar_type()), "diversity_loss: m must be floating point, got ",
                    m.scalar_type());
  TORCH_CHECK_VALUE(m.size(0) > 0 && m.size(1) > 0 && m.size(2) > 0,
                    "diversity_loss: m must be non-empty, got shape ", m.sizes());
  TORCH_CHECK_VALUE(m.size(1) <= (int64_t(1) << 31) && m.size(0) <= (int64_t(1) << 32),
                    "diversity_loss: B and N must fit the 32-bit Philox counter");
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "diversity_loss: seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "diversity_loss: p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(gamma > 0.0, "diversity_loss: gamma must be > 0, got ", gamma);
}

// The compute copy of m: float for float/half/bfloat16, double for double; contiguous.
at::Tensor compute_copy(const at::Tensor& m) {
  const auto dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return m.to(dtype).contiguous();
}

template <typename T>
double forward_impl(const at::Tensor& mc, uint64_t seed, double p, double gamma, bool normalize) {
  const int64_t B = mc.size(0), N = mc.size(1), D = mc.size(2);
  const T* data = mc.const_data_ptr<T>();
  const uint32_t threshold = keep_threshold(p);
  const T scale = static_cast<T>(1.0 / (1.0 - p)), g_gamma = static_cast<T>(gamma);
  std::vector<double> per_sample(B, 0.0);  // summed in order afterwards: deterministic for any thread count
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> inv(N);
    std::vector<int64_t> cols;
    cols.reserve(N);
    for (int64_t b = begin; b < end; ++b) {
      const T* x = data + b * N * D;
      inverse_norms(x, b, N, D, normalize, inv.data());
      double total = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        kept_columns(seed, b, i, N, threshold, cols);
        const T* xi = x + i * D;
        for_each_group_of_four(cols, [&](const int64_t* js, int64_t count) {
          const T* rows[4];
          T dots[4];
          for (int k = 0; k < count; ++k) rows[k] = x + js[k] * D;
          dot_group(xi, rows, static_cast<int>(count), D, dots);
          for (int k = 0; k < count; ++k) {
            const T g = dots[k] * inv[i] * inv[js[k]];
            total += static_cast<double>(diversity_pair_loss(g, js[k] == i, scale, g_gamma));
          }
        });
      }
      TORCH_CHECK_VALUE(std::isfinite(total), "diversity_loss: sample ", b,
                        " gives a non-finite loss (m contains NaN or Inf)");
      per_sample[b] = total;
    }
  });
  double sum = 0.0;
  for (double v : per_sample) sum += v;
  return sum / (static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(N));
}

template <typename T>
void backward_impl(const at::Tensor& mc, uint64_t seed, double p, double gamma, bool normalize, double grad_out,
                   at::Tensor& grad) {
  const int64_t B = mc.size(0), N = mc.size(1), D = mc.size(2);
  const T* data = mc.const_data_ptr<T>();
  T* out = grad.mutable_data_ptr<T>();
  const uint32_t threshold = keep_threshold(p);
  const T scale = static_cast<T>(1.0 / (1.0 - p)), g_gamma = static_cast<T>(gamma);
  const T weight = static_cast<T>(grad_out / (static_cast<double>(B) * static_cast<double>(N) * N));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> inv(N), coef(N * N), diag(N), nonzero_weights(N);
    std::vector<const T*> nonzero_rows(N);
    std::vector<int64_t> cols;
    cols.reserve(N);
    for (int64_t b = begin; b < end; ++b) {
      const T* x = data + b * N * D;
      inverse_norms(x, b, N, D, normalize, inv.data());
      std::fill(coef.begin(), coef.end(), T(0));
      std::fill(diag.begin(), diag.end(), T(0));
      // Pass 1: dL/dg of every kept pair, scattered symmetrically (g_ij = <u_i, u_j> feeds u_i and u_j).
      for (int64_t i = 0; i < N; ++i) {
        kept_columns(seed, b, i, N, threshold, cols);
        const T* xi = x + i * D;
        for_each_group_of_four(cols, [&](const int64_t* js, int64_t count) {
          const T* rows[4];
          T dots[4];
          for (int k = 0; k < count; ++k) rows[k] = x + js[k] * D;
          dot_group(xi, rows, static_cast<int>(count), D, dots);
          for (int k = 0; k < count; ++k) {
            const int64_t j = js[k];
            const T g = dots[k] * inv[i] * inv[j];
            const T c = weight * diversity_pair_grad(g, j == i, scale, g_gamma);
            coef[i * N + j] += c;
            coef[j * N + i] += c;
            diag[i] += c * g;  // <dL/du_i, u_i> collects c * g from this pair on both ends
            diag[j] += c * g;
          }
        });
      }
      // Pass 2: dm_i = inv_i * (sum_j coef_ij inv_j m_j - diag_i inv_i m_i)  (normalization Jacobian), each
      // gradient row accumulated in registers over its nonzero coefficients and written once.
      for (int64_t i = 0; i < N; ++i) {
        T* wi = coef.data() + i * N;  // row i of coef becomes row i of W (no later row reads it)
        for (int64_t j = 0; j < N; ++j) wi[j] *= inv[i] * inv[j];
        if (normalize) wi[i] -= diag[i] * inv[i] * inv[i];
        int64_t count = 0;
        for (int64_t j = 0; j < N; ++j) {
          if (wi[j] != T(0)) {
            nonzero_weights[count] = wi[j];
            nonzero_rows[count++] = x + j * D;
          }
        }
        combine_rows(out + (b * N + i) * D, nonzero_weights.data(), nonzero_rows.data(), count, D);
      }
    }
  });
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

uint64_t read_seed(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

at::Tensor diversity_loss_fwd_cpu(const at::Tensor& m, const at::Tensor& seed, double p, double gamma,
                                  bool normalize) {
  check_args(m, seed, p, gamma);
  const at::Tensor mc = compute_copy(m);
  const uint64_t s = read_seed(seed);
  const double loss = mc.scalar_type() == at::kDouble ? forward_impl<double>(mc, s, p, gamma, normalize)
                                                      : forward_impl<float>(mc, s, p, gamma, normalize);
  return at::scalar_tensor(loss, m.options());
}

at::Tensor diversity_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& m, const at::Tensor& seed,
                                  double p, double gamma, bool normalize) {
  check_args(m, seed, p, gamma);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "diversity_loss: grad must be a scalar, got ", grad_loss.sizes());
  const at::Tensor mc = compute_copy(m);
  const double g = grad_loss.item<double>();
  at::Tensor grad = at::empty_like(mc);
  advise_huge_pages(grad);
  if (mc.scalar_type() == at::kDouble)
    backward_impl<double>(mc, read_seed(seed), p, gamma, normalize, g, grad);
  else
    backward_impl<float>(mc, read_seed(seed), p, gamma, normalize, g, grad);
  return grad.to(m.scalar_type());
}

at::Tensor diversity_keep_mask_cpu(const at::Tensor& seed, int64_t batch, int64_t n, double p) {
  TORCH_CHECK_VALUE(batch >= 0 && n >= 0, "diversity_keep_mask: batch and n must be >= 0");
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                    "diversity_keep_mask: seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "diversity_keep_mask: p must be in [0, 1), got ", p);
  at::Tensor mask = at::empty({batch, n, n}, seed.options().dtype(at::kBool));
  bool* out = mask.mutable_data_ptr<bool>();
  const uint64_t s = read_seed(seed);
  const uint32_t threshold = keep_threshold(p);
  at::parallel_for(0, batch * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t b = static_cast<uint32_t>(row / n), i = static_cast<uint32_t>(row % n);
      for (int64_t j = 0; j < n; ++j)
        out[row * n + j] = diversity_keep(s, b, i, static_cast<uint32_t>(j), threshold);
    }
  });
  return mask;
}

}  // namespace
}  // namespace omniret

TORCH_LIBRARY_IMPL(omniret, CPU, m) {
  m.impl("diversity_loss_fwd", &omniret::diversity_loss_fwd_cpu);
  m.impl("diversity_loss_bwd", &omniret::diversity_loss_bwd_cpu);
  m.impl("diversity_keep_mask", &omniret::diversity_keep_mask_cpu);
}
