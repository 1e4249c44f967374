// The one CUDA glue file: wraps the raw-pointer launchers of csrc/cuda/*.cu as torch ops for the CUDA key.
// The .cu files include no torch headers, so only this file pays for them.
#include <torch/library.h>

#include "omniret/py_module.h"
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

TORCH_LIBRARY_IMPL(omniret, CUDA, m) {
  // ---- aswp_pool ----

  // ---- resampler_attention ----

  // ---- diversity_loss ----
}
