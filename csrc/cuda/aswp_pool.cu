// CUDA kernels of aswp_pool: the column sort, quantile coupling and pooling after the cuBLAS projection.
// The math is the shared header's (omniret/aswp_pool_math.h), the code the CPU kernel runs and the tests check,
// except the quantile position, which is the float32/integer form of csrc/cuda/aswp_quantile.h (no float64 on the
// GPU). This file only lays the math out over threads. COMPILED ONLY: there is no GPU on the development machine,
// so these kernels have never run; tests/test_cuda_compile.py checks their ptxas report (no spills, no stack).
//
// Layout. A block owns `cols` adjacent columns l (a power of two) of one sample b; every global access walks l
// fastest, so a warp reads/writes runs of `cols` consecutive floats (coalesced). In the per-column phases the
// block's threads form a (groups x cols) grid: thread t takes column c = t % cols and the ranks r = g, g + groups,
// ... with g = t / cols, so all kThreads threads work (not one thread per column), and a shared-memory tree
// reduction over the groups combines their max / sum / argmax / softmax sums. No atomics anywhere.
// Forward: sort the columns' uint64 (value, token) keys with the bitonic network, then couple and pool.
// Backward: recompute psi, reduce the column's argmax (and STM softmax sums), form dpsi per rank, then gather the
// coupling gradient per sorted position (the ranks that read position i as lo, then as hi, are contiguous because
// lo and hi grow with the rank) and write dp through a shared-memory transpose, so its global writes are coalesced.
#include "aswp_pool.h"

#include "aswp_quantile.h"
#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace cuda {
namespace {

using namespace omniret::aswp;

using namespace aswp_launch;

// Tree reduction over the groups of a (groups x cols) thread grid in shared memory; afterwards slot c holds
// column c's result. Every thread of the block must call it (it synchronises).
template <class Combine>
__device__ __forceinline__ void reduce_over_groups(int groups, int log_cols, Combine combine) {
  const int g = threadIdx.x >> log_cols;
  for (int stride = groups >> 1; stride > 0; stride >>= 1) {
    if (g < stride) combine(threadIdx.x, threadIdx.x + (stride << log_cols));
    __syncthreads();
  }
}

__device__ __forceinline__ void fill_quantile_table(int n_b, int M, int* q_lo, float* q_w) {
  for (int r = threadIdx.x; r < M; r += blockDim.x) {
    int lo, hi;
    float w;
    quantile_position_f32(r, n_b, M, lo, hi, w);
    q_lo[r] = lo;
    q_w[r] = w;
  }
}

template <class index_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const float* __restrict__ proj, const uint8_t* __restrict__ valid,
                   const int* __restrict__ n_valid, const float* __restrict__ ref_sorted,
                   const float* __restrict__ weight_sorted, int N, int L, int M, int pooling, int n_pow2,
                   int log_cols, float* __restrict__ out, float* __restrict__ sorted,
                   index_t* __restrict__ sorted_tokens) {
  extern __shared__ __align__(8) unsigned char smem[];
  const int cols = 1 << log_cols, col_mask = cols - 1, groups = kThreads >> log_cols;
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);                      // (n_pow2, cols)
  float* values = reinterpret_cast<float*>(keys + size_t(n_pow2) * cols);  // (N, cols)
  float* partial = values + size_t(N) * cols;                              // (kThreads)
  int* q_lo = reinterpret_cast<int*>(partial + kThreads);                  // (M)
  float* q_w = reinterpret_cast<float*>(q_lo + M);                         // (M)
  const int b = blockIdx.y;
  const int l0 = blockIdx.x * cols;
  const int n_b = n_valid[b];

  fill_quantile_table(n_b, M, q_lo, q_w);
  for (int idx = threadIdx.x; idx < n_pow2 * cols; idx += kThreads) {
    const int i = idx >> log_cols, l = l0 + (idx & col_mask);
    const bool real = i < N && l < L && (valid == nullptr || valid[size_t(b) * N + i]);
    keys[idx] = real ? pack_key(proj[(size_t(b) * N + i) * L + l], uint32_t(i)) : kPadKey;
  }
  __syncthreads();
  for (int size = 2, log_size = 1; size <= n_pow2; size <<= 1, ++log_size) {
    for (int log_step = log_size - 1; log_step >= 0; --log_step) {
      for (int idx = threadIdx.x; idx < (n_pow2 >> 1) * cols; idx += kThreads) {
        const int p = idx >> log_cols, c = idx & col_mask;
        int first, second;
        bitonic_comparator(size, log_step, p, first, second);
        compare_exchange(keys[first * cols + c], keys[second * cols + c]);
      }
      __syncthreads();
    }
  }
  for (int idx = threadIdx.x; idx < N * cols; idx += kThreads) {
    const int i = idx >> log_cols, l = l0 + (idx & col_mask);
    const uint64_t key = keys[idx];
    const float v = i < n_b ? key_value(key) : 0.0f;
    values[idx] = v;
    if (sorted == nullptr || l >= L) continue;  // nothing saved for backward
    sorted[(size_t(b) * N + i) * L + l] = v;
    sorted_tokens[(size_t(b) * N + i) * L + l] = index_t(i < n_b ? key_index(key) : 0u);
  }
  __syncthreads();

  const int c = threadIdx.x & col_mask, g = threadIdx.x >> log_cols, l = l0 + c;
  float acc = pool_initial<float>(pooling), psi;
  if (l < L && n_b > 0) {
    for (int r = g; r < M; r += groups) {
      const int lo = q_lo[r], hi = lo + 1 < n_b ? lo + 1 : n_b - 1;
      couple_row(values + lo * cols + c, values + hi * cols + c, q_w[r], ref_sorted + size_t(r) * L + l, &psi, 1);
      pool_accumulate_row(pooling, &psi, weight_sorted ? weight_sorted + size_t(r) * L + l : nullptr, &acc, 1);
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  const bool take_max = pooling == kStm || pooling == kMax;
  reduce_over_groups(groups, log_cols, [&](int into, int from) {
    const float a = partial[into], v = partial[from];
    partial[into] = take_max ? (v > a ? v : a) : a + v;  // the max keeps pool_accumulate_row's comparison
  });
  if (g == 0 && l < L) {
    float total = partial[c];
    pool_finish_row(pooling, M, &total, 1);
    out[size_t(b) * L + l] = n_b > 0 ? total : __int_as_float(0x7fc00000);  // no valid token: NaN, not a read
  }
}

template <class index_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const float* __restrict__ grad, const int* __restrict__ n_valid,
                    const float* __restrict__ ref_sorted, const int* __restrict__ order,
                    const float* __restrict__ weight_sorted, const float* __restrict__ sorted,
                    const index_t* __restrict__ sorted_tokens, int N, int L, int M, int pooling, float inv_t,
                    int log_cols, float* __restrict__ dp, float* __restrict__ dref_partial,
                    float* __restrict__ dweight_partial) {
  extern __shared__ __align__(8) unsigned char smem[];
  const int cols = 1 << log_cols, col_mask = cols - 1, groups = kThreads >> log_cols;
  float* values = reinterpret_cast<float*>(smem);       // (N, cols): sorted values, later dp by token
  float* psi = values + size_t(N) * cols;               // (M, cols): psi, later dpsi
  int* q_lo = reinterpret_cast<int*>(psi + size_t(M) * cols);  // (M)
  float* q_w = reinterpret_cast<float*>(q_lo + M);              // (M)
  int* lo_first = reinterpret_cast<int*>(q_w + M);              // (N + 1): first rank with lo >= i
  int* hi_first = lo_first + (N + 1);                           // (N + 1): first rank with hi >= i
  float* red_value = reinterpret_cast<float*>(hi_first + (N + 1));  // (kThreads)
  float* red_sum = red_value + kThreads;                            // (kThreads)
  int* red_j = reinterpret_cast<int*>(red_sum + kThreads);          // (kThreads)
  int* red_r = red_j + kThreads;                                    // (kThreads)
  const int b = blockIdx.y, l0 = blockIdx.x * cols;
  const int n_b = n_valid[b];
  const int last = n_b > 0 ? n_b - 1 : 0;

  fill_quantile_table(n_b, M, q_lo, q_w);
  for (int idx = threadIdx.x; idx < N * cols; idx += kThreads) {
    const int i = idx >> log_cols, l = l0 + (idx & col_mask);
    values[idx] = (i < n_b && l < L) ? sorted[(size_t(b) * N + i) * L + l] : 0.0f;
  }
  __syncthreads();
  // lo and hi = min(lo + 1, n - 1) are non-decreasing in the rank: the ranks reading position i as lo are
  // [lo_first[i], lo_first[i + 1]), found by binary search in the table.
  for (int i = threadIdx.x; i <= n_b; i += kThreads) {
    int a = 0, z = M;
    while (a < z) {
      const int mid = (a + z) >> 1;
      if (q_lo[mid] < i) a = mid + 1; else z = mid;
    }
    lo_first[i] = a;
    a = 0, z = M;
    while (a < z) {
      const int mid = (a + z) >> 1;
      const int hi = q_lo[mid] + 1 < n_b ? q_lo[mid] + 1 : last;
      if (hi < i) a = mid + 1; else z = mid;
    }
    hi_first[i] = a;
  }

  const int c = threadIdx.x & col_mask, g = threadIdx.x >> log_cols, l = l0 + c;
  const bool live = l < L;
  // Pass 1: psi of this thread's ranks and their argmax (ties: the smaller reference index j, as torch).
  float best = -INFINITY;
  int best_j = 0x7fffffff, best_r = 0;
  if (live) {
    for (int r = g; r < M; r += groups) {
      const int lo = q_lo[r], hi = lo + 1 < n_b ? lo + 1 : last;
      float* p = psi + r * cols + c;
      couple_row(values + lo * cols + c, values + hi * cols + c, q_w[r], ref_sorted + size_t(r) * L + l, p, 1);
      argmax_update(p, order + size_t(r) * L + l, r, &best, &best_j, &best_r, 1);
    }
  }
  red_value[threadIdx.x] = best;
  red_j[threadIdx.x] = best_j;
  red_r[threadIdx.x] = best_r;
  __syncthreads();
  reduce_over_groups(groups, log_cols, [&](int into, int from) {
    float v = red_value[into];
    int j = red_j[into], r = red_r[into];
    argmax_update(red_value + from, red_j + from, red_r[from], &v, &j, &r, 1);
    red_value[into] = v;
    red_j[into] = j;
    red_r[into] = r;
  });
  best = red_value[c];
  best_r = red_r[c];
  __syncthreads();  // everyone has read slot c before the slots are reused

  // Pass 2 (STM): softmax sums z = sum e, num = sum e psi with e = exp((psi - max) / tau).
  float inv_z = 0.0f, mean_psi = 0.0f;
  if (pooling == kStm) {  // uniform over the block: the barriers inside are safe
    float z = 0.0f, num = 0.0f, e;
    if (live)
      for (int r = g; r < M; r += groups) stm_softmax_row(psi + r * cols + c, &best, inv_t, &e, &z, &num, 1);
    red_value[threadIdx.x] = z;
    red_sum[threadIdx.x] = num;
    __syncthreads();
    reduce_over_groups(groups, log_cols, [&](int into, int from) {
      red_value[into] += red_value[from];
      red_sum[into] += red_sum[from];
    });
    inv_z = red_value[c];
    mean_psi = red_sum[c];
    stm_normalize(&inv_z, &mean_psi, 1);
  }

  // Pass 3: dpsi per rank (stored over psi), the per-sample reference/weight gradients, and zero the dp staging.
  const float g_out = live ? grad[size_t(b) * L + l] : 0.0f;
  if (live) {
    for (int r = g; r < M; r += groups) {
      float* p = psi + r * cols + c;
      float e = 0.0f, dpsi;
      if (pooling == kStm) e = exp_approx((*p - best) * inv_t);  // stm_softmax_row's e, recomputed
      const float* wr = weight_sorted ? weight_sorted + size_t(r) * L + l : nullptr;
      pool_grad_row(pooling, M, r, p, &e, &inv_z, &mean_psi, &best_r, wr, &g_out, inv_t, &dpsi, 1);
      const size_t at = (size_t(b) * M + r) * L + l;
      dref_partial[at] = -dpsi;
      if (dweight_partial) dweight_partial[at] = g_out * *p;
      *p = dpsi;
    }
  }
  for (int idx = threadIdx.x; idx < N * cols; idx += kThreads) values[idx] = 0.0f;  // masked tokens keep 0
  __syncthreads();

  // Pass 4: ds of each sorted position, gathered from the ranks that read it, stored at its token's row.
  for (int idx = threadIdx.x; idx < n_b * cols; idx += kThreads) {
    const int i = idx >> log_cols, cc = idx & col_mask, ll = l0 + cc;
    if (ll >= L) continue;
    float ds = 0.0f;
    for (int r = lo_first[i]; r < lo_first[i + 1]; ++r) ds += psi[r * cols + cc] * (1.0f - q_w[r]);
    for (int r = hi_first[i]; r < hi_first[i + 1]; ++r) ds += psi[r * cols + cc] * q_w[r];
    const int token = int(sorted_tokens[(size_t(b) * N + i) * L + ll]);
    values[token * cols + cc] = ds;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < N * cols; idx += kThreads) {
    const int i = idx >> log_cols, ll = l0 + (idx & col_mask);
    if (ll < L) dp[(size_t(b) * N + i) * L + ll] = values[idx];
  }
}

#ifndef OMNIRET_CUDA_EMULATION  // csrc/cuda/emulation runs the kernels above on the CPU, without the launchers
// Raises the kernel's dynamic shared-memory limit when a launch needs more than the default 48 KiB.
template <class Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

#endif  // OMNIRET_CUDA_EMULATION

}  // namespace

#ifndef OMNIRET_CUDA_EMULATION
cudaError_t aswp_pool_forward(const float* proj, const uint8_t* valid, const int* n_valid, const float* ref_sorted,
                              const float* weight_sorted, int B, int N, int L, int M, int pooling, float* out,
                              float* sorted, void* sorted_tokens, bool rank_u8, cudaStream_t stream) {
  const int n_pow2 = next_pow2(N), cols = forward_cols(n_pow2), log_cols = log2_int(cols);
  const size_t shared = forward_shared_bytes(N, M);
  const dim3 grid((L + cols - 1) / cols, B);
  cudaError_t err;
  if (rank_u8) {
    if ((err = allow_shared(forward_kernel<uint8_t>, shared)) != cudaSuccess) return err;
    forward_kernel<uint8_t><<<grid, kThreads, shared, stream>>>(proj, valid, n_valid, ref_sorted, weight_sorted, N,
                                                                L, M, pooling, n_pow2, log_cols, out, sorted,
                                                                static_cast<uint8_t*>(sorted_tokens));
  } else {
    if ((err = allow_shared(forward_kernel<int32_t>, shared)) != cudaSuccess) return err;
    forward_kernel<int32_t><<<grid, kThreads, shared, stream>>>(proj, valid, n_valid, ref_sorted, weight_sorted, N,
                                                                L, M, pooling, n_pow2, log_cols, out, sorted,
                                                                static_cast<int32_t*>(sorted_tokens));
  }
  return cudaGetLastError();
}

cudaError_t aswp_pool_backward(const float* grad, const int* n_valid, const float* ref_sorted, const int* order,
                               const float* weight_sorted, const float* sorted, const void* sorted_tokens,
                               bool rank_u8, int B, int N, int L, int M, int pooling, float inv_temperature,
                               float* dp, float* dref_partial, float* dweight_partial, cudaStream_t stream) {
  const int cols = backward_cols(N, M), log_cols = log2_int(cols);
  const size_t shared = backward_shared_bytes(N, M);
  const dim3 grid((L + cols - 1) / cols, B);
  cudaError_t err;
  if (rank_u8) {
    if ((err = allow_shared(backward_kernel<uint8_t>, shared)) != cudaSuccess) return err;
    backward_kernel<uint8_t><<<grid, kThreads, shared, stream>>>(
        grad, n_valid, ref_sorted, order, weight_sorted, sorted, static_cast<const uint8_t*>(sorted_tokens), N, L,
        M, pooling, inv_temperature, log_cols, dp, dref_partial, dweight_partial);
  } else {
    if ((err = allow_shared(backward_kernel<int32_t>, shared)) != cudaSuccess) return err;
    backward_kernel<int32_t><<<grid, kThreads, shared, stream>>>(
        grad, n_valid, ref_sorted, order, weight_sorted, sorted, static_cast<const int32_t*>(sorted_tokens), N, L,
        M, pooling, inv_temperature, log_cols, dp, dref_partial, dweight_partial);
  }
  return cudaGetLastError();
}
#endif  // OMNIRET_CUDA_EMULATION

}  // namespace cuda
}  // namespace omniret
