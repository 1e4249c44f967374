// What the per-op CUDA glue files (csrc/cuda/<op>_glue.cpp) share: the torch/CUDA headers and the check that a
// kernel's shared memory fits the device before launch. The .cu files include no torch headers; only glue does.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

namespace omniret {
namespace cuda {

// The most dynamic shared memory one block may use on the current device after opting in
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: 166,912 B on A100, 232,448 B on H100). Asked of the runtime directly:
// ATen/cuda/CUDAContext.h would pull in the cuSPARSE/cuBLAS headers, which a bare toolkit may lack.
inline size_t shared_memory_optin_limit() {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  return size_t(bytes);
}

// Raises ValueError before launch when `bytes` exceed the opt-in limit, naming the op, the shape and the limit.
inline void check_shared_memory_fits(const char* op, const std::string& shape, size_t bytes) {
  const size_t limit = shared_memory_optin_limit();
  TORCH_CHECK_VALUE(bytes <= limit, op, ": the CUDA kernel needs ", bytes, " bytes of shared memory per block at ",
                    shape, ", more than this device's opt-in limit of ", limit,
                    " bytes; use a smaller shape or another backend (backend='triton' or 'cpu')");
}

}  // namespace cuda
}  // namespace omniret
