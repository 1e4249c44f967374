// CUDA kernels of the diversity loss (SPEC section 3). COMPILED ONLY: there is no GPU on the development machine,
// so they have never run; the math they call is the header math the CPU kernel runs and the tests check.
//
// One block per (sample b, row i); its warps take the columns j in turn. A column is touched only when the Philox
// keep bit says so (forward: keep[b, i, j]; backward: keep[b, i, j] or keep[b, j, i]), so only the kept pairs'
// dot products are formed, and the mask is regenerated, never stored. The backward keeps row i's coefficients
// in shared memory and writes grad[b, i, :] as their combination of the rows of m[b] (coalesced over D). That row
// is N floats of dynamic shared memory: past 48 KiB (N > ~12K) the launcher opts in to the device's larger limit,
// and the glue refuses an N beyond the device's opt-in limit before launch.
#include "diversity_loss.h"

#include "omniret/counter_rng.h"
#include "omniret/diversity_loss_math.h"

namespace omniret {
namespace cuda {
namespace {

constexpr int kThreads = kDiversityThreads;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// diversity_keep of omniret/counter_rng.h, bit for bit, with the word picked by selects instead of v[j & 3]: a
// dynamic index into the Philox block would put it in local memory (ptxas gave keep_mask_kernel a stack frame).
__device__ __forceinline__ bool keep_pair(uint64_t seed, int b, int i, int j, uint32_t threshold) {
  const Philox4x32 block = diversity_keep_block(seed, uint32_t(b), uint32_t(i), uint32_t(j) >> 2);
  const uint32_t k = uint32_t(j) & 3u;
  const uint32_t word = k == 0 ? block.v[0] : (k == 1 ? block.v[1] : (k == 2 ? block.v[2] : block.v[3]));
  return word >= threshold;
}

// <a, b> over D, the lanes of one warp striding over D; every lane gets the sum.
__device__ __forceinline__ float warp_dot(const float* __restrict__ a, const float* __restrict__ b, int D, int lane) {
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s = fmaf(a[d], b[d], s);
  return warp_sum(s);
}

// One warp per row: 1 / ||m_r|| (or 1 without normalization).
__global__ void inverse_norm_kernel(const float* __restrict__ m, int rows, int D, bool normalize,
                                    float* __restrict__ inv_norm) {
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* r = m + static_cast<int64_t>(row) * D;
  const float ss = warp_dot(r, r, D, lane);
  if (lane == 0) inv_norm[row] = normalize ? 1.f / sqrtf(ss) : 1.f;
}

__global__ void forward_kernel(const float* __restrict__ m, const int64_t* __restrict__ seed_ptr, int N, int D,
                               uint32_t threshold, float scale, float gamma, const float* __restrict__ inv_norm,
                               float* __restrict__ partial) {
  const int row = blockIdx.x, b = row / N, i = row % N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const float* x = m + static_cast<int64_t>(b) * N * D;
  const float* xi = x + static_cast<int64_t>(i) * D;
  float acc = 0.f;
  for (int j = warp; j < N; j += kWarps) {
    if (!keep_pair(seed, b, i, j, threshold)) continue;  // uniform across the warp
    const float g = warp_dot(xi, x + static_cast<int64_t>(j) * D, D, lane) * inv_norm[row] * inv_norm[b * N + j];
    acc += diversity_pair_loss(g, j == i, scale, gamma);
  }
  extern __shared__ float warp_sums[];  // kWarps floats (dynamic, like the backward's row)
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    partial[row] = total;
  }
}

__global__ void backward_kernel(const float* __restrict__ grad_loss, const float* __restrict__ m,
                                const int64_t* __restrict__ seed_ptr, int N, int D, uint32_t threshold, float scale,
                                float gamma, bool normalize, float inv_count, const float* __restrict__ inv_norm,
                                float* __restrict__ grad_m) {
  extern __shared__ float coef_row[];         // N floats: W[i, :], then kWarps floats of per-warp sums
  float* warp_radial = coef_row + N;          // dynamic too, so the one byte count covers the block
  const int row = blockIdx.x, b = row / N, i = row % N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const float* x = m + static_cast<int64_t>(b) * N * D;
  const float* xi = x + static_cast<int64_t>(i) * D;
  const float weight = *grad_loss * inv_count, inv_i = inv_norm[row];
  float radial = 0.f;  // <dL/du_i, u_i>
  for (int j = warp; j < N; j += kWarps) {
    // g_ij feeds pair (i, j) and pair (j, i), each with its own keep bit.
    const int uses = int(keep_pair(seed, b, i, j, threshold)) + int(keep_pair(seed, b, j, i, threshold));
    float w = 0.f;
    if (uses > 0) {
      const float inv_j = inv_norm[b * N + j];
      const float g = warp_dot(xi, x + static_cast<int64_t>(j) * D, D, lane) * inv_i * inv_j;
      const float c = weight * diversity_pair_grad(g, j == i, scale, gamma) * float(uses);
      w = c * inv_i * inv_j;
      radial += c * g;
    }
    if (lane == 0) coef_row[j] = w;
  }
  if (lane == 0) warp_radial[warp] = radial;
  __syncthreads();
  if (threadIdx.x == 0 && normalize) {  // dm_i = inv_i * (du_i - <du_i, u_i> u_i)
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += warp_radial[w];
    coef_row[i] -= total * inv_i * inv_i;
  }
  __syncthreads();
  float* out = grad_m + static_cast<int64_t>(row) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < N; ++j) {
      const float w = coef_row[j];  // same for every thread: no divergence
      if (w != 0.f) s = fmaf(w, x[static_cast<int64_t>(j) * D + d], s);
    }
    out[d] = s;
  }
}

__global__ void keep_mask_kernel(const int64_t* __restrict__ seed_ptr, int B, int N, uint32_t threshold,
                                 uint8_t* __restrict__ keep) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(B) * N * N;
  if (idx >= total) return;
  const int j = static_cast<int>(idx % N), i = static_cast<int>((idx / N) % N), b = static_cast<int>(idx / N / N);
  keep[idx] = keep_pair(static_cast<uint64_t>(*seed_ptr), b, i, j, threshold) ? 1 : 0;
}

#ifndef OMNIRET_CUDA_EMULATION  // csrc/cuda/emulation runs the kernels above on the CPU, without the launchers
cudaError_t launch_inverse_norms(const float* m, int rows, int D, bool normalize, float* inv_norm,
                                 cudaStream_t stream) {
  const int blocks = static_cast<int>((static_cast<int64_t>(rows) * 32 + kThreads - 1) / kThreads);
  inverse_norm_kernel<<<blocks, kThreads, 0, stream>>>(m, rows, D, normalize, inv_norm);
  return cudaGetLastError();
}

#endif  // OMNIRET_CUDA_EMULATION

}  // namespace

#ifndef OMNIRET_CUDA_EMULATION
cudaError_t diversity_loss_forward(const float* m, const int64_t* seed, int B, int N, int D, uint32_t threshold,
                                   float scale, float gamma, bool normalize, float* inv_norm, float* partial,
                                   cudaStream_t stream) {
  cudaError_t err = launch_inverse_norms(m, B * N, D, normalize, inv_norm, stream);
  if (err != cudaSuccess) return err;
  forward_kernel<<<B * N, kThreads, diversity_loss_forward_shared_bytes(), stream>>>(m, seed, N, D, threshold, scale, gamma, inv_norm, partial);
  return cudaGetLastError();
}

cudaError_t diversity_loss_backward(const float* grad_loss, const float* m, const int64_t* seed, int B, int N, int D,
                                    uint32_t threshold, float scale, float gamma, bool normalize, float inv_count,
                                    float* inv_norm, float* grad_m, cudaStream_t stream) {
  cudaError_t err = launch_inverse_norms(m, B * N, D, normalize, inv_norm, stream);
  if (err != cudaSuccess) return err;
  const size_t shared = diversity_loss_backward_shared_bytes(N);
  if (shared > 48 * 1024) {  // the default limit; beyond it the kernel must opt in (up to the device's opt-in limit)
    err = cudaFuncSetAttribute(backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err != cudaSuccess) return err;
  }
  backward_kernel<<<B * N, kThreads, shared, stream>>>(grad_loss, m, seed, N, D, threshold, scale, gamma, normalize,
                                                      inv_count, inv_norm, grad_m);
  return cudaGetLastError();
}

cudaError_t diversity_keep_mask(const int64_t* seed, int B, int N, uint32_t threshold, uint8_t* keep,
                                cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(B) * N * N;
  if (total == 0) return cudaSuccess;
  const int blocks = static_cast<int>((total + kThreads - 1) / kThreads);
  keep_mask_kernel<<<blocks, kThreads, 0, stream>>>(seed, B, N, threshold, keep);
  return cudaGetLastError();
}

#endif  // OMNIRET_CUDA_EMULATION

}  // namespace cuda
}  // namespace omniret
