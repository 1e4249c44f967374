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
#include <vector>

#include "omniret/counter_rng.h"
#include "omniret/diversity_loss_math.h"

namespace omniret {
namespace {

// out[k] = <a, b[k]> for K columns at once (a is loaded once per K FMAs).
template <typename T, int K>
inline void dot_k(const T* __restrict a, const T* const* b, int64_t d, T* out) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const T* __restrict b0 = b[0];
  const T* __restrict b1 = b[K > 1 ? 1 : 0];
  const T* __restrict b2 = b[K > 2 ? 2 : 0];
  const T* __restrict b3 = b[K > 3 ? 3 : 0];
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t x = 0; x < d; ++x) {
    const T av = a[x];
    s0 += av * b0[x];
    if constexpr (K > 1) s1 += av * b1[x];
    if constexpr (K > 2) s2 += av * b2[x];
    if constexpr (K > 3) s3 += av * b3[x];
  }
  out[0] = s0;
  if constexpr (K > 1) out[1] = s1;
  if constexpr (K > 2) out[2] = s2;
  if constexpr (K > 3) out[3] = s3;
}

// out += sum_k w[k] * b[k] for K rows at once (out is loaded and stored once per K FMAs).
template <typename T, int K>
inline void axpy_k(T* __restrict out, const T* w, const T* const* b, int64_t d) {
  const T w0 = w[0], w1 = K > 1 ? w[1] : T(0), w2 = K > 2 ? w[2] : T(0), w3 = K > 3 ? w[3] : T(0);
  const T* __restrict b0 = b[0];
  const T* __restrict b1 = b[K > 1 ? 1 : 0];
  const T* __restrict b2 = b[K > 2 ? 2 : 0];
  const T* __restrict b3 = b[K > 3 ? 3 : 0];
#pragma omp simd
  for (int64_t x = 0; x < d; ++x) {
    T acc = out[x] + w0 * b0[x];
    if constexpr (K > 1) acc += w1 * b1[x];
    if constexpr (K > 2) acc += w2 * b2[x];
    if constexpr (K > 3) acc += w3 * b3[x];
    out[x] = acc;
  }
}

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

template <typename T>
inline void axpy_group(T* out, const T* w, const T* const* b, int count, int64_t d) {
  switch (count) {
    case 4: axpy_k<T, 4>(out, w, b, d); break;
    case 3: axpy_k<T, 3>(out, w, b, d); break;
    case 2: axpy_k<T, 2>(out, w, b, d); break;
    default: axpy_k<T, 1>(out, w, b, d); break;
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
    std::vector<T> inv(N), coef(N * N), diag(N);
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
      // Pass 2: dm_i = inv_i * (sum_j coef_ij inv_j m_j - diag_i inv_i m_i)  (normalization Jacobian).
      for (int64_t i = 0; i < N; ++i) {
        T* gi = out + (b * N + i) * D;
        std::fill(gi, gi + D, T(0));
        cols.clear();
        T* wi = coef.data() + i * N;  // row i of coef becomes row i of W (no later row reads it)
        for (int64_t j = 0; j < N; ++j) wi[j] *= inv[i] * inv[j];
        if (normalize) wi[i] -= diag[i] * inv[i] * inv[i];
        for (int64_t j = 0; j < N; ++j)
          if (wi[j] != T(0)) cols.push_back(j);
        for_each_group_of_four(cols, [&](const int64_t* js, int64_t count) {
          const T* rows[4];
          T ws[4];
          for (int k = 0; k < count; ++k) {
            rows[k] = x + js[k] * D;
            ws[k] = wi[js[k]];
          }
          axpy_group(gi, ws, rows, static_cast<int>(count), D);
        });
      }
    }
  });
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
