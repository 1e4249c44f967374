// Unit test of csrc/include/omniret/counter_rng.h (no torch): Philox4x32-10 against the Random123 known-answer
// vectors, and the diversity-loss keep mask against values computed by the Python implementation
// (omniret_kernels/_counter_rng.py), so that C++, CUDA, Python and Triton draw the same bits.
#include <cstdio>
#include <cstring>

#include "omniret/counter_rng.h"

using omniret::Philox4x32;

static int failures = 0;

static void expect_words(const char* what, const Philox4x32& got, const uint32_t (&want)[4]) {
  for (int k = 0; k < 4; ++k) {
    if (got.v[k] != want[k]) {
      std::printf("FAIL %s: word %d = 0x%08x, expected 0x%08x\n", what, k, got.v[k], want[k]);
      ++failures;
    }
  }
}

int main() {
  // Random123 kat_vectors, philox4x32_10.
  {
    const uint32_t want[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
    expect_words("kat zero", omniret::philox4x32_10(0, 0, 0, 0, 0, 0), want);
  }
  {
    const uint32_t want[4] = {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu};
    const uint32_t f = 0xffffffffu;
    expect_words("kat ones", omniret::philox4x32_10(f, f, f, f, f, f), want);
  }
  {
    const uint32_t want[4] = {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u};
    expect_words("kat pi", omniret::philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u,
                                                  0xa4093822u, 0x299f31d0u), want);
  }
  // diversity_keep_block(seed, b, i, j / 4) as omniret_kernels/_counter_rng.py computes it.
  struct Case {
    uint64_t seed;
    uint32_t b, i, jb;
    uint32_t want[4];
  };
  const Case cases[] = {
      {0x0ull, 0, 0, 0, {0xe9f4f571u, 0x8a0d3801u, 0x9975771eu, 0x10f353c4u}},
      {0x123456789abcdefull, 3, 17, 5, {0x55f6fb74u, 0x439c5736u, 0xd70b573cu, 0x356ffd38u}},
      {0x7ffffffffffffffeull, 255, 63, 15, {0x5b2124c4u, 0xadcf7d6au, 0x22c199c3u, 0x93e0fe38u}},
      {0x3ade68b1ull, 1, 2, 3, {0x7eced732u, 0x5172b94au, 0x5b576609u, 0x61664894u}},
  };
  for (const Case& c : cases) expect_words("diversity_keep_block", omniret::diversity_keep_block(c.seed, c.b, c.i, c.jb),
                                           c.want);
  // keep_mask(seed=987654321, batch=2, n=9, p=0.5) from Python, flattened (b, i, j).
  const char* python_mask =
      "100001111101001010011011111110001011100101000110110100110000101100100011010000010000000100101111111110110011"
      "110101010010101010100001100000101111101110101001001110";
  const uint32_t threshold = omniret::keep_threshold(0.5);
  if (threshold != 0x80000000u) {
    std::printf("FAIL keep_threshold(0.5) = 0x%08x\n", threshold);
    ++failures;
  }
  if (std::strlen(python_mask) != 2 * 9 * 9) {
    std::printf("FAIL reference mask length %zu\n", std::strlen(python_mask));
    ++failures;
  }
  for (uint32_t b = 0; b < 2; ++b)
    for (uint32_t i = 0; i < 9; ++i)
      for (uint32_t j = 0; j < 9; ++j) {
        const bool want = python_mask[(b * 9 + i) * 9 + j] == '1';
        if (omniret::diversity_keep(987654321ull, b, i, j, threshold) != want) {
          std::printf("FAIL keep[%u, %u, %u] != %d\n", b, i, j, want);
          ++failures;
        }
      }
  // Thresholds: p = 0 keeps every word, p just below 1 keeps only words >= floor(p * 2^32).
  if (omniret::keep_threshold(0.0) != 0u || omniret::keep_threshold(0.9) != 3865470566u) {
    std::printf("FAIL keep_threshold(0.0 / 0.9)\n");
    ++failures;
  }
  if (failures) std::printf("%d failure(s)\n", failures);
  else std::printf("counter_rng: all checks passed\n");
  return failures ? 1 : 0;
}
