// Runs the ASWP CUDA kernels of csrc/cuda/aswp_pool.cu on the CPU through csrc/cuda/emulation/cuda_on_cpu.h, so
// tests/test_cuda_compile.py can compare what their thread layout computes with the float64 reference. Not a GPU
// run: no warps, no timing, blocks one at a time.
//
//   aswp_pool_emulated IN OUT
// IN: int32 B N L M pooling rank_u8 has_mask has_weight, float32 inv_temperature, then proj (B N L) f32,
//     valid (B N) u8, n_valid (B) i32, ref_sorted (M L) f32, order (M L) i32, weight_sorted (M L) f32 (if
//     has_weight), grad (B L) f32.
// OUT: out (B L), sorted (B N L), sorted_tokens (B N L, as float32), dp (B N L), dref_partial (B M L),
//      dweight_partial (B M L, if has_weight); all float32.
#include "../aswp_pool.h"  // before the stand-in: cuda_runtime_api.h defines the qualifiers it replaces
#include "cuda_on_cpu.h"

// The kernels' `extern __shared__ unsigned char smem[]` (block scope) names omniret::cuda::(anonymous)::smem.
namespace omniret {
namespace cuda {
namespace {
alignas(16) unsigned char smem[kEmulatedSharedBytes];
}  // namespace
}  // namespace cuda
}  // namespace omniret

#define OMNIRET_CUDA_EMULATION
#include "../aswp_pool.cu"

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

template <class T>
std::vector<T> read_array(FILE* f, size_t count) {
  std::vector<T> v(count);
  if (count && std::fread(v.data(), sizeof(T), count, f) != count) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return v;
}

template <class T>
void write_array(FILE* f, const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), f);
}

template <class index_t>
void run(int B, int N, int L, int M, int pooling, float inv_t, const std::vector<float>& proj,
         const uint8_t* valid, const std::vector<int>& n_valid, const std::vector<float>& ref_sorted,
         const std::vector<int>& order, const float* weight_sorted, const std::vector<float>& grad, FILE* out_file) {
  using namespace omniret::cuda;
  using namespace omniret::cuda::aswp_launch;
  const size_t BNL = size_t(B) * N * L;
  std::vector<float> out(size_t(B) * L, NAN), sorted(BNL, NAN), dp(BNL, NAN), dref(size_t(B) * M * L, NAN);
  std::vector<float> dweight(weight_sorted ? size_t(B) * M * L : 0, NAN);
  std::vector<index_t> tokens(BNL, index_t(0x7f));
  if (forward_shared_bytes(N, M) > kEmulatedSharedBytes || backward_shared_bytes(N, M) > kEmulatedSharedBytes) {
    std::fprintf(stderr, "shape too large for the emulated shared memory\n");
    std::exit(2);
  }
  const int n_pow2 = omniret::aswp::next_pow2(N), fcols = forward_cols(n_pow2);
  emulate_launch({unsigned((L + fcols - 1) / fcols), unsigned(B), 1}, kThreads, omniret::cuda::smem, [&] {
    forward_kernel<index_t>(proj.data(), valid, n_valid.data(), ref_sorted.data(), weight_sorted, N, L, M, pooling,
                            n_pow2, log2_int(fcols), out.data(), sorted.data(), tokens.data());
  });
  const int bcols = backward_cols(N, M);
  emulate_launch({unsigned((L + bcols - 1) / bcols), unsigned(B), 1}, kThreads, omniret::cuda::smem, [&] {
    backward_kernel<index_t>(grad.data(), n_valid.data(), ref_sorted.data(), order.data(), weight_sorted,
                             sorted.data(), tokens.data(), N, L, M, pooling, inv_t, log2_int(bcols), dp.data(),
                             dref.data(), weight_sorted ? dweight.data() : nullptr);
  });
  std::vector<float> tokens_f(tokens.begin(), tokens.end());
  write_array(out_file, out);
  write_array(out_file, sorted);
  write_array(out_file, tokens_f);
  write_array(out_file, dp);
  write_array(out_file, dref);
  write_array(out_file, dweight);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  const auto header = read_array<int>(in, 8);
  const int B = header[0], N = header[1], L = header[2], M = header[3], pooling = header[4];
  const bool rank_u8 = header[5], has_mask = header[6], has_weight = header[7];
  const float inv_t = read_array<float>(in, 1)[0];
  const auto proj = read_array<float>(in, size_t(B) * N * L);
  const auto valid = read_array<uint8_t>(in, size_t(B) * N);
  const auto n_valid = read_array<int>(in, B);
  const auto ref_sorted = read_array<float>(in, size_t(M) * L);
  const auto order = read_array<int>(in, size_t(M) * L);
  const auto weight_sorted = read_array<float>(in, has_weight ? size_t(M) * L : 0);
  const auto grad = read_array<float>(in, size_t(B) * L);
  std::fclose(in);
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  const uint8_t* valid_ptr = has_mask ? valid.data() : nullptr;
  const float* weight_ptr = has_weight ? weight_sorted.data() : nullptr;
  if (rank_u8)
    run<uint8_t>(B, N, L, M, pooling, inv_t, proj, valid_ptr, n_valid, ref_sorted, order, weight_ptr, grad, out);
  else
    run<int32_t>(B, N, L, M, pooling, inv_t, proj, valid_ptr, n_valid, ref_sorted, order, weight_ptr, grad, out);
  std::fclose(out);
  return 0;
}
