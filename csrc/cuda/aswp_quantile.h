// The quantile position of SPEC 1.5 in integer and float32 arithmetic, for the ASWP CUDA kernel.
// Reference rank r of M couples to t = (r + 0.5) n / M - 0.5, clamped to [0, n - 1], among the n sorted valid
// projections. Written over the common denominator 2M, t = ((2r + 1) n - M) / (2M) exactly, so lo = floor(t) is an
// exact integer division and w = t - lo = remainder / (2M) is one correctly rounded float32 division (both operands
// are integers below 2^24, so exact in float32). The shared header's quantile_position (float64, what the CPU
// kernel and the reference use) gives the same lo and hi and a w at most one float32 ulp away; the CPU test in
// tests/test_cuda_compile.py compares the two for every rank at n, M <= 300. The CUDA kernel calls this once per
// (sample, rank) per block into a shared-memory table, so no float64 instruction runs on the GPU.
#pragma once

#include "omniret/common.h"

namespace omniret {
namespace aswp {

OMNIRET_HD void quantile_position_f32(int rank, int n, int m, int& lo, int& hi, float& w) {
  const long long numerator = (2LL * rank + 1) * n - m;  // t * 2M; negative when t < 0
  const long long denominator = 2LL * m;
  if (n <= 1 || numerator <= 0) {
    lo = 0;
    w = 0.0f;
  } else if (numerator >= (n - 1) * denominator) {
    lo = n - 1;
    w = 0.0f;
  } else {
    lo = int(numerator / denominator);
    w = float(numerator - lo * denominator) / float(denominator);
  }
  hi = lo + 1 < n ? lo + 1 : (n > 0 ? n - 1 : 0);
}

}  // namespace aswp
}  // namespace omniret
