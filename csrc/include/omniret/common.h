// Shared by the CPU (g++) and CUDA (nvcc) builds: math written once, marked OMNIRET_HD, runs on both.
#pragma once

#if defined(__CUDACC__)
#define OMNIRET_HD __host__ __device__ __forceinline__
#else
#define OMNIRET_HD inline
#endif

#include <cstdint>
