// A CPU stand-in for the parts of the CUDA execution model our kernels use, so that their thread layout can be
// executed and checked on a machine without a GPU (ASWP: the (groups x cols) grids and tree reductions; diversity:
// the warp sums). Each block runs as blockDim.x std::threads that share one shared-memory buffer and meet at a
// std::barrier for __syncthreads(); __shfl_xor_sync meets at a per-warp barrier. Blocks run one after another. It
// models no lockstep execution, no memory coalescing and no timing: it checks what the kernels compute, never how
// fast, and it is not a GPU run.
// Used only by tests/test_cuda_compile.py (csrc/cuda/emulation/*_emulated.cpp), never by the extension.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

// Warp shuffles: the 32 lanes of a warp meet at the warp's barrier, publish their value and read the partner's.
// Every lane of the warp must call it (as the kernels do: a warp's loop bounds are uniform).
inline std::vector<std::barrier<>*> emulated_warp_barriers;
inline float emulated_shuffle_slots[1024];
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned t = threadIdx.x;
  std::barrier<>& warp = *emulated_warp_barriers[t / 32];
  emulated_shuffle_slots[t] = value;
  warp.arrive_and_wait();
  const float other = emulated_shuffle_slots[(t & ~31u) | ((t & 31u) ^ unsigned(lane_mask))];
  warp.arrive_and_wait();
  return other;
}
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
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      emulated_warp_barriers.clear();
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(threads - 32 * w < 32 ? threads - 32 * w : 32));
        emulated_warp_barriers.push_back(warps.back().get());
      }
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
