// Launchers of the resampler_attention CUDA kernels (csrc/cuda/resampler_attention.cu): raw pointers and a stream,
// no torch types. float32 only (the glue converts half/bfloat16); d <= kResamplerMaxHeadDim; Nq <= 1024.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace omniret {
namespace cuda {

constexpr int kResamplerMaxHeadDim = 128;

// q (B, H, Nq, d), k/v (T, Hk, d), cu_seqlens (B + 1) int32, all contiguous. Writes out (B, H, Nq, d) and
// lse (B, H, Nq).
cudaError_t resampler_attention_forward(const float* q, const float* k, const float* v, const int* cu_seqlens,
                                        int B, int H, int Hk, int Nq, int d, float scale, float* out, float* lse,
                                        cudaStream_t stream);

// delta (B, H, Nq) = rowsum(grad_out * out). Writes dq; dk and dv (T, Hk, d) must be zeroed beforehand.
cudaError_t resampler_attention_backward(const float* grad_out, const float* q, const float* k, const float* v,
                                         const float* lse, const float* delta, const int* cu_seqlens, int B, int H,
                                         int Hk, int Nq, int d, float scale, float* dq, float* dk, float* dv,
                                         cudaStream_t stream);

}  // namespace cuda
}  // namespace omniret
