// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator, so any backend can draw the random bits of item (b, i, j) on its own, in any order, and a backward
// pass can regenerate them instead of storing them. Shared by the CPU (g++) and CUDA (nvcc) kernels; the same
// function is written in Python (omniret_kernels/_counter_rng.py) and Triton, and they must agree bit for bit
// (csrc/tests/test_counter_rng.cpp checks known answers computed by the Python version).
#pragma once

#include "omniret/common.h"

namespace omniret {

struct Philox4x32 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
// Fourth counter word of the diversity-loss keep mask ("DIVS"): separates its stream from other uses of a seed.
constexpr uint32_t kDiversityStream = 0x44495653u;

OMNIRET_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

OMNIRET_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mulhi32(c0, kPhiloxM0), lo0 = c0 * kPhiloxM0;
    const uint32_t hi1 = mulhi32(c2, kPhiloxM1), lo1 = c2 * kPhiloxM1;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// floor(p * 2^32) for p in [0, 1): exact in double (a power-of-two scaling), so Python, C++ and Triton agree.
OMNIRET_HD uint32_t keep_threshold(double p) { return static_cast<uint32_t>(p * 4294967296.0); }

// One Philox block serves four consecutive columns: counter (j / 4, i, b, stream), word j % 4.
OMNIRET_HD Philox4x32 diversity_keep_block(uint64_t seed, uint32_t b, uint32_t i, uint32_t j_block) {
  return philox4x32_10(j_block, i, b, kDiversityStream, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// keep[b, i, j] of the diversity loss: the pair survives dropout when its word is >= floor(p * 2^32).
OMNIRET_HD bool diversity_keep(uint64_t seed, uint32_t b, uint32_t i, uint32_t j, uint32_t threshold) {
  return diversity_keep_block(seed, b, i, j >> 2).v[j & 3u] >= threshold;
}

}  // namespace omniret
