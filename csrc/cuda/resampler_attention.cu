// CUDA kernels of omniret::resampler_attention_fwd / _bwd. COMPILED HERE, NEVER RUN (no GPU on the build machine):
// the per-row math is the tested code of omniret/resampler_attention_math.h (the CPU kernel runs the same
// functions), the rest is deliberately plain: one thread per query row, key/value tiles in shared memory.
//
// Forward: one block per (sample, head); thread r owns query row r (Nq <= 1024), walks the sample's keys in tiles
// of kTile with online_softmax_step and accumulates its output row in registers/local memory.
// Backward: one block per (sample, kv head), looping over the G query heads of the group; per tile, thread r
// recomputes its probabilities from the saved log-sum-exp, accumulates dq in local memory, and adds its share of
// dk/dv to a shared-memory tile (shared atomics) that is then added to the block's own rows of dk/dv (no other
// block writes them).
#include "resampler_attention.h"

#include "omniret/resampler_attention_math.h"

namespace omniret {
namespace cuda {
namespace {

using resampler::finish_lse;
using resampler::online_softmax_step;
using resampler::recompute_probs;
using resampler::softmax_grad;

constexpr int kTile = 16;

// The block's threads copy keys/values j0 .. j0 + n - 1 of kv head hk into shared memory (the caller syncs).
__device__ void load_kv_tile(const float* __restrict__ k, const float* __restrict__ v, int64_t j0, int n, int Hk,
                             int hk, int d, float (*k_tile)[kResamplerMaxHeadDim],
                             float (*v_tile)[kResamplerMaxHeadDim]) {
  for (int i = threadIdx.x; i < n * d; i += blockDim.x) {
    const int j = i / d, c = i % d;
    k_tile[j][c] = k[((j0 + j) * Hk + hk) * d + c];
    v_tile[j][c] = v[((j0 + j) * Hk + hk) * d + c];
  }
}

__global__ void forward_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                               const int* __restrict__ cu_seqlens, int H, int Hk, int Nq, int d, float scale,
                               float* __restrict__ out, float* __restrict__ lse) {
  __shared__ float k_tile[kTile][kResamplerMaxHeadDim];
  __shared__ float v_tile[kTile][kResamplerMaxHeadDim];
  const int b = blockIdx.x, h = blockIdx.y, hk = h / (H / Hk);
  const int r = threadIdx.x;
  const bool active = r < Nq;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  const int64_t row = (static_cast<int64_t>(b) * H + h) * Nq + r;
  const float* q_row = q + row * d;
  float acc[kResamplerMaxHeadDim];
  for (int c = 0; c < d; ++c) acc[c] = 0.f;
  float m = -INFINITY, l = 0.f, s[kTile];
  for (int64_t j0 = start; j0 < end; j0 += kTile) {
    const int n = static_cast<int>(end - j0 < kTile ? end - j0 : kTile);
    load_kv_tile(k, v, j0, n, Hk, hk, d, k_tile, v_tile);
    __syncthreads();
    if (active) {
      for (int j = 0; j < n; ++j) {
        float dotp = 0.f;
        for (int c = 0; c < d; ++c) dotp += q_row[c] * k_tile[j][c];
        s[j] = dotp * scale;
      }
      const float rescale = online_softmax_step(s, n, m, l);
      for (int c = 0; c < d; ++c) {
        float a = acc[c] * rescale;
        for (int j = 0; j < n; ++j) a += s[j] * v_tile[j][c];
        acc[c] = a;
      }
    }
    __syncthreads();
  }
  if (active) {
    const float inv = 1.f / l;
    for (int c = 0; c < d; ++c) out[row * d + c] = acc[c] * inv;
    lse[row] = finish_lse(m, l);
  }
}

__global__ void backward_kernel(const float* __restrict__ grad_out, const float* __restrict__ q,
                                const float* __restrict__ k, const float* __restrict__ v,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                const int* __restrict__ cu_seqlens, int H, int Hk, int Nq, int d, float scale,
                                float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv) {
  __shared__ float k_tile[kTile][kResamplerMaxHeadDim];
  __shared__ float v_tile[kTile][kResamplerMaxHeadDim];
  __shared__ float dk_tile[kTile][kResamplerMaxHeadDim];
  __shared__ float dv_tile[kTile][kResamplerMaxHeadDim];
  const int b = blockIdx.x, hk = blockIdx.y, G = H / Hk;
  const int r = threadIdx.x;
  const bool active = r < Nq;
  const int64_t start = cu_seqlens[b], end = cu_seqlens[b + 1];
  for (int g = 0; g < G; ++g) {
    const int h = hk * G + g;
    const int64_t row = (static_cast<int64_t>(b) * H + h) * Nq + r;
    const float* q_row = q + row * d;
    const float* do_row = grad_out + row * d;
    const float row_lse = active ? lse[row] : 0.f, row_delta = active ? delta[row] : 0.f;
    float dq_acc[kResamplerMaxHeadDim];
    for (int c = 0; c < d; ++c) dq_acc[c] = 0.f;
    float p[kTile], dp[kTile];
    for (int64_t j0 = start; j0 < end; j0 += kTile) {
      const int n = static_cast<int>(end - j0 < kTile ? end - j0 : kTile);
      load_kv_tile(k, v, j0, n, Hk, hk, d, k_tile, v_tile);
      for (int i = threadIdx.x; i < n * d; i += blockDim.x) {
        dk_tile[i / d][i % d] = 0.f;
        dv_tile[i / d][i % d] = 0.f;
      }
      __syncthreads();
      if (active) {
        for (int j = 0; j < n; ++j) {
          float qk = 0.f, dov = 0.f;
          for (int c = 0; c < d; ++c) {
            qk += q_row[c] * k_tile[j][c];
            dov += do_row[c] * v_tile[j][c];
          }
          p[j] = qk * scale;
          dp[j] = dov;
        }
        recompute_probs(p, n, row_lse);
        softmax_grad(p, dp, n, row_delta);  // dp <- dS
        for (int j = 0; j < n; ++j) {
          for (int c = 0; c < d; ++c) {
            dq_acc[c] += scale * dp[j] * k_tile[j][c];
            atomicAdd(&dk_tile[j][c], scale * dp[j] * q_row[c]);
            atomicAdd(&dv_tile[j][c], p[j] * do_row[c]);
          }
        }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < n * d; i += blockDim.x) {
        const int j = i / d, c = i % d;
        const int64_t at = ((j0 + j) * Hk + hk) * d + c;
        dk[at] += dk_tile[j][c];
        dv[at] += dv_tile[j][c];
      }
      __syncthreads();
    }
    if (active)
      for (int c = 0; c < d; ++c) dq[row * d + c] = dq_acc[c];
  }
}

int threads_for(int Nq) { return ((Nq + 31) / 32) * 32; }

}  // namespace

cudaError_t resampler_attention_forward(const float* q, const float* k, const float* v, const int* cu_seqlens,
                                        int B, int H, int Hk, int Nq, int d, float scale, float* out, float* lse,
                                        cudaStream_t stream) {
  if (B == 0 || H == 0 || Nq == 0) return cudaSuccess;
  if (d > kResamplerMaxHeadDim || Nq > 1024) return cudaErrorInvalidValue;
  forward_kernel<<<dim3(B, H), threads_for(Nq), 0, stream>>>(q, k, v, cu_seqlens, H, Hk, Nq, d, scale, out, lse);
  return cudaGetLastError();
}

cudaError_t resampler_attention_backward(const float* grad_out, const float* q, const float* k, const float* v,
                                         const float* lse, const float* delta, const int* cu_seqlens, int B, int H,
                                         int Hk, int Nq, int d, float scale, float* dq, float* dk, float* dv,
                                         cudaStream_t stream) {
  if (B == 0 || H == 0 || Nq == 0) return cudaSuccess;
  if (d > kResamplerMaxHeadDim || Nq > 1024) return cudaErrorInvalidValue;
  backward_kernel<<<dim3(B, Hk), threads_for(Nq), 0, stream>>>(grad_out, q, k, v, lse, delta, cu_seqlens, H, Hk,
                                                               Nq, d, scale, dq, dk, dv);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace omniret
