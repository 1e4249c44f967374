// A CPU stand-in for the parts of the CUDA execution model the ASWP kernels use, so that their thread layout (the
// (groups x cols) grids, the shared-memory tree reductions, the barriers) can be executed and checked on a machine
// without a GPU: each block runs as blockDim.x std::threads that share one shared-memory buffer and meet at a
// std::barrier for __syncthreads(). Blocks run one after another. It models no warps, no memory coalescing and no
// timing, so it checks what the kernels compute, never how fast, and it is not a GPU run.
// Used only by tests/test_cuda_compile.py (csrc/cuda/emulation/aswp_pool_emulated.cpp), never by the extension.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

// cuda_runtime_api.h (included by the launchers' headers) defines these for host compilers as attributes; replace them.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim, gridDim;
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}

// Size of the buffer that stands in for a block's dynamic shared memory. The kernel's block-scope
// `extern __shared__ unsigned char smem[]` names a variable of its own namespace, so the including file defines
// that buffer there and passes it here.
constexpr size_t kEmulatedSharedBytes = size_t(1) << 22;

// Runs body() as every thread of every block of the grid, one block at a time; the shared buffer is poisoned (0xFF
// bytes: NaN floats, -1 ints) before each block so that a read of a slot no thread wrote shows up.
template <class Body>
void emulate_launch(EmulatedDim3 grid, unsigned threads, unsigned char* smem, Body body) {
  blockDim = {threads, 1, 1};
  gridDim = grid;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(smem, 0xFF, kEmulatedSharedBytes);
      std::barrier<> barrier(threads);
      emulated_block_barrier = &barrier;
      std::vector<std::thread> workers;
      for (unsigned t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
          threadIdx = {t, 0, 0};
          blockIdx = {bx, by, 0};
          body();
        });
      }
      for (auto& w : workers) w.join();
    }
  }
}
