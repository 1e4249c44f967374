// Launchers of the ASWP CUDA kernels (csrc/cuda/aswp_pool.cu): raw pointers and a stream, no torch types.
// The projection and the backward GEMMs run in cuBLAS from the glue (csrc/cuda/aswp_pool_glue.cpp); these kernels
// do the column sort, the quantile coupling and the pooling, with the math of omniret/aswp_pool_math.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "aswp_pool_launch.h"

namespace omniret {
namespace cuda {

// The dynamic shared memory of one block, aswp_launch::forward_shared_bytes / backward_shared_bytes (in
// aswp_pool_launch.h), is what the glue compares with the device's opt-in limit before launch; the launchers opt
// in to more than the default 48 KiB when a shape needs it.

// proj (B * N, L) float32; valid (B, N) uint8 or nullptr (all valid); n_valid (B) int32, each >= 1 (a sample
// without a valid token gets NaN); ref_sorted and weight_sorted (M, L) float32 in rank order (weight_sorted only
// for pooling 3 = weighted, else nullptr). Writes out (B, L), sorted (B, N, L) and sorted_tokens (B, N, L) = the
// token at each sorted position (uint8 when rank_u8, else int32; 0 past the sample's valid tokens); sorted and
// sorted_tokens both nullptr: out only.
cudaError_t aswp_pool_forward(const float* proj, const uint8_t* valid, const int* n_valid, const float* ref_sorted,
                              const float* weight_sorted, int B, int N, int L, int M, int pooling, float* out,
                              float* sorted, void* sorted_tokens, bool rank_u8, cudaStream_t stream);

// grad (B, L); order (M, L) int32 = reference index j of each rank. Writes every element of dp (B * N, L) (masked
// tokens get 0) and, per sample, the reference gradient dref_partial (B, M, L) in rank order (and for weighted the
// weight gradient dweight_partial (B, M, L), else nullptr); the caller sums the partials over B. One block per
// (columns, sample): the samples run in parallel, and the per-sample partials keep the sum deterministic.
cudaError_t aswp_pool_backward(const float* grad, const int* n_valid, const float* ref_sorted, const int* order,
                               const float* weight_sorted, const float* sorted, const void* sorted_tokens,
                               bool rank_u8, int B, int N, int L, int M, int pooling, float inv_temperature,
                               float* dp, float* dref_partial, float* dweight_partial, cudaStream_t stream);

}  // namespace cuda
}  // namespace omniret
