// CPU kernel of omniret::aswp_pool_fwd / _bwd (SPEC section 1).
//
// Forward, per work item (a group of whole samples x a tile of slices): project the tile with ATen's GEMM
// (MKL here, the same GEMM the floor is timed with), then per sample and per 32-column block: pack each
// projection with its token index into a uint64 key, sort every column with a bitonic network (each comparator
// an AVX-512 min/max over 8 columns, in L1 and registers), then couple to the reference quantiles and pool
// walking the references in rank order (row operations, no gathers). On CPUs with AVX-512 the pack / sort /
// unpack of a full block is one vectorised function (pack_sort_unpack_avx512); without it the sort is an AVX2
// network and pack/unpack scalar, else all scalar (aswp_pool_math.h's network). Every path computes the same
// bits (OMNIRET_ASWP_NO_AVX512=1, and OMNIRET_ASWP_NO_AVX2=1 too, select them; the tests compare all three).
// Written: the (B, L) output, and for backward (save_for_backward) the sorted values (B, N, L) and the token at
// each sorted position (uint8 when N <= 256), both in fresh zero pages of which a masked row never touches any (a
// ragged batch's saved tensors take memory by its true lengths). The (B, N, L) projection is never materialised.
// Without save_for_backward (the Python wrapper passes it when grad is on and an input requires grad) nothing
// else is written and the float32 sort keys are the values alone (uint32, half the sort's work).
//
// Backward, per 32-column block (all samples, so the reference and weight gradients need no atomics):
// recompute psi from the saved sorted values, take the pooling gradient (STM's softmax vectorised), push it
// through the coupling and the sort (scattered in L1, then copied into dp row by row), then two GEMMs give
// dx = dp d and d(d) = dp^T x. theta = d / ||d|| is never materialised: the GEMMs use `directions` as is and
// the 1 / ||d|| scale is applied to the projection rows in cache (forward) and to dp as it is written
// (backward). Storing the sorted values (4 B per projection) instead of recomputing the projection saves a
// fourth GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "omniret/aswp_pool_checks.h"
#include "omniret/aswp_pool_math.h"

namespace omniret {
namespace {

using namespace omniret::aswp;

constexpr int kSortWidth = 32;      // columns sorted together: 128 rows x 32 x 8 B = 32 KiB, inside L1
constexpr int64_t kSliceTile = 1024;  // GEMM tile width: MKL's (1024 x 1536) x (1536 x w) ran ~12% slower at
                                      // w = 256 than untiled, ~5% at 512; end to end 1024 was fastest (the 4 MiB
                                      // tile is read from L2/L3 by the packing, which costs less than the GEMM loss)
constexpr int64_t kGemmRows = 1024;  // rows of x per GEMM tile (whole samples)
constexpr int64_t kBackwardChunk = 1024;  // most slices of dp alive at once in backward (multiple of kSortWidth)
constexpr int64_t kBackwardChunkElements = int64_t(1) << 19;  // most elements of dp alive at once (see backward)

// Slices per backward chunk for `rows` = B * N rows of dp: a multiple of kSortWidth, at most kBackwardChunk and
// kBackwardChunkElements / rows, at least two column blocks per thread.
inline int64_t backward_chunk(int64_t rows, int64_t L) {
  const int64_t floor_slices = 2 * kSortWidth * int64_t(at::get_num_threads());
  int64_t chunk = std::min(kBackwardChunk, kBackwardChunkElements / std::max<int64_t>(rows, 1));
  chunk = std::max(floor_slices, chunk / kSortWidth * kSortWidth);
  return std::min(L, chunk);
}

// sum_k v[k]^2 accumulated in float64 (as the reference's norm of a float32 row is accurate to float32), with
// four independent vector accumulators: one sequential float64 add chain per row cost as much as the rest of
// the preparation together.
inline double squared_norm(const float* v, int64_t n) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int u = 0; u < 4; ++u) {
      const __m256d x = _mm256_cvtps_pd(_mm_loadu_ps(v + k + 4 * u));
      acc[u] = _mm256_fmadd_pd(x, x, acc[u]);
    }
  __m256d s = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  double sq = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  for (; k < n; ++k) sq += double(v[k]) * double(v[k]);
  return sq;
}
inline double squared_norm(const double* v, int64_t n) {
  double part[4] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int u = 0; u < 4; ++u) part[u] += v[k + u] * v[k + u];
  double sq = (part[0] + part[1]) + (part[2] + part[3]);
  for (; k < n; ++k) sq += v[k] * v[k];
  return sq;
}

// <a, b> with 16 independent partial sums (vectorised by the compiler; one sequential add chain per row of
// d(directions) cost ~10 ms at the paper shape).
template <class T>
T dot_product(const T* a, const T* b, int64_t n) {
  T part[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int u = 0; u < 16; ++u) part[u] += a[k + u] * b[k + u];
  T sum = 0;
  for (int u = 0; u < 16; ++u) sum += part[u];
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// stm_softmax_row of aswp_pool_math.h, eight columns per step with AVX2: the same operations in the same order
// (separate multiply and add, as the header's scalar code compiles without FP contraction), so the result is
// the header's bit for bit; g++ left the scalar loop unvectorised (floorf and the bit casts in exp_approx).
inline __m256 exp_approx8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));  // NaN stays NaN
  const __m256 n = _mm256_floor_ps(
      _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(y, r), r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline void stm_softmax_row_cpu(const float* psi, const float* best, float inv_t, float* e, float* z, float* num,
                                int width) {
  const __m256 t = _mm256_set1_ps(inv_t);
  int c = 0;
  for (; c + 8 <= width; c += 8) {
    const __m256 p = _mm256_loadu_ps(psi + c);
    const __m256 v = exp_approx8(_mm256_mul_ps(_mm256_sub_ps(p, _mm256_loadu_ps(best + c)), t));
    _mm256_storeu_ps(e + c, v);
    _mm256_storeu_ps(z + c, _mm256_add_ps(_mm256_loadu_ps(z + c), v));
    _mm256_storeu_ps(num + c, _mm256_add_ps(_mm256_loadu_ps(num + c), _mm256_mul_ps(v, p)));
  }
  if (c < width) stm_softmax_row(psi + c, best + c, inv_t, e + c, z + c, num + c, width - c);
}
inline void stm_softmax_row_cpu(const double* psi, const double* best, double inv_t, double* e, double* z,
                                double* num, int width) {
  stm_softmax_row(psi, best, inv_t, e, z, num, width);
}

// ---- the AVX-512 column sort ---------------------------------------------------------------------------------
// Sorts every column of a (n_pow2 x kSortWidth) row-major block of unsigned keys, ascending; unused columns and
// rows hold the all-ones pad key. The network is the bitonic sorter in its one-direction form: merging runs of
// `size` rows starts with a "flip" step (row base + j against row base + size - 1 - j, which turns two sorted
// halves into a bitonic sequence without reversing one of them), then half-cleaner steps of stride size/4 .. 1,
// every comparator putting the minimum in the lower row. No comparator needs a direction select (the two-
// direction form cost a branch or blend per comparator). It is a different network from the header's
// bitonic_sort (the portable path), but every valid key is distinct (the token index is part of the key) or, for
// value-only keys, equal keys are equal values: the sorted block is the same bits either way.
// Steps of stride <= 8 run on groups of 16 rows held in registers, each register one row of V columns;
// the flip steps of runs >= 32 rows and the half-cleaners of stride >= 16 go row pair by row pair through L1.
// (The all-ones zero-masked forms compile to the plain instructions; the unmasked intrinsics' undefined source
// operand makes g++ 12 warn -Wmaybe-uninitialized at every inlined use.)
template <class Key>
struct Avx512Keys;
template <>
struct Avx512Keys<uint64_t> {
  static constexpr int V = 8;  // keys per register
  __attribute__((target("avx512f"), always_inline)) static __m512i min(__m512i a, __m512i b) {
    return _mm512_maskz_min_epu64(__mmask8(0xff), a, b);
  }
  __attribute__((target("avx512f"), always_inline)) static __m512i max(__m512i a, __m512i b) {
    return _mm512_maskz_max_epu64(__mmask8(0xff), a, b);
  }
};
template <>
struct Avx512Keys<uint32_t> {
  static constexpr int V = 16;
  __attribute__((target("avx512f"), always_inline)) static __m512i min(__m512i a, __m512i b) {
    return _mm512_maskz_min_epu32(__mmask16(0xffff), a, b);
  }
  __attribute__((target("avx512f"), always_inline)) static __m512i max(__m512i a, __m512i b) {
    return _mm512_maskz_max_epu32(__mmask16(0xffff), a, b);
  }
};

template <class Ops>
__attribute__((target("avx512f"), always_inline)) inline void order_pair(__m512i& a, __m512i& b) {
  const __m512i lo = Ops::min(a, b);
  b = Ops::max(a, b);
  a = lo;
}

template <class Ops>
__attribute__((target("avx512f"), always_inline)) inline void order_rows(void* a, void* b) {
  __m512i x = _mm512_loadu_si512(a), y = _mm512_loadu_si512(b);
  order_pair<Ops>(x, y);
  _mm512_storeu_si512(a, x);
  _mm512_storeu_si512(b, y);
}

// Half-cleaner of stride STEP inside a group of 16 registers.
template <class Ops, int STEP>
__attribute__((target("avx512f"), always_inline)) inline void register_half_cleaner(__m512i* r) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if ((i & STEP) == 0) order_pair<Ops>(r[i], r[i + STEP]);
}

// Flip step of runs of SIZE <= 16 rows inside a group of 16 registers.
template <class Ops, int SIZE>
__attribute__((target("avx512f"), always_inline)) inline void register_flip(__m512i* r) {
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if ((i & (SIZE - 1)) < SIZE / 2) order_pair<Ops>(r[i], r[(i & ~(SIZE - 1)) + SIZE - 1 - (i & (SIZE - 1))]);
}

template <class Key>
__attribute__((target("avx512f"))) void sort_columns_avx512(Key* keys, int n_pow2) {
  using Ops = Avx512Keys<Key>;
  constexpr int W = kSortWidth, V = Ops::V;
  for (int v = 0; v < W; v += V) {  // column groups are independent: finish one before the next
    Key* col = keys + v;
    auto row = [&](int i) { return col + size_t(i) * W; };
    if (n_pow2 < 16) {  // at most 8 rows: every step through L1
      for (int size = 2; size <= n_pow2; size <<= 1) {
        for (int base = 0; base < n_pow2; base += size)
          for (int j = 0; j < size / 2; ++j) order_rows<Ops>(row(base + j), row(base + size - 1 - j));
        for (int step = size / 4; step >= 1; step >>= 1)
          for (int i = 0; i < n_pow2; ++i)
            if ((i & step) == 0) order_rows<Ops>(row(i), row(i + step));
      }
      continue;
    }
    __m512i r[16];
    for (int g0 = 0; g0 < n_pow2; g0 += 16) {  // runs of 2 .. 16 rows entirely in registers
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(row(g0 + i));
      register_flip<Ops, 2>(r);
      register_flip<Ops, 4>(r), register_half_cleaner<Ops, 1>(r);
      register_flip<Ops, 8>(r), register_half_cleaner<Ops, 2>(r), register_half_cleaner<Ops, 1>(r);
      register_flip<Ops, 16>(r), register_half_cleaner<Ops, 4>(r), register_half_cleaner<Ops, 2>(r);
      register_half_cleaner<Ops, 1>(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(row(g0 + i), r[i]);
    }
    for (int size = 32; size <= n_pow2; size <<= 1) {
      for (int base = 0; base < n_pow2; base += size)
        for (int j = 0; j < size / 2; ++j) order_rows<Ops>(row(base + j), row(base + size - 1 - j));
      for (int step = size / 4; step >= 16; step >>= 1)
        for (int i = 0; i < n_pow2; ++i)
          if ((i & step) == 0) order_rows<Ops>(row(i), row(i + step));
      for (int g0 = 0; g0 < n_pow2; g0 += 16) {
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(row(g0 + i));
        register_half_cleaner<Ops, 8>(r), register_half_cleaner<Ops, 4>(r), register_half_cleaner<Ops, 2>(r);
        register_half_cleaner<Ops, 1>(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(row(g0 + i), r[i]);
      }
    }
  }
}

// ---- the AVX2 column sort (CPUs without AVX-512) -------------------------------------------------------------
// The same one-direction network on 256-bit registers: 8 uint32 or 4 uint64 columns per register, groups of 8
// rows in registers (AVX2 has 16 of them). AVX2 has unsigned 32-bit min/max but no 64-bit min/max at all: the
// uint64 comparator is a signed compare of the sign-flipped keys and two blends.
template <class Key>
struct Avx2Keys;
template <>
struct Avx2Keys<uint64_t> {
  static constexpr int V = 4;
  static void order(__m256i& a, __m256i& b) {
    const __m256i sign = _mm256_set1_epi64x(INT64_MIN);
    const __m256i a_gt_b = _mm256_cmpgt_epi64(_mm256_xor_si256(a, sign), _mm256_xor_si256(b, sign));
    const __m256i lo = _mm256_blendv_epi8(a, b, a_gt_b);
    b = _mm256_blendv_epi8(b, a, a_gt_b);
    a = lo;
  }
};
template <>
struct Avx2Keys<uint32_t> {
  static constexpr int V = 8;
  static void order(__m256i& a, __m256i& b) {
    const __m256i lo = _mm256_min_epu32(a, b);
    b = _mm256_max_epu32(a, b);
    a = lo;
  }
};

template <class Ops>
inline void order_rows_avx2(void* a, void* b) {
  __m256i x = _mm256_loadu_si256(static_cast<const __m256i*>(a)), y = _mm256_loadu_si256(static_cast<const __m256i*>(b));
  Ops::order(x, y);
  _mm256_storeu_si256(static_cast<__m256i*>(a), x);
  _mm256_storeu_si256(static_cast<__m256i*>(b), y);
}

template <class Ops, int STEP>
inline void register_half_cleaner_avx2(__m256i* r) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    if ((i & STEP) == 0) Ops::order(r[i], r[i + STEP]);
}

template <class Ops, int SIZE>
inline void register_flip_avx2(__m256i* r) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    if ((i & (SIZE - 1)) < SIZE / 2) Ops::order(r[i], r[(i & ~(SIZE - 1)) + SIZE - 1 - (i & (SIZE - 1))]);
}

template <class Key>
void sort_columns_avx2(Key* keys, int n_pow2) {
  using Ops = Avx2Keys<Key>;
  constexpr int W = kSortWidth, V = Ops::V;
  for (int v = 0; v < W; v += V) {
    Key* col = keys + v;
    auto row = [&](int i) { return col + size_t(i) * W; };
    if (n_pow2 < 8) {
      for (int size = 2; size <= n_pow2; size <<= 1) {
        for (int base = 0; base < n_pow2; base += size)
          for (int j = 0; j < size / 2; ++j) order_rows_avx2<Ops>(row(base + j), row(base + size - 1 - j));
        for (int step = size / 4; step >= 1; step >>= 1)
          for (int i = 0; i < n_pow2; ++i)
            if ((i & step) == 0) order_rows_avx2<Ops>(row(i), row(i + step));
      }
      continue;
    }
    __m256i r[8];
    auto load = [&](int g0) {
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row(g0 + i)));
    };
    auto store = [&](int g0) {
      for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(row(g0 + i)), r[i]);
    };
    for (int g0 = 0; g0 < n_pow2; g0 += 8) {  // runs of 2 .. 8 rows in registers
      load(g0);
      register_flip_avx2<Ops, 2>(r);
      register_flip_avx2<Ops, 4>(r), register_half_cleaner_avx2<Ops, 1>(r);
      register_flip_avx2<Ops, 8>(r), register_half_cleaner_avx2<Ops, 2>(r), register_half_cleaner_avx2<Ops, 1>(r);
      store(g0);
    }
    for (int size = 16; size <= n_pow2; size <<= 1) {
      for (int base = 0; base < n_pow2; base += size)
        for (int j = 0; j < size / 2; ++j) order_rows_avx2<Ops>(row(base + j), row(base + size - 1 - j));
      for (int step = size / 4; step >= 8; step >>= 1)
        for (int i = 0; i < n_pow2; ++i)
          if ((i & step) == 0) order_rows_avx2<Ops>(row(i), row(i + step));
      for (int g0 = 0; g0 < n_pow2; g0 += 8) {
        load(g0);
        register_half_cleaner_avx2<Ops, 4>(r), register_half_cleaner_avx2<Ops, 2>(r);
        register_half_cleaner_avx2<Ops, 1>(r);
        store(g0);
      }
    }
  }
}

template <class Key>
void sort_key_block_scalar(Key* keys, int n_pow2) {
  for (int c = 0; c < kSortWidth; ++c) bitonic_sort(keys + c, n_pow2, kSortWidth);
}
bool use_avx512();
bool use_avx2();

// Sorts the columns of a key block with the widest vector network the CPU has (OMNIRET_ASWP_NO_AVX512=1 and
// OMNIRET_ASWP_NO_AVX2=1 step down, for tests); every path gives the same bits.
template <class Key>
void sort_key_block(Key* keys, int n_pow2) {
  if (use_avx512())
    sort_columns_avx512(keys, n_pow2);
  else if (use_avx2())
    sort_columns_avx2(keys, n_pow2);
  else
    sort_key_block_scalar(keys, n_pow2);
}

void sort_key_block(KeyF64* keys, int n_pow2) {
  for (int c = 0; c < kSortWidth; ++c) bitonic_sort(keys + c, n_pow2, kSortWidth);
}

template <class scalar_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint64_t;
  static uint64_t make(float v, int index) { return pack_key(v, uint32_t(index)); }
  static uint64_t pad() { return kPadKey; }
  static float value(uint64_t k) { return key_value(k); }
  static int index(uint64_t k) { return int(key_index(k)); }
};
template <>
struct KeyOf<double> {
  using type = KeyF64;
  static KeyF64 make(double v, int index) { return KeyF64{v, index}; }
  static KeyF64 pad() { return KeyF64{0.0, -1}; }
  static double value(const KeyF64& k) { return k.value; }
  static int index(const KeyF64& k) { return k.index; }
};

// ---- one block: the 32 columns [l, l + width) of one sample ------------------------------------------------
// Packs row i of the projection tile (times 1 / ||d||) with its token index into keys (masked and filler rows
// get the pad key), sorts the columns, and unpacks: sorted values to s_dst (row stride L, kept for backward) and
// to blk (row stride 32, for the coupling), the token at each sorted position to t_dst. Rows from n_valid on are
// left as they are: the saved tensors start zeroed (fresh_zero_tensor) and a masked row is never touched.
// s_dst and t_dst are both null when nothing is saved for backward (only blk is written then).
template <class scalar_t, class index_t>
void pack_sort_unpack(const scalar_t* src, int64_t src_stride, const scalar_t* scale, const uint8_t* valid, int n,
                      int n_valid, int n_pow2, int width, typename KeyOf<scalar_t>::type* keys, scalar_t* s_dst,
                      index_t* t_dst, int64_t L, scalar_t* blk) {
  using K = KeyOf<scalar_t>;
  constexpr int W = kSortWidth;
  int k = 0;  // the valid tokens go to the first n_valid rows (n_pow2 >= n_valid: only those are sorted)
  for (int i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    auto* row = keys + size_t(k++) * W;
    int c = 0;
    for (; c < width; ++c) row[c] = K::make(src[i * src_stride + c] * scale[c], i);
    for (; c < W; ++c) row[c] = K::pad();
  }
  for (; k < n_pow2; ++k) std::fill_n(keys + size_t(k) * W, W, K::pad());
  sort_key_block(keys, n_pow2);
  for (int i = 0; i < n_valid; ++i) {
    const auto* row = keys + size_t(i) * W;
    for (int c = 0; c < width; ++c) blk[size_t(i) * W + c] = K::value(row[c]);
    if (s_dst == nullptr) continue;
    for (int c = 0; c < width; ++c) s_dst[i * L + c] = blk[size_t(i) * W + c];
    for (int c = 0; c < width; ++c) t_dst[i * L + c] = index_t(K::index(row[c]));
  }
}

// The same for a full block of float32 with AVX-512 (F): 16 projections packed per instruction group, the
// network of sort_columns_avx512, and unpacking by narrowing moves (vpmovqd / vpmovqb) instead of per-key
// scalar code. Bit for bit the generic path's result (tests run both: OMNIRET_ASWP_NO_AVX512=1 forces the other).
// kSave = false: nothing is saved for backward (s_dst / t_dst unused), only blk is written.
template <class index_t, bool kSave>
__attribute__((target("avx512f"))) void pack_sort_unpack_avx512(const float* src, int64_t src_stride,
                                                                const float* scale, const uint8_t* valid, int n,
                                                                int n_valid, int n_pow2, uint64_t* keys,
                                                                float* s_dst, index_t* t_dst, int64_t L,
                                                                float* blk) {
  constexpr int W = kSortWidth;
  const __m512 scale0 = _mm512_loadu_ps(scale), scale1 = _mm512_loadu_ps(scale + 16), zero = _mm512_setzero_ps();
  const __m512 qnan = _mm512_set1_ps(bits_float(kCanonicalNaN));
  const __m512i sign = _mm512_set1_epi32(int(0x80000000u)), pad = _mm512_set1_epi64(-1);
  int k = 0;  // valid tokens first, as in pack_sort_unpack
  for (int i = 0; i < n; ++i) {
    uint64_t* row = keys + size_t(k) * W;
    if (valid[i]) {
      ++k;
      const __m512i index = _mm512_set1_epi64(i);
      for (int h = 0; h < 2; ++h) {
        // float_to_ordered: +0.0 folds -0 into +0; negative values flip every bit, the others the sign bit
        __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(src + i * src_stride + 16 * h),
                                               h == 0 ? scale0 : scale1), zero);
        v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);  // every NaN sorts last
        const __m512i b = _mm512_castps_si512(v);
        const __m512i ordered = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), sign));
        const __m512i lo = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(ordered));
        const __m512i hi = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(ordered, 1));
        _mm512_storeu_si512(row + 16 * h, _mm512_or_si512(_mm512_slli_epi64(lo, 32), index));
        _mm512_storeu_si512(row + 16 * h + 8, _mm512_or_si512(_mm512_slli_epi64(hi, 32), index));
      }
    }
  }
  for (; k < n_pow2; ++k)
    for (int q = 0; q < 4; ++q) _mm512_storeu_si512(keys + size_t(k) * W + 8 * q, pad);
  sort_columns_avx512(keys, n_pow2);
  const __m256i sign8 = _mm256_set1_epi32(int(0x80000000u)), ones8 = _mm256_set1_epi32(-1);
  // The saved values are read again only in backward: streamed (non-temporal) stores skip reading their lines
  // first (~5 ms of the paper-shape forward, single thread). The tokens are a quarter line per row: plain stores.
  const bool stream = kSave && reinterpret_cast<uintptr_t>(s_dst) % 32 == 0 && L % 8 == 0;
  for (int i = 0; i < n_valid; ++i) {
    const uint64_t* row = keys + size_t(i) * W;
    for (int q = 0; q < 4; ++q) {
      const __m512i k = _mm512_loadu_si512(row + 8 * q);
      // ordered_to_float: flip the sign bit of keys with it set, every bit of the others
      const __m256i ordered = _mm512_cvtepi64_epi32(_mm512_srli_epi64(k, 32));
      const __m256i flip = _mm256_or_si256(_mm256_xor_si256(_mm256_srai_epi32(ordered, 31), ones8), sign8);
      const __m256 value = _mm256_castsi256_ps(_mm256_xor_si256(ordered, flip));
      _mm256_storeu_ps(blk + size_t(i) * W + 8 * q, value);
      if constexpr (!kSave) continue;
      if (stream)
        _mm256_stream_ps(s_dst + i * L + 8 * q, value);
      else
        _mm256_storeu_ps(s_dst + i * L + 8 * q, value);
      if constexpr (sizeof(index_t) == 1)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(t_dst + i * L + 8 * q), _mm512_cvtepi64_epi8(k));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t_dst + i * L + 8 * q), _mm512_cvtepi64_epi32(k));
    }
  }
  if (stream) _mm_sfence();  // the streamed stores are ordered before anything this thread does next
}

bool use_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && std::getenv("OMNIRET_ASWP_NO_AVX512") == nullptr;
  return yes;
}
bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && std::getenv("OMNIRET_ASWP_NO_AVX2") == nullptr;
  return yes;
}

// The AVX-512 block when it applies (float32, a full block of 32 columns, the CPU has it); false otherwise.
template <class index_t>
bool pack_sort_unpack_fast(const float* src, int64_t src_stride, const float* scale, const uint8_t* valid, int n,
                           int n_valid, int n_pow2, int width, uint64_t* keys, float* s_dst, index_t* t_dst,
                           int64_t L, float* blk) {
  if (width != kSortWidth || !use_avx512()) return false;
  if (s_dst != nullptr)
    pack_sort_unpack_avx512<index_t, true>(src, src_stride, scale, valid, n, n_valid, n_pow2, keys, s_dst, t_dst, L,
                                           blk);
  else
    pack_sort_unpack_avx512<index_t, false>(src, src_stride, scale, valid, n, n_valid, n_pow2, keys, nullptr,
                                            nullptr, L, blk);
  return true;
}
template <class index_t>
bool pack_sort_unpack_fast(const double*, int64_t, const double*, const uint8_t*, int, int, int, int, KeyF64*,
                           double*, index_t*, int64_t, double*) {
  return false;
}

// ---- value-only block (nothing saved for backward) --------------------------------------------------------------
// The forward alone needs each column's sorted values, not which token sits where: the keys are the uint32
// order-preserving bits of the values (half the width of the (value, index) keys: 16 columns per comparator, half
// the sort's work and L1 footprint), sorted, then decoded into blk. Same bits as the keyed block's values.
template <class scalar_t>
void pack_sort_values(const scalar_t* src, int64_t src_stride, const scalar_t* scale, const uint8_t* valid, int n,
                      int n_valid, int n_pow2, int width, uint32_t* keys, scalar_t* blk) {
  static_assert(std::is_same_v<scalar_t, float>, "value-only keys are float32 keys");
  constexpr int W = kSortWidth;
  int k = 0;  // valid tokens first, as in pack_sort_unpack
  for (int i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    uint32_t* row = keys + size_t(k++) * W;
    int c = 0;
    for (; c < width; ++c) row[c] = float_to_ordered(src[i * src_stride + c] * scale[c]);
    for (; c < W; ++c) row[c] = kPadValueKey;
  }
  for (; k < n_pow2; ++k) std::fill_n(keys + size_t(k) * W, W, kPadValueKey);
  sort_key_block(keys, n_pow2);
  for (int i = 0; i < n_valid; ++i)
    for (int c = 0; c < width; ++c) blk[size_t(i) * W + c] = ordered_to_float(keys[size_t(i) * W + c]);
}

// The same for a full block with AVX-512; decodes in place (the sorted block is `keys` read as float afterwards).
__attribute__((target("avx512f"))) void pack_sort_values_avx512(const float* src, int64_t src_stride,
                                                                const float* scale, const uint8_t* valid, int n,
                                                                int n_valid, int n_pow2, uint32_t* keys) {
  constexpr int W = kSortWidth;
  const __m512 scale0 = _mm512_loadu_ps(scale), scale1 = _mm512_loadu_ps(scale + 16), zero = _mm512_setzero_ps();
  const __m512 qnan = _mm512_set1_ps(bits_float(kCanonicalNaN));
  const __m512i sign = _mm512_set1_epi32(int(0x80000000u)), pad = _mm512_set1_epi32(-1);
  int k = 0;  // valid tokens first, as in pack_sort_unpack
  for (int i = 0; i < n; ++i) {
    if (!valid[i]) continue;
    uint32_t* row = keys + size_t(k++) * W;
    for (int h = 0; h < 2; ++h) {  // float_to_ordered, as in pack_sort_unpack_avx512
      __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(src + i * src_stride + 16 * h),
                                             h == 0 ? scale0 : scale1), zero);
      v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);  // every NaN sorts last
      const __m512i b = _mm512_castps_si512(v);
      _mm512_storeu_si512(row + 16 * h, _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), sign)));
    }
  }
  for (; k < n_pow2; ++k) {
    _mm512_storeu_si512(keys + size_t(k) * W, pad);
    _mm512_storeu_si512(keys + size_t(k) * W + 16, pad);
  }
  sort_columns_avx512(keys, n_pow2);
  const __m512i ones = _mm512_set1_epi32(-1);
  for (int i = 0; i < n_valid; ++i)
    for (int h = 0; h < 2; ++h) {  // ordered_to_float
      uint32_t* p = keys + size_t(i) * W + 16 * h;
      const __m512i k = _mm512_loadu_si512(p);
      _mm512_storeu_si512(p, _mm512_xor_si512(k, _mm512_or_si512(_mm512_xor_si512(_mm512_srai_epi32(k, 31), ones),
                                                                 sign)));
    }
}

// The sorted values of one block (row stride kSortWidth): `keys` itself on the AVX-512 path, else `blk`.
inline const float* sort_values_block(const float* src, int64_t src_stride, const float* scale, const uint8_t* valid,
                                      int n, int n_valid, int n_pow2, int width, uint32_t* keys, float* blk) {
  if (width == kSortWidth && use_avx512()) {
    pack_sort_values_avx512(src, src_stride, scale, valid, n, n_valid, n_pow2, keys);
    return reinterpret_cast<const float*>(keys);
  }
  pack_sort_values(src, src_stride, scale, valid, n, n_valid, n_pow2, width, keys, blk);
  return blk;
}

// A zero-filled tensor whose pages stay untouched until written: fresh anonymous memory reads as zero and is not
// resident until first written, so the rows of masked tokens (never written) cost no memory: the saved
// (B, N, L) tensors of a ragged batch take memory by the true lengths. `huge` asks for transparent huge pages
// (a dense batch writes every row; 512x fewer page faults), with the mapping aligned to 2 MiB so that all of it
// can be. Small tensors come from the allocator, zeroed.
at::Tensor fresh_zero_tensor(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
#if defined(__linux__) && defined(MAP_ANONYMOUS)
  if (bytes >= (size_t(1) << 20)) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t mapped = huge ? bytes + kHuge : bytes;
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      void* data = p;
#if defined(MADV_HUGEPAGE)
      if (huge) {
        data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1));
        madvise(data, bytes, MADV_HUGEPAGE);
      }
#endif
      return at::from_blob(data, sizes, [p, mapped](void*) { munmap(p, mapped); }, options);
    }
  }
#endif
  (void)huge;
  return at::zeros(sizes, options);
}

// Value-only keys (see pack_sort_values) in the KeyOf interface.
struct ValueKeyOf {
  using type = uint32_t;
  static uint32_t make(float v, int) { return float_to_ordered(v); }
  static uint32_t pad() { return kPadValueKey; }
  static float value(uint32_t k) { return ordered_to_float(k); }
  static int index(uint32_t) { return -1; }
};

// One panel of the references: up to kReferencePanel blocks of 32 columns, packed row by row (each row of the
// panel is one contiguous run), sorted block by block, unpacked row by row. Block by block, the 128 rows of a
// block are 128 separate pages and miss streams: that cost ~2.5x the sort itself.
constexpr int kReferencePanel = 8;
template <class K, class scalar_t>
void sort_reference_panel(const scalar_t* src, int64_t M, int m_pow2, int64_t L, int64_t width,
                          typename K::type* keys, scalar_t* dst, int* ord) {
  constexpr int W = kSortWidth;
  using Key = typename K::type;
  const int n_blocks = int((width + W - 1) / W);
  auto row_of = [&](int k, int64_t i) { return keys + (size_t(k) * m_pow2 + size_t(i)) * W; };
  for (int64_t i = 0; i < m_pow2; ++i)
    for (int k = 0; k < n_blocks; ++k) {
      Key* row = row_of(k, i);
      const int w = int(std::min<int64_t>(W, width - k * W));
      if (i < M && w == W) {
        for (int c = 0; c < W; ++c) row[c] = K::make(src[i * L + k * W + c], int(i));
      } else {
        int c = 0;
        if (i < M)
          for (; c < w; ++c) row[c] = K::make(src[i * L + k * W + c], int(i));
        for (; c < W; ++c) row[c] = K::pad();
      }
    }
  for (int k = 0; k < n_blocks; ++k) sort_key_block(row_of(k, 0), m_pow2);
  for (int64_t r = 0; r < M; ++r)
    for (int k = 0; k < n_blocks; ++k) {
      const Key* row = row_of(k, r);
      const int w = int(std::min<int64_t>(W, width - k * W));
      for (int c = 0; c < w; ++c) dst[r * L + k * W + c] = K::value(row[c]);
      if (ord != nullptr)
        for (int c = 0; c < w; ++c) ord[r * L + k * W + c] = K::index(row[c]);
    }
}

// Stable sort of every column of references (M, L) with the key network: the values in rank order and, when
// need_order, the index j of each rank. (at::sort along dim 0 of a row-major matrix costs more than the kernel
// around it.) Without need_order (a forward that saves nothing, without weights) float32 sorts value-only keys.
template <class scalar_t>
void sort_references(const at::Tensor& references, bool need_order, at::Tensor& ref_sorted, at::Tensor& order) {
  constexpr int W = kSortWidth;
  const int64_t M = references.size(0), L = references.size(1);
  const int m_pow2 = int(next_pow2(M));  // M <= 2^30 (aswp_pool_checks.h)
  // Fresh huge pages (fully written): from the allocator, these came back as fresh small pages on every call.
  ref_sorted = fresh_zero_tensor({M, L}, references.options(), /*huge=*/true);
  if (need_order) order = fresh_zero_tensor({M, L}, references.options().dtype(at::kInt), /*huge=*/true);
  const scalar_t* src = references.data_ptr<scalar_t>();
  scalar_t* dst = ref_sorted.data_ptr<scalar_t>();
  int* ord = need_order ? order.data_ptr<int>() : nullptr;
  constexpr int64_t panel = kReferencePanel * W;
  const bool values_only = !need_order && std::is_same_v<scalar_t, float>;
  at::parallel_for(0, (L + panel - 1) / panel, 1, [&](int64_t begin, int64_t end) {
    using Key = typename KeyOf<scalar_t>::type;
    const size_t n_keys = size_t(kReferencePanel) * m_pow2 * W;
    std::vector<Key> keys(values_only ? 0 : n_keys);
    std::vector<uint32_t> value_keys(values_only ? n_keys : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t l0 = p * panel, width = std::min(panel, L - l0);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (values_only) {
          sort_reference_panel<ValueKeyOf>(src + l0, M, m_pow2, L, width, value_keys.data(), dst + l0, nullptr);
          continue;
        }
      }
      sort_reference_panel<KeyOf<scalar_t>>(src + l0, M, m_pow2, L, width, keys.data(), dst + l0,
                                            ord ? ord + l0 : nullptr);
    }
  });
}

// Between column-wise rank order and reference order with the int32 rank table (an int64 copy for
// at::gather/scatter would be the largest temporary of the backward after the gradients):
// to_rank_order: out[r, l] = src[order[r, l], l]; otherwise the inverse, out[order[r, l], l] = src[r, l].
template <class scalar_t>
at::Tensor permute_ranks(const at::Tensor& src, const at::Tensor& order, bool to_rank_order) {
  at::Tensor out = at::empty_like(src);
  const int64_t M = src.size(0), L = src.size(1);
  const scalar_t* s = src.data_ptr<scalar_t>();
  const int* o = order.data_ptr<int>();
  scalar_t* d = out.data_ptr<scalar_t>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t l = 0; l < L; ++l) {
      const int64_t ranked = r * L + l, original = int64_t(o[ranked]) * L + l;
      if (to_rank_order)
        d[ranked] = s[original];
      else
        d[original] = s[ranked];
    }
  return out;
}

// What both directions need: x and the directions in the compute type, 1 / ||d|| per slice, the references sorted per column with the
// index j of each rank (so the kernels walk references in rank order), and each sample's quantile table.
template <class scalar_t>
struct Prepared {
  int64_t B, N, D, L, M;
  at::Tensor x2d;          // (B * N, D) compute type (when asked for)
  at::Tensor dir;           // (L, D) directions, not normalised
  std::vector<scalar_t> scale;  // (L): 1 / ||d_l|| when normalising, else 1
  at::Tensor ref_sorted;   // (M, L): ref_sorted[r, l] = references[order[r, l], l]
  at::Tensor order32;      // (M, L) int32: j of rank r in column l (stable); undefined if not asked for
  at::Tensor weight_sorted;  // (M, L) or undefined
  std::vector<uint8_t> valid;  // (B, N)
  std::vector<int> n_valid;    // (B)
  std::vector<int> q_lo, q_hi;  // (B, M): quantile table of sample b, indexed by rank
  std::vector<scalar_t> q_w;
};

template <class scalar_t>
Prepared<scalar_t> prepare(const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
                           const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights,
                           bool normalize_directions, bool need_x, bool need_order) {
  Prepared<scalar_t> P;
  const auto dt = c10::CppTypeToScalarType<scalar_t>::value;
  P.B = x.size(0), P.N = x.size(1), P.D = x.size(2), P.L = directions.size(0), P.M = references.size(0);
  // Detached: at::parallel_for's worker threads do not inherit the caller's below-autograd guard, and at::mm_out
  // on a tensor that requires grad refuses to run there.
  if (need_x) P.x2d = x.detach().to(dt).contiguous().view({P.B * P.N, P.D});
  at::Tensor d = directions.detach().to(dt).contiguous();
  P.dir = d;
  P.scale.assign(P.L, scalar_t(1));
  if (normalize_directions) {
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const int64_t D = P.D;
    at::parallel_for(0, P.L, 64, [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) P.scale[l] = scalar_t(1.0 / std::sqrt(squared_norm(dp + l * D, D)));
    });
  }
  sort_references<scalar_t>(references.to(dt).contiguous(), need_order || weights.has_value(), P.ref_sorted,
                            P.order32);
  if (weights.has_value()) P.weight_sorted = permute_ranks<scalar_t>(weights->to(dt).contiguous(), P.order32, true);
  const int64_t M = P.M, B = P.B, N = P.N;
  P.valid.assign(B * N, 1);
  P.n_valid.assign(B, int(N));
  if (mask.has_value()) {
    at::Tensor mk = mask->to(at::kBool).contiguous();
    const bool* mp = mk.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      int count = 0;
      for (int64_t n = 0; n < N; ++n) {
        P.valid[b * N + n] = mp[b * N + n] ? 1 : 0;
        count += mp[b * N + n] ? 1 : 0;
      }
      TORCH_CHECK_VALUE(count > 0, "mask: sample ", b, " has no valid token");
      P.n_valid[b] = count;
    }
  }
  P.q_lo.resize(B * M), P.q_hi.resize(B * M), P.q_w.resize(B * M);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < M; ++r) {
      double w;
      quantile_position(int(r), P.n_valid[b], int(M), P.q_lo[b * M + r], P.q_hi[b * M + r], w);
      P.q_w[b * M + r] = scalar_t(w);
    }
  return P;
}


// Couple one block's sorted values (row stride kSortWidth) to the references and pool, walking the references in
// rank order (one row of columns per rank). POOLING and WIDTH (0 = runtime `width`) are compile-time constants on
// the hot path so the header's row functions fold into one vector loop over registers.
template <class scalar_t, int POOLING, int WIDTH>
inline void couple_and_pool(const scalar_t* blk, const int* lo, const int* hi, const scalar_t* qw,
                            const scalar_t* ref, const scalar_t* weight, int64_t M, scalar_t* acc, int width) {
  constexpr int W = kSortWidth;
  if constexpr (WIDTH != 0) width = WIDTH;
  scalar_t psi[W];
  for (int c = 0; c < width; ++c) acc[c] = pool_initial<scalar_t>(POOLING);
  for (int64_t r = 0; r < M; ++r) {
    couple_row(blk + size_t(lo[r]) * W, blk + size_t(hi[r]) * W, qw[r], ref + r * W, psi, width);
    pool_accumulate_row(POOLING, psi, POOLING == kWeighted ? weight + r * W : nullptr, acc, width);
  }
  pool_finish_row(POOLING, int(M), acc, width);
}

template <class scalar_t, int POOLING>
inline void couple_and_pool(const scalar_t* blk, const int* lo, const int* hi, const scalar_t* qw,
                            const scalar_t* ref, const scalar_t* weight, int64_t M, scalar_t* acc, int width) {
  if (width == kSortWidth)
    couple_and_pool<scalar_t, POOLING, kSortWidth>(blk, lo, hi, qw, ref, weight, M, acc, width);
  else
    couple_and_pool<scalar_t, POOLING, 0>(blk, lo, hi, qw, ref, weight, M, acc, width);
}

template <class scalar_t>
void couple_and_pool(int pooling, const scalar_t* blk, const int* lo, const int* hi, const scalar_t* qw,
                     const scalar_t* ref, const scalar_t* weight, int64_t M, scalar_t* acc, int width) {
  switch (pooling) {
    case kStm: return couple_and_pool<scalar_t, kStm>(blk, lo, hi, qw, ref, weight, M, acc, width);
    case kMax: return couple_and_pool<scalar_t, kMax>(blk, lo, hi, qw, ref, weight, M, acc, width);
    case kMean: return couple_and_pool<scalar_t, kMean>(blk, lo, hi, qw, ref, weight, M, acc, width);
    default: return couple_and_pool<scalar_t, kWeighted>(blk, lo, hi, qw, ref, weight, M, acc, width);
  }
}

// With save = false the saved tensors are not written and, for float32, the sort is value-only
// (sort_values_block).
template <class scalar_t, class index_t>
void forward_kernel(const Prepared<scalar_t>& P, int pooling, at::Tensor& out, at::Tensor& sorted,
                    at::Tensor& sorted_tokens, bool save) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::type;
  constexpr int W = kSortWidth;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t B = P.B, N = P.N, L = P.L, M = P.M;
  const int n_pow2 = int(next_pow2(N));  // N <= 2^30 (aswp_pool_checks.h)
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(B, kGemmRows / N));
  const int64_t tile = std::min<int64_t>(kSliceTile, L);
  const int64_t n_groups = (B + group - 1) / group, n_tiles = (L + tile - 1) / tile;
  const bool values_only = kFloat && !save;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* sorted_p = save ? sorted.data_ptr<scalar_t>() : nullptr;
  index_t* tokens_p = save ? sorted_tokens.data_ptr<index_t>() : nullptr;
  const scalar_t* ref_s = P.ref_sorted.template data_ptr<scalar_t>();
  const scalar_t* w_s = P.weight_sorted.defined() ? P.weight_sorted.template data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, n_groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    // Fresh huge pages: from the allocator this 4 MiB buffer came back as fresh small pages on every call (~1000
    // page faults per thread and forward).
    at::Tensor proj = fresh_zero_tensor({group * N, tile}, P.x2d.options(), /*huge=*/true);
    std::vector<Key> keys(values_only ? 0 : size_t(n_pow2) * W);
    std::vector<uint32_t> value_keys(values_only ? size_t(n_pow2) * W : 0);
    // The references (and weights) of one column block, compact: in (M, L) their rows are L apart, which for
    // L = 4096 puts all of them in the same L1 sets (they were re-read from L2 for every sample).
    std::vector<scalar_t> block(size_t(N) * W), ref_block(size_t(M) * W), weight_block(w_s ? size_t(M) * W : 0);
    scalar_t acc[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / n_tiles, l0 = (item % n_tiles) * tile;
      const int64_t b0 = g * group, nb = std::min(group, B - b0), width_tile = std::min(tile, L - l0);
      at::Tensor proj_view = proj.narrow(0, 0, nb * N).narrow(1, 0, width_tile);
      at::mm_out(proj_view, P.x2d.narrow(0, b0 * N, nb * N), P.dir.narrow(0, l0, width_tile).t());
      const scalar_t* pj = proj.data_ptr<scalar_t>();
      for (int64_t c0 = 0; c0 < width_tile; c0 += W) {
        const int width = int(std::min<int64_t>(W, width_tile - c0));
        const int64_t l = l0 + c0;
        for (int64_t r = 0; r < M; ++r) {
          std::copy_n(ref_s + r * L + l, width, ref_block.data() + r * W);
          if (w_s) std::copy_n(w_s + r * L + l, width, weight_block.data() + r * W);
        }
        for (int64_t bl = 0; bl < nb; ++bl) {
          const int64_t b = b0 + bl;
          const int n_b = P.n_valid[b];
          // Only the valid tokens are sorted (packed first): a ragged sample of 40 tokens sorts 64 rows, not 128.
          const int rows_b = int(next_pow2(n_b));
          const uint8_t* valid = P.valid.data() + b * N;
          const scalar_t* src = pj + bl * N * tile + c0;
          // The next block's projection rows (next sample, or the next columns of the first): 4 KiB apart,
          // which the hardware prefetchers do not follow; the tile is larger than L2.
          const scalar_t* next = bl + 1 < nb ? src + N * tile : c0 + W < width_tile ? pj + c0 + W : nullptr;
          if (next != nullptr)
            for (int64_t i = 0; i < N; ++i)
              for (size_t byte = 0; byte < W * sizeof(scalar_t); byte += 64)
                _mm_prefetch(reinterpret_cast<const char*>(next + i * tile) + byte, _MM_HINT_T1);
          const scalar_t* sorted_block = block.data();
          if constexpr (kFloat) {
            if (values_only)
              sorted_block = sort_values_block(src, tile, P.scale.data() + l, valid, int(N), n_b, rows_b, width,
                                               value_keys.data(), block.data());
          }
          if (!values_only) {
            scalar_t* s_dst = save ? sorted_p + b * N * L + l : nullptr;
            index_t* t_dst = save ? tokens_p + b * N * L + l : nullptr;
            if (!pack_sort_unpack_fast(src, tile, P.scale.data() + l, valid, int(N), n_b, rows_b, width,
                                       keys.data(), s_dst, t_dst, L, block.data()))
              pack_sort_unpack<scalar_t, index_t>(src, tile, P.scale.data() + l, valid, int(N), n_b, rows_b, width,
                                                  keys.data(), s_dst, t_dst, L, block.data());
          }
          couple_and_pool(pooling, sorted_block, P.q_lo.data() + b * M, P.q_hi.data() + b * M,
                          P.q_w.data() + b * M, ref_block.data(), weight_block.data(), M, acc, width);
          std::copy_n(acc, width, out_p + b * L + l);
        }
      }
    }
  });
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> aswp_pool_fwd_cpu(
    const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, c10::string_view pooling,
    bool normalize_directions, double temperature, bool save_for_backward) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are not part of the graph
  const int code = check_aswp_pool_fwd_args(x, directions, references, mask, weights, pooling, temperature);
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0);
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto index_dtype = N <= 256 ? at::kByte : at::kInt;
  at::Tensor out = at::empty({B, L}, x.options().dtype(compute));
  // Rows past a sample's valid tokens stay zero (and, with a mask, never resident: see fresh_zero_tensor).
  // Without save_for_backward (no gradient will be asked for) the saved slots are empty and never written: the
  // 20 MiB of saved tensors at the paper shape were ~8% of the forward.
  const bool dense = !mask.has_value();
  at::Tensor sorted = save_for_backward ? fresh_zero_tensor({B, N, L}, x.options().dtype(compute), dense)
                                        : at::empty({0}, x.options().dtype(compute));
  at::Tensor sorted_tokens = save_for_backward ? fresh_zero_tensor({B, N, L}, x.options().dtype(index_dtype), dense)
                                               : at::empty({0}, x.options().dtype(index_dtype));
  std::optional<at::Tensor> wopt = code == kWeighted ? weights : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(compute, "aswp_pool_fwd_cpu", [&] {
    auto P = prepare<scalar_t>(x, directions, references, mask, wopt, normalize_directions, true, save_for_backward);
    if (index_dtype == at::kByte)
      forward_kernel<scalar_t, uint8_t>(P, code, out, sorted, sorted_tokens, save_for_backward);
    else
      forward_kernel<scalar_t, int32_t>(P, code, out, sorted, sorted_tokens, save_for_backward);
  });
  return {out.to(x.scalar_type()), sorted, sorted_tokens};
}

template <class scalar_t, class index_t>
void backward_kernel(const Prepared<scalar_t>& P, int pooling, scalar_t temperature, const at::Tensor& grad,
                     const at::Tensor& sorted, const at::Tensor& sorted_tokens, int64_t l_begin, int64_t l_end,
                     scalar_t* dq, int64_t ld, at::Tensor& dref, at::Tensor& dweight) {
  constexpr int W = kSortWidth;
  const int64_t B = P.B, N = P.N, L = P.L, M = P.M;
  const scalar_t* g_p = grad.data_ptr<scalar_t>();
  const scalar_t* sorted_p = sorted.data_ptr<scalar_t>();
  const index_t* tokens_p = sorted_tokens.data_ptr<index_t>();
  const scalar_t* ref_s = P.ref_sorted.template data_ptr<scalar_t>();
  const int* order = P.order32.template data_ptr<int>();
  const scalar_t* w_s = P.weight_sorted.defined() ? P.weight_sorted.template data_ptr<scalar_t>() : nullptr;
  // dq holds columns [l_begin, l_end) of dp, row stride ld
  scalar_t* dp_p = dq - l_begin;
  scalar_t* dref_p = dref.data_ptr<scalar_t>();
  scalar_t* dw_p = dweight.defined() ? dweight.data_ptr<scalar_t>() : nullptr;
  const int64_t n_blocks = (l_end - l_begin + W - 1) / W;
  const scalar_t inv_t = scalar_t(1) / temperature;
  const bool needs_argmax = pooling == kStm || pooling == kMax;

  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> block(size_t(N) * W), ds(size_t(N) * W), psi(size_t(M) * W), e(size_t(M) * W),
        scattered(size_t(N) * W);
    // The block's reference and weight gradients in rank order, summed over the batch, then written once into
    // their (M, L) tensors in reference order (no (M, L) rank-order copy to permute afterwards).
    std::vector<scalar_t> dref_block(size_t(M) * W), dw_block(dw_p ? size_t(M) * W : 0);
    scalar_t best[W], z[W], num[W], dpsi[W];
    int best_j[W], best_r[W];
    for (int64_t blk_i = begin; blk_i < end; ++blk_i) {
      const int64_t l = l_begin + blk_i * W;
      const int width = int(std::min<int64_t>(W, l_end - l));
      std::fill(dref_block.begin(), dref_block.end(), scalar_t(0));
      std::fill(dw_block.begin(), dw_block.end(), scalar_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const int n_b = P.n_valid[b];
        const int* lo = P.q_lo.data() + b * M;
        const int* hi = P.q_hi.data() + b * M;
        const scalar_t* qw = P.q_w.data() + b * M;
        const scalar_t* g = g_p + b * L + l;
        for (int i = 0; i < n_b; ++i) {
          const scalar_t* src = sorted_p + (b * N + i) * L + l;
          scalar_t* dst = block.data() + size_t(i) * W;
          for (int c = 0; c < width; ++c) dst[c] = src[c];
        }
        for (int64_t r = 0; r < M; ++r)
          couple_row(block.data() + size_t(lo[r]) * W, block.data() + size_t(hi[r]) * W, qw[r], ref_s + r * L + l,
                     psi.data() + r * W, width);
        if (needs_argmax) {
          for (int c = 0; c < width; ++c) best[c] = -INFINITY, best_j[c] = INT32_MAX, best_r[c] = 0;
          for (int64_t r = 0; r < M; ++r)
            argmax_update(psi.data() + r * W, order + r * L + l, int(r), best, best_j, best_r, width);
        }
        if (pooling == kStm) {
          std::fill_n(z, W, scalar_t(0));
          std::fill_n(num, W, scalar_t(0));
          for (int64_t r = 0; r < M; ++r)
            stm_softmax_row_cpu(psi.data() + r * W, best, inv_t, e.data() + r * W, z, num, width);
          stm_normalize(z, num, width);
        }
        std::fill_n(ds.data(), size_t(n_b) * W, scalar_t(0));
        for (int64_t r = 0; r < M; ++r) {
          const scalar_t* psi_r = psi.data() + r * W;
          pool_grad_row(pooling, int(M), int(r), psi_r, e.data() + r * W, z, num, best_r,
                        w_s ? w_s + r * L + l : nullptr, g, inv_t, dpsi, width);
          scalar_t* dr = dref_block.data() + r * W;
          for (int c = 0; c < width; ++c) dr[c] -= dpsi[c];
          if (dw_p) {
            scalar_t* dw = dw_block.data() + r * W;
            for (int c = 0; c < width; ++c) dw[c] += g[c] * psi_r[c];
          }
          couple_row_backward(dpsi, qw[r], ds.data() + size_t(lo[r]) * W, ds.data() + size_t(hi[r]) * W, width);
        }
        // Through the sort: the token at sorted position i receives ds[i]; masked tokens receive 0. The
        // scatter goes to a token-ordered block in L1 first, then whole rows of it to dp: scattering straight
        // into dp (row stride `ld`) missed cache on nearly every element.
        if (n_b < N) std::fill_n(scattered.data(), size_t(N) * W, scalar_t(0));
        const scalar_t* sc = P.scale.data() + l;  // chain rule through p = (x . d) / ||d||
        for (int i = 0; i < n_b; ++i) {
          const index_t* tok = tokens_p + (b * N + i) * L + l;
          const scalar_t* d = ds.data() + size_t(i) * W;
          for (int c = 0; c < width; ++c) scattered[size_t(tok[c]) * W + c] = d[c] * sc[c];
        }
        for (int64_t n = 0; n < N; ++n)
          std::copy_n(scattered.data() + n * W, width, dp_p + (b * N + n) * ld + l);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int* j = order + r * L + l;
        for (int c = 0; c < width; ++c) dref_p[j[c] * L + l + c] = dref_block[r * W + c];
        if (dw_p)
          for (int c = 0; c < width; ++c) dw_p[j[c] * L + l + c] = dw_block[r * W + c];
      }
    }
  });
}

// With theta = d s (s = 1 / ||d||) and G = dq^T x (dq = dp s, what the kernel wrote), the gradient to d is
// s (dtheta - theta <theta, dtheta>) = G - s^2 d <d, G>: one pass per row, in place on G.
template <class scalar_t>
void normalize_backward(at::Tensor& grad, const at::Tensor& dir, const std::vector<scalar_t>& scale) {
  const int64_t L = grad.size(0), D = grad.size(1);
  scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* d = dir.data_ptr<scalar_t>();
  at::parallel_for(0, L, 16, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      scalar_t* gr = g + l * D;
      const scalar_t* dr = d + l * D;
      const scalar_t dot = dot_product(gr, dr, D);
      const scalar_t f = scale[l] * scale[l] * dot;
      for (int64_t k = 0; k < D; ++k) gr[k] -= f * dr[k];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aswp_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& directions, const at::Tensor& references,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& weights, const at::Tensor& sorted,
    const at::Tensor& sorted_tokens, c10::string_view pooling, bool normalize_directions, double temperature, bool need_x,
    bool need_directions) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int code = check_aswp_pool_bwd_args(grad_out, x, directions, references, mask, weights, sorted, sorted_tokens,
                                            pooling, temperature);
  const int64_t B = x.size(0), N = x.size(1), L = directions.size(0), M = references.size(0);
  check_aswp_pool_sorted_tokens(sorted_tokens, N);  // the scatter through the sort indexes with these
  const auto compute = sorted.scalar_type();
  at::Tensor grad_x, grad_dir;
  at::Tensor grad_ref_c = at::empty({M, L}, sorted.options());  // written by the kernel in reference order
  at::Tensor grad_w_c = code == kWeighted ? at::empty({M, L}, sorted.options()) : at::Tensor();
  at::Tensor grad_ref, grad_w;
  std::optional<at::Tensor> wopt = code == kWeighted ? weights : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(compute, "aswp_pool_bwd_cpu", [&] {
    auto P = prepare<scalar_t>(x, directions, references, mask, wopt, normalize_directions, need_directions, true);
    at::Tensor g = grad_out.to(compute).contiguous();
    at::Tensor s = sorted.contiguous(), pm = sorted_tokens.contiguous();
    // dp (B * N, L) is produced and consumed in chunks of slices: each chunk's d(directions) rows are one GEMM
    // into their place, and dx accumulates chunk by chunk. The chunk holds at most kBackwardChunkElements
    // (2 MiB of float32, an eighth of the paper shape's dp) so that this buffer does not grow with the batch,
    // but at least two column blocks per thread (the kernel parallelises over column blocks).
    const int64_t chunk = backward_chunk(B * N, L);
    at::Tensor dq = at::empty({B * N, chunk}, sorted.options());
    at::Tensor dx = need_x ? at::zeros({B * N, x.size(2)}, sorted.options()) : at::Tensor();
    at::Tensor dtheta = need_directions ? at::empty({L, x.size(2)}, sorted.options()) : at::Tensor();
    for (int64_t c0 = 0; c0 < L; c0 += chunk) {
      const int64_t w = std::min(chunk, L - c0);
      if (pm.scalar_type() == at::kByte)
        backward_kernel<scalar_t, uint8_t>(P, code, scalar_t(temperature), g, s, pm, c0, c0 + w,
                                           dq.data_ptr<scalar_t>(), chunk, grad_ref_c, grad_w_c);
      else
        backward_kernel<scalar_t, int32_t>(P, code, scalar_t(temperature), g, s, pm, c0, c0 + w,
                                           dq.data_ptr<scalar_t>(), chunk, grad_ref_c, grad_w_c);
      at::Tensor dq_view = dq.narrow(1, 0, w);
      if (need_x) dx.addmm_(dq_view, P.dir.narrow(0, c0, w));
      if (need_directions) {
        at::Tensor rows = dtheta.narrow(0, c0, w);
        at::mm_out(rows, dq_view.t(), P.x2d);
      }
    }
    grad_ref = grad_ref_c.to(references.scalar_type());
    if (code == kWeighted) grad_w = grad_w_c.to(weights->scalar_type());
    if (need_x) grad_x = dx.view({B, N, x.size(2)}).to(x.scalar_type());
    if (need_directions) {
      if (normalize_directions) normalize_backward<scalar_t>(dtheta, P.dir, P.scale);
      grad_dir = dtheta.to(directions.scalar_type());
    }
  });
  if (!grad_x.defined()) grad_x = at::empty({0}, x.options());
  if (!grad_dir.defined()) grad_dir = at::empty({0}, directions.options());
  if (!grad_w.defined()) grad_w = at::empty({0}, references.options());
  return {grad_x, grad_dir, grad_ref, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(omniret, CPU, m) {
  m.impl("aswp_pool_fwd", &aswp_pool_fwd_cpu);
  m.impl("aswp_pool_bwd", &aswp_pool_bwd_cpu);
}

}  // namespace omniret
