// CUDA kernels of aswp_pool: the column sort, quantile coupling and pooling after the cuBLAS projection.
// All of the math is the shared header's (omniret/aswp_pool_math.h), the code the CPU kernel runs and the tests
// check; this file only lays it out over threads. Compiled here (no GPU on the build machine), never run here.
//
// Forward: one block per (COLS columns, sample). The block sorts the columns' uint64 (value, token) keys in
// shared memory with the bitonic network, each stage's comparators spread over the threads; then one thread
// per column walks the references in rank order to couple and pool.
// Backward: one block per COLS columns, looping over the samples (so reference/weight gradients need no
// atomics): one thread per column recomputes psi, its pooling gradient and the coupling gradient into shared
// memory, then all threads scatter it to dp through the saved token of each sorted position.
#include "aswp_pool.h"

#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace cuda {
namespace {

using namespace omniret::aswp;

constexpr int kThreads = 128;

int forward_cols(int n_pow2) {
  int cols = 2048 / n_pow2;
  return cols < 1 ? 1 : (cols > 32 ? 32 : cols);
}

int backward_cols(int n, int m) {
  int cols = 4096 / (n + m);
  return cols < 1 ? 1 : (cols > 32 ? 32 : cols);
}

template <class index_t>
__global__ void forward_kernel(const float* __restrict__ proj, const uint8_t* __restrict__ valid,
                               const int* __restrict__ n_valid, const float* __restrict__ ref_sorted,
                               const float* __restrict__ weight_sorted, int N, int L, int M, int pooling,
                               int n_pow2, int cols, float* __restrict__ out, float* __restrict__ sorted,
                               index_t* __restrict__ sorted_tokens) {
  extern __shared__ unsigned char smem[];
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);                 // (n_pow2, cols)
  float* values = reinterpret_cast<float*>(keys + size_t(n_pow2) * cols);  // (N, cols)
  const int b = blockIdx.y;
  const int l0 = blockIdx.x * cols;
  const int n_b = n_valid[b];

  for (int idx = threadIdx.x; idx < n_pow2 * cols; idx += blockDim.x) {
    const int i = idx / cols, c = idx % cols, l = l0 + c;
    const bool real = i < N && l < L && (valid == nullptr || valid[size_t(b) * N + i]);
    keys[idx] = real ? pack_key(proj[(size_t(b) * N + i) * L + l], uint32_t(i)) : kPadKey;
  }
  __syncthreads();
  for (int size = 2, log_size = 1; size <= n_pow2; size <<= 1, ++log_size) {
    for (int log_step = log_size - 1; log_step >= 0; --log_step) {
      for (int idx = threadIdx.x; idx < (n_pow2 / 2) * cols; idx += blockDim.x) {
        const int p = idx / cols, c = idx % cols;
        int a, bb;
        bitonic_comparator(size, log_step, p, a, bb);
        compare_exchange(keys[a * cols + c], keys[bb * cols + c]);
      }
      __syncthreads();
    }
  }
  for (int idx = threadIdx.x; idx < N * cols; idx += blockDim.x) {
    const int i = idx / cols, c = idx % cols, l = l0 + c;
    if (l >= L) continue;
    const uint64_t key = keys[idx];
    const float v = i < n_b ? key_value(key) : 0.0f;
    values[idx] = v;
    if (sorted == nullptr) continue;  // nothing saved for backward
    sorted[(size_t(b) * N + i) * L + l] = v;
    sorted_tokens[(size_t(b) * N + i) * L + l] = index_t(i < n_b ? key_index(key) : 0u);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const int l = l0 + c;
    if (l >= L) continue;
    float acc = pool_initial<float>(pooling), psi;
    for (int r = 0; r < M; ++r) {
      int lo, hi;
      double w;
      quantile_position(r, n_b, M, lo, hi, w);
      couple_row(values + lo * cols + c, values + hi * cols + c, float(w), ref_sorted + size_t(r) * L + l, &psi, 1);
      pool_accumulate_row(pooling, &psi, weight_sorted ? weight_sorted + size_t(r) * L + l : nullptr, &acc, 1);
    }
    pool_finish_row(pooling, M, &acc, 1);
    out[size_t(b) * L + l] = acc;
  }
}

template <class index_t>
__global__ void backward_kernel(const float* __restrict__ grad, const uint8_t* __restrict__ valid,
                                const int* __restrict__ n_valid, const float* __restrict__ ref_sorted,
                                const int* __restrict__ order, const float* __restrict__ weight_sorted,
                                const float* __restrict__ sorted, const index_t* __restrict__ sorted_tokens, int B,
                                int N, int L, int M, int pooling, float inv_t, int cols, float* __restrict__ dp,
                                float* __restrict__ dref_sorted, float* __restrict__ dweight_sorted) {
  extern __shared__ unsigned char smem[];
  float* values = reinterpret_cast<float*>(smem);  // (N, cols)
  float* ds = values + size_t(N) * cols;           // (N, cols)
  float* psi = ds + size_t(N) * cols;              // (M, cols)
  float* e = psi + size_t(M) * cols;               // (M, cols)
  const int l0 = blockIdx.x * cols;
  for (int idx = threadIdx.x; idx < M * cols; idx += blockDim.x) {
    const int r = idx / cols, l = l0 + idx % cols;
    if (l < L) {
      dref_sorted[size_t(r) * L + l] = 0.0f;
      if (dweight_sorted) dweight_sorted[size_t(r) * L + l] = 0.0f;
    }
  }
  for (int b = 0; b < B; ++b) {
    const int n_b = n_valid[b];
    for (int idx = threadIdx.x; idx < N * cols; idx += blockDim.x) {
      const int i = idx / cols, l = l0 + idx % cols;
      values[idx] = (i < n_b && l < L) ? sorted[(size_t(b) * N + i) * L + l] : 0.0f;
      ds[idx] = 0.0f;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      const int l = l0 + c;
      if (l >= L) continue;
      const float g = grad[size_t(b) * L + l];
      float best = -INFINITY, z = 0.0f, num = 0.0f, dpsi;
      int best_j = 0x7fffffff, best_r = 0;
      for (int r = 0; r < M; ++r) {
        int lo, hi;
        double w;
        quantile_position(r, n_b, M, lo, hi, w);
        couple_row(values + lo * cols + c, values + hi * cols + c, float(w), ref_sorted + size_t(r) * L + l,
                   psi + r * cols + c, 1);
        argmax_update(psi + r * cols + c, order + size_t(r) * L + l, r, &best, &best_j, &best_r, 1);
      }
      if (pooling == kStm)
        for (int r = 0; r < M; ++r) stm_softmax_row(psi + r * cols + c, &best, inv_t, e + r * cols + c, &z, &num, 1);
      stm_normalize(&z, &num, 1);
      for (int r = 0; r < M; ++r) {
        int lo, hi;
        double w;
        quantile_position(r, n_b, M, lo, hi, w);
        const float* wr = weight_sorted ? weight_sorted + size_t(r) * L + l : nullptr;
        pool_grad_row(pooling, M, r, psi + r * cols + c, e + r * cols + c, &z, &num, &best_r, wr, &g, inv_t, &dpsi,
                      1);
        dref_sorted[size_t(r) * L + l] -= dpsi;
        if (dweight_sorted) dweight_sorted[size_t(r) * L + l] += g * psi[r * cols + c];
        couple_row_backward(&dpsi, float(w), ds + lo * cols + c, ds + hi * cols + c, 1);
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n_b * cols; idx += blockDim.x) {  // dp is zeroed: masked tokens keep 0
      const int i = idx / cols, c = idx % cols, l = l0 + c;
      if (l >= L) continue;
      const int token = int(sorted_tokens[(size_t(b) * N + i) * L + l]);
      dp[(size_t(b) * N + token) * L + l] = ds[i * cols + c];
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t aswp_pool_forward(const float* proj, const uint8_t* valid, const int* n_valid, const float* ref_sorted,
                              const float* weight_sorted, int B, int N, int L, int M, int pooling, float* out,
                              float* sorted, void* sorted_tokens, bool rank_u8, cudaStream_t stream) {
  const int n_pow2 = next_pow2(N);
  const int cols = forward_cols(n_pow2);
  const size_t shared = size_t(n_pow2) * cols * sizeof(uint64_t) + size_t(N) * cols * sizeof(float);
  const dim3 grid((L + cols - 1) / cols, B);
  if (rank_u8) {
    cudaFuncSetAttribute(forward_kernel<uint8_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    forward_kernel<uint8_t><<<grid, kThreads, shared, stream>>>(proj, valid, n_valid, ref_sorted, weight_sorted, N,
                                                                L, M, pooling, n_pow2, cols, out, sorted,
                                                                static_cast<uint8_t*>(sorted_tokens));
  } else {
    cudaFuncSetAttribute(forward_kernel<int32_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    forward_kernel<int32_t><<<grid, kThreads, shared, stream>>>(proj, valid, n_valid, ref_sorted, weight_sorted, N,
                                                                L, M, pooling, n_pow2, cols, out, sorted,
                                                                static_cast<int32_t*>(sorted_tokens));
  }
  return cudaGetLastError();
}

cudaError_t aswp_pool_backward(const float* grad, const uint8_t* valid, const int* n_valid, const float* ref_sorted,
                               const int* order, const float* weight_sorted, const float* sorted,
                               const void* sorted_tokens, bool rank_u8, int B, int N, int L, int M, int pooling,
                               float inv_temperature, float* dp, float* dref_sorted, float* dweight_sorted,
                               cudaStream_t stream) {
  const int cols = backward_cols(N, M);
  const size_t shared = size_t(2 * N + 2 * M) * cols * sizeof(float);
  const dim3 grid((L + cols - 1) / cols);
  if (rank_u8) {
    cudaFuncSetAttribute(backward_kernel<uint8_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    backward_kernel<uint8_t><<<grid, kThreads, shared, stream>>>(
        grad, valid, n_valid, ref_sorted, order, weight_sorted, sorted, static_cast<const uint8_t*>(sorted_tokens), B,
        N, L, M, pooling, inv_temperature, cols, dp, dref_sorted, dweight_sorted);
  } else {
    cudaFuncSetAttribute(backward_kernel<int32_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    backward_kernel<int32_t><<<grid, kThreads, shared, stream>>>(
        grad, valid, n_valid, ref_sorted, order, weight_sorted, sorted, static_cast<const int32_t*>(sorted_tokens), B,
        N, L, M, pooling, inv_temperature, cols, dp, dref_sorted, dweight_sorted);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace omniret
