// Online-softmax math of resampler_attention, shared by the CPU kernel (csrc/cpu/resampler_attention.cpp) and
// any CUDA kernel. Everything works on one row of scores at a time (raw pointers, no torch), so the CPU kernel
// can run it over GEMM tiles and a GPU thread over its own row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "omniret/common.h"

namespace omniret {
namespace resampler {

// exp(x) for float in a form the compiler vectorises (no libm call): e^x = 2^n * e^f with n = round(x / ln 2) and
// f = x - n ln 2 computed in two parts (Cody-Waite, so f keeps full precision even for |x| ~ 87), |f| <= ln2 / 2,
// and e^f by its Taylor series to degree 7 (relative error ~1e-7 on the whole range, below float rounding of the
// GEMM inputs). Inputs below -87 give a tiny normal value (~1e-38) instead of 0, which every caller here treats
// as 0; inputs above 88 would overflow and never occur (scores minus the running max or the log-sum-exp).
OMNIRET_HD float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.4426950408889634f + 0.5f);  // round(x log2 e)
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 ~ 0.693359375 - 2.12194440e-4; n * hi is exact
  float p = 1.9841269841269841e-4f;                // 1/7!
  p = p * f + 1.3888888888888889e-3f;              // 1/6!
  p = p * f + 8.3333333333333333e-3f;              // 1/5!
  p = p * f + 4.1666666666666667e-2f;              // 1/4!
  p = p * f + 1.6666666666666667e-1f;              // 1/3!
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as a float's exponent field
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The exp each precision uses: the vectorisable one for float, the exact one for double (tests, gradcheck).
OMNIRET_HD float softmax_exp(float x) { return fast_exp(x); }
OMNIRET_HD double softmax_exp(double x) { return std::exp(x); }

template <typename T>
OMNIRET_HD T row_max(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// One step of the online softmax for one query row over a new block of n scores s[0:n] (already scaled).
// State (m = running max, l = running sum of exp(s - m)) is updated in place; s is overwritten with the block's
// unnormalised probabilities exp(s - m_new). Returns the factor exp(m_old - m_new) by which the caller must
// rescale the row's output accumulator before adding this block's P @ V.
template <typename T>
OMNIRET_HD T online_softmax_step(T* s, int64_t n, T& m, T& l) {
  const T m_new = row_max(s, n) > m ? row_max(s, n) : m;
  const T rescale = m == -std::numeric_limits<T>::infinity() ? T(0) : softmax_exp(m - m_new);
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T p = softmax_exp(s[j] - m_new);
    s[j] = p;
    sum += p;
  }
  l = l * rescale + sum;
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
  for (int64_t j = 0; j < n; ++j) s[j] = softmax_exp(s[j] - lse);
}

template <typename T>
OMNIRET_HD void softmax_grad(const T* p, T* dp, int64_t n, T delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

template <typename T>
OMNIRET_HD T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

}  // namespace resampler
}  // namespace omniret
