// The omniret operator library: every schema, one block per op. The kernels register themselves per device:
// CPU in csrc/cpu/<op>.cpp, CUDA in csrc/cuda/register_cuda.cpp; fake kernels and autograd in Python
// (omniret_kernels/<op>.py).
#include <torch/library.h>

#include "omniret/py_module.h"

TORCH_LIBRARY(omniret, m) {
  // ---- aswp_pool (omniret_kernels/aswp.py) ----
  // Forward returns (out (B, L) in x's dtype, sorted (B, N, L) float32/float64 = each column's sorted valid
  // projections, sorted_tokens (B, N, L) uint8 if N <= 256 else int32 = the token at each sorted position).
  // With save_for_backward=False (no gradient will be needed) the last two are empty (shape (0,)).
  m.def(
      "aswp_pool_fwd(Tensor x, Tensor directions, Tensor references, Tensor? mask, Tensor? weights, str pooling, "
      "bool normalize_directions, float temperature, bool save_for_backward=True) -> (Tensor, Tensor, Tensor)");
  // Backward returns (grad_x, grad_directions, grad_references, grad_weights); a gradient that is not asked for
  // (need_x / need_directions false, or no weights) comes back as an empty tensor.
  m.def(
      "aswp_pool_bwd(Tensor grad_out, Tensor x, Tensor directions, Tensor references, Tensor? mask, "
      "Tensor? weights, Tensor sorted, Tensor sorted_tokens, str pooling, bool normalize_directions, float temperature, "
      "bool need_x, bool need_directions) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- resampler_attention (omniret_kernels/resampler.py) ----
  // lse (B, H, Nq) is the log-sum-exp of each query row, float32 (float64 for float64 inputs): all the backward
  // needs besides q, k, v, out.
  m.def("resampler_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale) -> (Tensor, Tensor)");
  m.def("resampler_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, float scale) -> (Tensor, Tensor, Tensor)");

  // ---- diversity_loss (omniret_kernels/diversity.py) ----
  // seed: 0-dim int64 tensor keying the Philox keep mask (csrc/include/omniret/counter_rng.h); the mask is
  // regenerated in every call, never stored.
  m.def("diversity_loss_fwd(Tensor m, Tensor seed, float p, float gamma, bool normalize) -> Tensor");
  m.def("diversity_loss_bwd(Tensor grad, Tensor m, Tensor seed, float p, float gamma, bool normalize) -> Tensor");
  m.def("diversity_keep_mask(Tensor seed, SymInt batch, SymInt n, float p) -> Tensor");
}
