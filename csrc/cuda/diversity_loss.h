// Launchers of the diversity-loss CUDA kernels (csrc/cuda/diversity_loss.cu): raw pointers and a stream, no torch
// types. The keep mask comes from omniret/counter_rng.h and the pair math from omniret/diversity_loss_math.h, the
// same functions the CPU kernel runs (and tests). COMPILED ONLY: built on the development machine, never run there (no GPU).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace omniret {
namespace cuda {

// m (B, N, D) float32 contiguous; seed: device pointer to one int64. inv_norm: scratch of B * N floats.
// Writes partial (B * N): the loss sum of the kept pairs of each row (the glue adds them and divides by B N^2).
cudaError_t diversity_loss_forward(const float* m, const int64_t* seed, int B, int N, int D, uint32_t threshold,
                                   float scale, float gamma, bool normalize, float* inv_norm, float* partial,
                                   cudaStream_t stream);

// grad_loss: device pointer to the scalar upstream gradient; inv_count = 1 / (B N^2). Writes grad_m (B, N, D).
cudaError_t diversity_loss_backward(const float* grad_loss, const float* m, const int64_t* seed, int B, int N, int D,
                                    uint32_t threshold, float scale, float gamma, bool normalize, float inv_count,
                                    float* inv_norm, float* grad_m, cudaStream_t stream);

// keep (B, N, N) as bytes (0/1).
cudaError_t diversity_keep_mask(const int64_t* seed, int B, int N, uint32_t threshold, uint8_t* keep,
                                cudaStream_t stream);

// Dynamic shared memory of one backward block: row i's N coefficients and the per-warp sums. The glue checks it
// against the device's opt-in limit before launch; the launcher opts in when it exceeds the default 48 KiB.
// (Plain C++ so the CPU test in tests/test_cuda_compile.py can report it at the paper's shapes.)
constexpr int kDiversityThreads = 256;
inline size_t diversity_loss_forward_shared_bytes() { return (kDiversityThreads / 32) * sizeof(float); }
inline size_t diversity_loss_backward_shared_bytes(int N) {
  return (static_cast<size_t>(N) + kDiversityThreads / 32) * sizeof(float);
}

}  // namespace cuda
}  // namespace omniret
