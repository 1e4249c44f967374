// Online-softmax math of resampler_attention, shared by the CPU kernel (csrc/cpu/resampler_attention.cpp) and
// any CUDA kernel. Everything works on one row of scores at a time (raw pointers, no torch), so the CPU kernel
// can run it over GEMM tiles and a GPU thread over its own row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "omniret/common.h"

// Row loops ask for SIMD explicitly: without -ffast-math GCC will not vectorise a float max/sum reduction or
// if-convert the clamp in fast_exp on its own. `omp simd` needs only -fopenmp(-simd), which every CPU build here
// passes; device code and builds without OpenMP get plain loops. The reduction variable is always named `acc`.
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define OMNIRET_SIMD _Pragma("omp simd")
#define OMNIRET_SIMD_MAX_ACC _Pragma("omp simd reduction(max : acc)")
#define OMNIRET_SIMD_SUM_ACC _Pragma("omp simd reduction(+ : acc)")
#else
#define OMNIRET_SIMD
#define OMNIRET_SIMD_MAX_ACC
#define OMNIRET_SIMD_SUM_ACC
#endif

namespace omniret {
namespace resampler {

OMNIRET_HD float bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  return __builtin_bit_cast(float, b);
#endif
}

OMNIRET_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int32_t, f);
#endif
}

// exp(x) for float in a form GCC vectorises without -ffast-math or -fno-trapping-math (no libm call, no floor, no
// float comparison): e^x = 2^n * e^f with n = round(x / ln 2) by the 1.5 * 2^23 rounding trick, f = x - n ln 2 in
// two parts (Cody-Waite, so f keeps full precision even for |x| ~ 87), |f| <= ln2 / 2, and e^f by its Taylor
// series to degree 7: relative error < 1e-7 wherever the result is a normal float. Below x ~ -87.3 the result
// is exactly 0 (the exponent is clamped as an integer and the value masked), above 88 it saturates near 2^127;
// the kernels only feed it scores minus the running max or the log-sum-exp, i.e. x <= ~0. A NaN x gives NaN (as
// std::exp, so a NaN score poisons its row as in the reference's softmax): the masking that zeroes the underflow
// would otherwise turn it into 0. The NaN test is on the integer bits, which vectorises like the rest.
OMNIRET_HD float fast_exp(float x) {
  const int32_t nan = -static_cast<int32_t>((float_to_bits(x) & 0x7fffffff) > 0x7f800000);  // all ones for NaN
  const float n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;  // round(x log2 e), |x| < 2.9e6
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;           // ln2 ~ 0.693359375 - 2.12194440e-4
  float p = 1.9841269841269841e-4f;                                      // 1/7!
  p = p * f + 1.3888888888888889e-3f;                                    // 1/6!
  p = p * f + 8.3333333333333333e-3f;                                    // 1/5!
  p = p * f + 4.1666666666666667e-2f;                                    // 1/4!
  p = p * f + 1.6666666666666667e-1f;                                    // 1/3!
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;  // biased exponent of 2^n
  const int32_t keep = -static_cast<int32_t>(e > 0);  // all ones, or 0 when 2^n is below the normal range
  e = e < 1 ? 1 : e;
  e = e > 254 ? 254 : e;
  return bits_to_float(float_to_bits(p * bits_to_float(e << 23)) & (keep | nan));
}

// The exp each precision uses: the vectorisable one for float, the exact one for double (tests, gradcheck).
OMNIRET_HD float softmax_exp(float x) { return fast_exp(x); }
OMNIRET_HD double softmax_exp(double x) { return std::exp(x); }

template <typename T>
OMNIRET_HD T row_max(const T* s, int64_t n) {
  T acc = -std::numeric_limits<T>::infinity();
  OMNIRET_SIMD_MAX_ACC
  for (int64_t j = 0; j < n; ++j) acc = s[j] > acc ? s[j] : acc;
  return acc;
}

// One step of the online softmax for one query row over a new block of n scores s[0:n] (already scaled).
// State (m = running max, l = running sum of exp(s - m)) is updated in place; s is overwritten with the block's
// unnormalised probabilities exp(s - m_new). Returns the factor exp(m_old - m_new) by which the caller must
// rescale the row's output accumulator before adding this block's P @ V.
template <typename T>
OMNIRET_HD T online_softmax_step(T* s, int64_t n, T& m, T& l) {
  const T block_max = row_max(s, n);
  const T m_new = block_max > m ? block_max : m;
  const T rescale = m == -std::numeric_limits<T>::infinity() ? T(0) : softmax_exp(m - m_new);
  T acc = 0;
  OMNIRET_SIMD_SUM_ACC
  for (int64_t j = 0; j < n; ++j) {
    const T p = softmax_exp(s[j] - m_new);
    s[j] = p;
    acc += p;
  }
  l = l * rescale + acc;
  m = m_new;
  return rescale;
}

// log-sum-exp of the row once all blocks are seen: the only per-row state the backward needs.
template <typename T>
OMNIRET_HD T finish_lse(T m, T l) { return m + std::log(l); }

// Backward, one row of one block: p[j] = exp(s[j] - lse) recomputes the probabilities (s overwritten by p), then
// dp[j] <- p[j] * (dp[j] - delta) is the softmax gradient dS (delta = sum_c dO[c] * O[c] of the row).
template <typename T>
OMNIRET_HD void recompute_probs(T* s, int64_t n, T lse) {
  OMNIRET_SIMD
  for (int64_t j = 0; j < n; ++j) s[j] = softmax_exp(s[j] - lse);
}

template <typename T>
OMNIRET_HD void softmax_grad(const T* p, T* dp, int64_t n, T delta) {
  OMNIRET_SIMD
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

template <typename T>
OMNIRET_HD T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
  OMNIRET_SIMD_SUM_ACC
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

}  // namespace resampler
}  // namespace omniret
