// ASWP math shared by the CPU kernel (csrc/cpu/aswp_pool.cpp) and the CUDA kernel (csrc/cuda/aswp_pool.cu):
// sort keys, the bitonic sorting network, the quantile coupling of SPEC section 1 step 5, and the forward and
// gradient of every pooling mode over one column. Everything is OMNIRET_HD, so the CUDA kernel runs the same
// code the CPU kernel (and csrc/tests/test_aswp_pool_math.cpp) runs here.
#pragma once

#include "omniret/common.h"

#include <cmath>
#include <cstring>

namespace omniret {
namespace aswp {

enum Pooling : int { kStm = 0, kMax = 1, kMean = 2, kWeighted = 3 };

// ---------------------------------------------------------------------------------------------------------
// Sort keys. A float32 projection and its token index pack into one uint64 whose unsigned order is the
// lexicographic order of (value, index): sorting the keys is a stable sort of the values, and the sorted key
// still says which token it came from (the permutation backward needs). Padding (masked or power-of-two
// filler rows) uses kPadKey, which sorts after every real key.
// ---------------------------------------------------------------------------------------------------------
constexpr uint64_t kPadKey = ~uint64_t(0);

OMNIRET_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

OMNIRET_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
#endif
}

// Monotone map float -> uint32 (a < b as floats  <=>  ordered(a) < ordered(b) as unsigned). -0 becomes +0 first
// so that the two zeros tie (and then order by index), as they do in a stable comparison sort.
OMNIRET_HD uint32_t float_to_ordered(float v) {
  uint32_t b = float_bits(v + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

OMNIRET_HD float ordered_to_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

OMNIRET_HD uint64_t pack_key(float v, uint32_t index) {
  return (uint64_t(float_to_ordered(v)) << 32) | uint64_t(index);
}
OMNIRET_HD float key_value(uint64_t key) { return ordered_to_float(uint32_t(key >> 32)); }
OMNIRET_HD uint32_t key_index(uint64_t key) { return uint32_t(key & 0xffffffffu); }

OMNIRET_HD void compare_exchange(uint64_t& a, uint64_t& b) {
  const uint64_t lo = a < b ? a : b;
  b = a < b ? b : a;
  a = lo;
}

// float64 has no room for an index in 64 bits: its key is a (value, index) pair with the same lexicographic order.
struct KeyF64 {
  double value;
  int32_t index;  // -1 marks padding
};

OMNIRET_HD bool key_less(const KeyF64& a, const KeyF64& b) {
  if (a.index < 0) return false;  // padding is never less
  if (b.index < 0) return true;
  return a.value < b.value || (a.value == b.value && a.index < b.index);
}

OMNIRET_HD void compare_exchange(KeyF64& a, KeyF64& b) {
  if (key_less(b, a)) {
    const KeyF64 t = a;
    a = b;
    b = t;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Bitonic sorting network on n = 2^k rows. Stage (size, stride) for size = 2, 4, ..., n and stride = size/2,
// ..., 1 has n/2 independent comparators; comparator p of a stage orders rows (first, second) so that
// key[first] <= key[second] afterwards. The CPU kernel applies each comparator to a whole row of columns with
// vector min/max; the CUDA kernel spreads a stage's comparators over the threads of a block.
// ---------------------------------------------------------------------------------------------------------
OMNIRET_HD int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

OMNIRET_HD void bitonic_comparator(int size, int stride, int p, int& first, int& second) {
  const int i = (p / stride) * 2 * stride + (p % stride);  // the row of the pair whose `stride` bit is clear
  const int j = i + stride;
  const bool ascending = (i & size) == 0;
  first = ascending ? i : j;
  second = ascending ? j : i;
}

// Sorts n_pow2 keys spaced `stride` apart, ascending (the scalar form: tests, float64, one CUDA thread).
template <class Key>
OMNIRET_HD void bitonic_sort(Key* keys, int n_pow2, long long stride) {
  for (int size = 2; size <= n_pow2; size <<= 1) {
    for (int step = size >> 1; step > 0; step >>= 1) {
      for (int p = 0; p < n_pow2 / 2; ++p) {
        int a, b;
        bitonic_comparator(size, step, p, a, b);
        compare_exchange(keys[a * stride], keys[b * stride]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Quantile coupling (SPEC 1.5): reference rank r of M couples to t = (r + 0.5) * n / M - 0.5 clamped to
// [0, n - 1] among the n sorted valid projections: matched = s[lo] * (1 - w) + s[hi] * w. Computed in float64
// like the reference, then w is rounded to the compute type.
// ---------------------------------------------------------------------------------------------------------
OMNIRET_HD void quantile_position(int rank, int n, int m, int& lo, int& hi, double& w) {
  double t = (double(rank) + 0.5) * double(n) / double(m) - 0.5;
  t = t < 0.0 ? 0.0 : (t > double(n - 1) ? double(n - 1) : t);
  const double f = floor(t);
  lo = int(f);
  w = t - f;
  hi = lo + 1 < n ? lo + 1 : n - 1;
}

// psi[j] = matched(j) - ref[j] for one column; `sorted` holds the column's n sorted values `s_stride` apart,
// rank/ref are the column's M reference ranks and values, lo/hi/w the quantile table of this n indexed by rank.
template <class T>
OMNIRET_HD void couple_column(const T* sorted, long long s_stride, const int* rank, const T* ref, int m,
                              const int* lo, const int* hi, const T* w, T* psi) {
  for (int j = 0; j < m; ++j) {
    const int r = rank[j];
    const T wr = w[r];
    psi[j] = sorted[lo[r] * s_stride] * (T(1) - wr) + sorted[hi[r] * s_stride] * wr - ref[j];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pooling over j of one column psi[0..m). exp_approx is a Cephes-style float exp (max rel. error ~2 ulp) that
// vectorises on the CPU and is bit-identical on the GPU; float64 uses the libm exp.
// ---------------------------------------------------------------------------------------------------------
OMNIRET_HD float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * bits_float(uint32_t(int(n) + 127) << 23);
}
OMNIRET_HD double exp_approx(double x) { return exp(x); }

// First index of the maximum (the reference's argmax rule on ties).
template <class T>
OMNIRET_HD int argmax_first(const T* psi, int m) {
  int best = 0;
  for (int j = 1; j < m; ++j) best = psi[j] > psi[best] ? j : best;
  return best;
}

// Forward value of one column. weights points at the column's M weights (only for kWeighted).
template <class T>
OMNIRET_HD T pool_forward(int pooling, const T* psi, int m, const T* weights) {
  if (pooling == kStm || pooling == kMax) return psi[argmax_first(psi, m)];  // STM's forward value is the max
  T acc = T(0);
  if (pooling == kMean) {
    for (int j = 0; j < m; ++j) acc += psi[j];
    return acc / T(m);
  }
  for (int j = 0; j < m; ++j) acc += weights[j] * psi[j];
  return acc;
}

// dpsi[j] = d h / d psi[j] * g for one column (SPEC 1.7). For STM: g * (hard_j + y_j (psi_j - sum_k y_k psi_k) / tau)
// with y = softmax(psi / tau). `scratch` holds m values (the softmax numerators).
template <class T>
OMNIRET_HD void pool_backward(int pooling, const T* psi, int m, T g, T temperature, const T* weights, T* dpsi,
                              T* scratch) {
  if (pooling == kMean) {
    const T d = g / T(m);
    for (int j = 0; j < m; ++j) dpsi[j] = d;
    return;
  }
  if (pooling == kWeighted) {
    for (int j = 0; j < m; ++j) dpsi[j] = g * weights[j];
    return;
  }
  const int a = argmax_first(psi, m);
  if (pooling == kMax) {
    for (int j = 0; j < m; ++j) dpsi[j] = T(0);
    dpsi[a] = g;
    return;
  }
  const T top = psi[a];
  const T inv_t = T(1) / temperature;
  T z = T(0);
  for (int j = 0; j < m; ++j) {
    scratch[j] = exp_approx((psi[j] - top) * inv_t);
    z += scratch[j];
  }
  const T inv_z = T(1) / z;
  T mean_psi = T(0);
  for (int j = 0; j < m; ++j) mean_psi += scratch[j] * psi[j];
  mean_psi *= inv_z;
  const T scale = g * inv_z * inv_t;
  for (int j = 0; j < m; ++j) dpsi[j] = scale * scratch[j] * (psi[j] - mean_psi);
  dpsi[a] += g;
}

// Gradient of the coupling for one column: ds[lo] += dpsi (1 - w), ds[hi] += dpsi w (ds has n zeroed entries).
template <class T>
OMNIRET_HD void couple_column_backward(const T* dpsi, const int* rank, int m, const int* lo, const int* hi,
                                       const T* w, T* ds) {
  for (int j = 0; j < m; ++j) {
    const int r = rank[j];
    ds[lo[r]] += dpsi[j] * (T(1) - w[r]);
    ds[hi[r]] += dpsi[j] * w[r];
  }
}

}  // namespace aswp
}  // namespace omniret
