// Launch geometry of the ASWP CUDA kernels (csrc/cuda/aswp_pool.cu): threads, columns per block and the dynamic
// shared memory of one block. Plain C++ (no CUDA, no torch), so the launcher, the glue's pre-launch limit check and
// the CPU test that reports it at the paper's shapes (tests/test_cuda_compile.py) all use this one copy.
#pragma once

#include <cstddef>
#include <cstdint>

#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace cuda {
namespace aswp_launch {

constexpr int kThreads = 128;
constexpr int kMaxCols = 32;

inline int floor_pow2(int v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

inline int log2_int(int pow2) {
  int k = 0;
  while ((1 << k) < pow2) ++k;
  return k;
}

// Columns per block (a power of two): as many as keep the block's working set near 16-24 KB, so several blocks
// share an SM.
inline int forward_cols(int n_pow2) {
  const int cols = 2048 / n_pow2;
  return cols < 1 ? 1 : (cols > kMaxCols ? kMaxCols : cols);
}

inline int backward_cols(int n, int m) {
  const int cols = floor_pow2(4096 / (n + m) > 0 ? 4096 / (n + m) : 1);
  return cols > kMaxCols ? kMaxCols : cols;
}

// keys (n_pow2, cols) uint64 + values (N, cols) + one reduction slot per thread + the quantile table (M lo, M w).
inline size_t forward_shared_bytes(int N, int M) {
  const int n_pow2 = aswp::next_pow2(N), cols = forward_cols(n_pow2);
  return size_t(n_pow2) * cols * sizeof(uint64_t) + size_t(N) * cols * sizeof(float) + kThreads * sizeof(float) +
         size_t(M) * (sizeof(int) + sizeof(float));
}

// values/dp staging (N, cols) + psi/dpsi (M, cols) + the quantile table + the lo/hi rank ranges (2 (N + 1)) + four
// reduction slots per thread.
inline size_t backward_shared_bytes(int N, int M) {
  const int cols = backward_cols(N, M);
  return size_t(N + M) * cols * sizeof(float) + size_t(M) * (sizeof(int) + sizeof(float)) +
         size_t(2 * (N + 1)) * sizeof(int) + size_t(kThreads) * (2 * sizeof(float) + 2 * sizeof(int));
}

}  // namespace aswp_launch
}  // namespace cuda
}  // namespace omniret
