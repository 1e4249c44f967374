// The one CUDA glue file: wraps the raw-pointer launchers of csrc/cuda/*.cu as torch ops for the CUDA key.
// The .cu files include no torch headers, so only this file pays for them.
#include <torch/library.h>

#include "omniret/py_module.h"
#include "resampler_attention_glue.h"  // resampler_attention: csrc/cuda/resampler_attention.cu
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

TORCH_LIBRARY_IMPL(omniret, CUDA, m) {
  // ---- aswp_pool ----

  // ---- resampler_attention ----
  m.impl("resampler_attention_fwd", &omniret::resampler_cuda::fwd);
  m.impl("resampler_attention_bwd", &omniret::resampler_cuda::bwd);

  // ---- diversity_loss ----
}
