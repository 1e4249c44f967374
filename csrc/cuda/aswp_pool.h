// Launchers of the ASWP CUDA kernels (csrc/cuda/aswp_pool.cu): raw pointers and a stream, no torch types.
// The projection and the backward GEMMs run in cuBLAS from the glue (csrc/cuda/register_cuda.cpp); these kernels
// do the column sort, the quantile coupling and the pooling, with the math of omniret/aswp_pool_math.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace omniret {
namespace cuda {

// proj (B * N, L) float32; valid (B, N) uint8 or nullptr (all valid); n_valid (B) int32; ref_sorted and
// weight_sorted (M, L) float32 in rank order (weight_sorted only for pooling 3 = weighted, else nullptr).
// Writes out (B, L), sorted (B, N, L) and sorted_tokens (B, N, L) = the token at each sorted position (uint8
// when rank_u8, else int32; 0 past the sample's valid tokens); sorted and sorted_tokens both nullptr: out only.
cudaError_t aswp_pool_forward(const float* proj, const uint8_t* valid, const int* n_valid, const float* ref_sorted,
                              const float* weight_sorted, int B, int N, int L, int M, int pooling, float* out,
                              float* sorted, void* sorted_tokens, bool rank_u8, cudaStream_t stream);

// grad (B, L); order (M, L) int32 = reference index j of each rank. Writes dp (B * N, L) (zeroed beforehand:
// masked tokens are never written) and the reference
// (and, for weighted, weight) gradients in rank order (M, L).
cudaError_t aswp_pool_backward(const float* grad, const uint8_t* valid, const int* n_valid, const float* ref_sorted,
                               const int* order, const float* weight_sorted, const float* sorted,
                               const void* sorted_tokens, bool rank_u8, int B, int N, int L, int M, int pooling,
                               float inv_temperature, float* dp, float* dref_sorted, float* dweight_sorted,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace omniret
