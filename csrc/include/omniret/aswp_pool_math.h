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

// The one NaN a sort key holds (the positive quiet NaN): every NaN, whatever its sign and payload, becomes it, so
// that NaN sorts after +inf (torch.sort's order; a negative NaN's bits would sort before -inf) and never ties
// with the pad keys.
constexpr uint32_t kCanonicalNaN = 0x7fc00000u;

// Monotone map float -> uint32 (a < b as floats  <=>  ordered(a) < ordered(b) as unsigned), NaN last. -0 becomes
// +0 first so that the two zeros tie (and then order by index), as they do in a stable comparison sort.
OMNIRET_HD uint32_t float_to_ordered(float v) {
  const uint32_t b = v != v ? kCanonicalNaN : float_bits(v + 0.0f);
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

// Value-only keys: float_to_ordered(v) alone, for a sort whose caller needs the sorted values but not which token
// each came from (the forward when nothing is saved for backward). Equal keys are equal values, so the sorted
// values are those of the (value, index) sort bit for bit. Padding is all ones, which sorts last, after the NaN
// key (ordered(kCanonicalNaN) = 0xffc00000).
constexpr uint32_t kPadValueKey = ~uint32_t(0);

OMNIRET_HD void compare_exchange(uint32_t& a, uint32_t& b) {
  const uint32_t lo = a < b ? a : b;
  b = a < b ? b : a;
  a = lo;
}

// float64 has no room for an index in 64 bits: its key is a (value, index) pair with the same lexicographic order.
struct KeyF64 {
  double value;
  int32_t index;  // -1 marks padding
};

// NaN is greater than every number (torch.sort's order) and NaNs order by index, so the network still sorts.
OMNIRET_HD bool key_less(const KeyF64& a, const KeyF64& b) {
  if (a.index < 0) return false;  // padding is never less
  if (b.index < 0) return true;
  const bool a_nan = a.value != a.value, b_nan = b.value != b.value;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.value != b.value) return a.value < b.value;
  return a.index < b.index;
}

OMNIRET_HD void compare_exchange(KeyF64& a, KeyF64& b) {
  if (key_less(b, a)) {
    const KeyF64 t = a;
    a = b;
    b = t;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Bitonic sorting network on n = 2^k rows. Stage (size, step) for size = 2, 4, ..., n and step = size/2,
// ..., 1 has n/2 independent comparators; comparator p of a stage orders rows (first, second) so that
// key[first] <= key[second] afterwards. The CPU kernel applies each comparator to a whole row of columns with
// vector min/max; the CUDA kernel spreads a stage's comparators over the threads of a block.
// ---------------------------------------------------------------------------------------------------------
// In int64: an int doubling past 2^30 overflowed and looped forever for n > 2^30. The kernels accept n <= 2^30
// (aswp_pool_checks.h), whose power of two still fits the int row indices of the network.
OMNIRET_HD int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// step = 1 << log_step (shifts, not divisions: this runs once per comparator).
OMNIRET_HD void bitonic_comparator(int size, int log_step, int p, int& first, int& second) {
  const int step = 1 << log_step;
  const int i = ((p >> log_step) << (log_step + 1)) | (p & (step - 1));  // the pair's row with bit `step` clear
  const int j = i + step;
  const bool ascending = (i & size) == 0;
  first = ascending ? i : j;
  second = ascending ? j : i;
}

// Sorts n_pow2 keys spaced `stride` apart, ascending (the scalar form: tests, float64, one CUDA thread).
template <class Key>
OMNIRET_HD void bitonic_sort(Key* keys, int n_pow2, long long stride) {
  for (int size = 2; size <= n_pow2; size <<= 1) {
    int log_size = 0;
    while ((1 << log_size) < size) ++log_size;
    for (int log_step = log_size - 1; log_step >= 0; --log_step) {
      for (int p = 0; p < n_pow2 / 2; ++p) {
        int a, b;
        bitonic_comparator(size, log_step, p, a, b);
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

// exp_approx: a Cephes-style float exp (max rel. error ~2 ulp) that vectorises on the CPU and runs unchanged
// on the GPU; float64 uses the libm exp.
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


// ---------------------------------------------------------------------------------------------------------
// Pooling in rank order. Walking the references of a column in rank order r = 0..M-1 (j = order[r] is the
// reference of rank r), the quantile table (lo, hi, w) of a sample depends on r only, not on the column, so
// one step works on a whole row of columns at once: contiguous loads, no gathers. The CPU kernel passes rows
// of 32 columns; the CUDA kernel gives each thread one column (width 1). Pooling is order-free except the
// argmax tie rule (first reference index j), which `argmax_update` keeps.
// ---------------------------------------------------------------------------------------------------------
// psi[c] = s_lo[c] * (1 - w) + s_hi[c] * w - ref[c] for the references of rank r of `width` columns.
template <class T>
OMNIRET_HD void couple_row(const T* s_lo, const T* s_hi, T w, const T* ref, T* psi, int width) {
  const T w_lo = T(1) - w;
  for (int c = 0; c < width; ++c) psi[c] = s_lo[c] * w_lo + s_hi[c] * w - ref[c];
}

template <class T>
OMNIRET_HD T pool_initial(int pooling) {
  return (pooling == kStm || pooling == kMax) ? T(-INFINITY) : T(0);
}

// Forward accumulation of row r: the max (stm, max; STM's forward value is the max), the sum (mean) or the
// weighted sum (weighted). Non-finite psi give what the reference gives: max takes a NaN and keeps it (as
// torch.max does); STM's forward is NaN when any psi of the column is NaN or +-inf (the reference's
// psi * (hard - y + y) is inf * 0 or its softmax inf - inf there), which `psi * 0` (0, or NaN) adds to acc.
template <class T>
OMNIRET_HD void pool_accumulate_row(int pooling, const T* psi, const T* weight, T* acc, int width) {
  if (pooling == kStm) {
    for (int c = 0; c < width; ++c) {
      const T m = (psi[c] > acc[c] || psi[c] != psi[c]) ? psi[c] : acc[c];
      acc[c] = m + psi[c] * T(0);
    }
  } else if (pooling == kMax) {
    for (int c = 0; c < width; ++c) acc[c] = (psi[c] > acc[c] || psi[c] != psi[c]) ? psi[c] : acc[c];
  } else if (pooling == kMean) {
    for (int c = 0; c < width; ++c) acc[c] += psi[c];
  } else {
    for (int c = 0; c < width; ++c) acc[c] += weight[c] * psi[c];
  }
}

template <class T>
OMNIRET_HD void pool_finish_row(int pooling, int m, T* acc, int width) {
  if (pooling == kMean)
    for (int c = 0; c < width; ++c) acc[c] /= T(m);
}

// Running argmax over rank-ordered rows; on equal psi the smaller reference index j wins (torch's argmax).
template <class T>
OMNIRET_HD void argmax_update(const T* psi, const int* j_of_row, int r, T* best, int* best_j, int* best_r,
                              int width) {
  for (int c = 0; c < width; ++c) {
    const bool take = psi[c] > best[c] || (psi[c] == best[c] && j_of_row[c] < best_j[c]);
    best[c] = take ? psi[c] : best[c];
    best_j[c] = take ? j_of_row[c] : best_j[c];
    best_r[c] = take ? r : best_r[c];
  }
}

// STM softmax statistics, one row: e = exp((psi - max) / tau) is stored, z += e, num += e * psi.
template <class T>
OMNIRET_HD void stm_softmax_row(const T* psi, const T* best, T inv_t, T* e, T* z, T* num, int width) {
  for (int c = 0; c < width; ++c) {
    const T v = exp_approx((psi[c] - best[c]) * inv_t);
    e[c] = v;
    z[c] += v;
    num[c] += v * psi[c];
  }
}

// After the last stm_softmax_row: z <- 1 / z and num <- num / z = sum_k y_k psi_k (no division per element later).
template <class T>
OMNIRET_HD void stm_normalize(T* z, T* num, int width) {
  for (int c = 0; c < width; ++c) {
    z[c] = T(1) / z[c];
    num[c] *= z[c];
  }
}

// Gradient to psi of row r (SPEC 1.7): g * (hard + y (psi - sum_k y_k psi_k) / tau) for stm, g * hard for
// max, g / M for mean, g * weight for weighted. For stm, e comes from stm_softmax_row and inv_z/mean_psi from
// stm_normalize.
template <class T>
OMNIRET_HD void pool_grad_row(int pooling, int m, int r, const T* psi, const T* e, const T* inv_z,
                              const T* mean_psi, const int* best_r, const T* weight, const T* g, T inv_t, T* dpsi,
                              int width) {
  if (pooling == kStm) {
    for (int c = 0; c < width; ++c) {
      const T hard = r == best_r[c] ? T(1) : T(0);
      dpsi[c] = g[c] * (hard + e[c] * inv_z[c] * (psi[c] - mean_psi[c]) * inv_t);
    }
  } else if (pooling == kMax) {
    for (int c = 0; c < width; ++c) dpsi[c] = r == best_r[c] ? g[c] : T(0);
  } else if (pooling == kMean) {
    for (int c = 0; c < width; ++c) dpsi[c] = g[c] / T(m);
  } else {
    for (int c = 0; c < width; ++c) dpsi[c] = g[c] * weight[c];
  }
}

// Gradient of the coupling of row r: ds[lo] += dpsi (1 - w), ds[hi] += dpsi w (ds_lo may be ds_hi).
template <class T>
OMNIRET_HD void couple_row_backward(const T* dpsi, T w, T* ds_lo, T* ds_hi, int width) {
  const T w_lo = T(1) - w;
  for (int c = 0; c < width; ++c) ds_lo[c] += dpsi[c] * w_lo;
  for (int c = 0; c < width; ++c) ds_hi[c] += dpsi[c] * w;
}

}  // namespace aswp
}  // namespace omniret
