// Runs the diversity-loss CUDA kernels of csrc/cuda/diversity_loss.cu on the CPU through
// csrc/cuda/emulation/cuda_on_cpu.h (threads, barriers, warp shuffles), so tests/test_cuda_compile.py can compare
// them with the float64 reference. Not a GPU run: no timing, blocks one at a time.
//
//   diversity_loss_emulated IN OUT
// IN: int32 B N D normalize, float32 p gamma, int64 seed, m (B N D) f32, grad f32 (the scalar upstream gradient).
// OUT (float32): keep (B N N), partial (B N), grad_m (B N D).
#include "../diversity_loss.h"  // before the stand-in: cuda_runtime_api.h defines the qualifiers it replaces
#include "cuda_on_cpu.h"

// The kernels' block-scope `extern __shared__ float coef_row[]` / `warp_sums[]` name variables of this namespace.
namespace omniret {
namespace cuda {
namespace {
alignas(16) float coef_row[kEmulatedSharedBytes / sizeof(float)];
alignas(16) float warp_sums[kEmulatedSharedBytes / sizeof(float)];
}  // namespace
}  // namespace cuda
}  // namespace omniret

#define OMNIRET_CUDA_EMULATION
#include "../diversity_loss.cu"

#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  using namespace omniret;
  using namespace omniret::cuda;
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  int header[4];
  float p_gamma[2];
  int64_t seed;
  if (std::fread(header, sizeof(int), 4, in) != 4 || std::fread(p_gamma, sizeof(float), 2, in) != 2 ||
      std::fread(&seed, sizeof(seed), 1, in) != 1)
    return 2;
  const int B = header[0], N = header[1], D = header[2];
  const bool normalize = header[3] != 0;
  std::vector<float> m(size_t(B) * N * D);
  float grad = 0.f;
  if (std::fread(m.data(), sizeof(float), m.size(), in) != m.size() || std::fread(&grad, sizeof(float), 1, in) != 1)
    return 2;
  std::fclose(in);
  if (diversity_loss_backward_shared_bytes(N) > kEmulatedSharedBytes) return 2;

  const uint32_t threshold = keep_threshold(double(p_gamma[0]));
  const float scale = float(1.0 / (1.0 - double(p_gamma[0]))), gamma = p_gamma[1];
  const int rows = B * N;
  std::vector<float> inv_norm(rows, NAN), partial(rows, NAN), grad_m(m.size(), NAN);
  std::vector<uint8_t> keep(size_t(B) * N * N, 0x7f);
  const unsigned threads = kThreads;
  const unsigned norm_blocks = unsigned((int64_t(rows) * 32 + threads - 1) / threads);
  auto* shared = reinterpret_cast<unsigned char*>(coef_row);
  auto* shared_fwd = reinterpret_cast<unsigned char*>(warp_sums);
  emulate_launch({norm_blocks, 1, 1}, threads, shared, [&] {
    inverse_norm_kernel(m.data(), rows, D, normalize, inv_norm.data());
  });
  emulate_launch({unsigned(rows), 1, 1}, threads, shared_fwd, [&] {
    forward_kernel(m.data(), &seed, N, D, threshold, scale, gamma, inv_norm.data(), partial.data());
  });
  const float inv_count = float(1.0 / (double(B) * double(N) * double(N)));
  emulate_launch({unsigned(rows), 1, 1}, threads, shared, [&] {
    backward_kernel(&grad, m.data(), &seed, N, D, threshold, scale, gamma, normalize, inv_count, inv_norm.data(),
                    grad_m.data());
  });
  const unsigned keep_blocks = unsigned((keep.size() + threads - 1) / threads);
  emulate_launch({keep_blocks, 1, 1}, threads, shared, [&] {
    keep_mask_kernel(&seed, B, N, threshold, keep.data());
  });
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::vector<float> keep_f(keep.begin(), keep.end());
  std::fwrite(keep_f.data(), sizeof(float), keep_f.size(), out);
  std::fwrite(partial.data(), sizeof(float), partial.size(), out);
  std::fwrite(grad_m.data(), sizeof(float), grad_m.size(), out);
  std::fclose(out);
  return 0;
}
