// Links libomniret_ops as a C++ program embedding the ops would, and checks through the dispatcher that every
// op of the library is registered with a CPU kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

int main() {
  const std::vector<std::string> ops = {
      "omniret::aswp_pool_fwd",           "omniret::aswp_pool_bwd",
      "omniret::resampler_attention_fwd", "omniret::resampler_attention_bwd",
      "omniret::diversity_loss_fwd",      "omniret::diversity_loss_bwd",
  };
  int failures = 0;
  for (const auto& name : ops) {
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!handle.has_value()) {
      std::fprintf(stderr, "%s: not registered\n", name.c_str());
      ++failures;
      continue;
    }
    if (!handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      std::fprintf(stderr, "%s: no CPU kernel\n", name.c_str());
      ++failures;
      continue;
    }
    std::printf("%s: %s\n", name.c_str(), c10::toString(handle->schema()).c_str());
  }
  return failures ? 1 : 0;
}
