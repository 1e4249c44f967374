// The scalar math of the diversity loss (SPEC section 3), shared by the CPU and CUDA kernels.
// For one kept pair with Gram entry g (cosine when normalize=True), dropout scale 1 / (1 - p):
//   a  = (relu(g) - [i == j]) / (1 - p)          the dropped-out, inverted-scaled entry A'
//   loss term       smooth_l1(a, gamma)
//   d term / d g  = smooth_l1'(a, gamma) / (1 - p) * [g > 0]     (relu'(0) = 0, as torch)
#pragma once

#include "omniret/common.h"

namespace omniret {

// 0.5 x^2 / gamma if |x| < gamma else |x| - 0.5 gamma
template <typename T>
OMNIRET_HD T smooth_l1(T x, T gamma) {
  const T ax = x < T(0) ? -x : x;
  return ax < gamma ? T(0.5) * x * x / gamma : ax - T(0.5) * gamma;
}

// d smooth_l1 / dx: x / gamma inside, sign(x) outside (|x| == gamma takes the outside branch, as torch.where).
template <typename T>
OMNIRET_HD T smooth_l1_grad(T x, T gamma) {
  const T ax = x < T(0) ? -x : x;
  if (ax < gamma) return x / gamma;
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

// A' of a kept pair: (relu(g) - [diagonal]) * scale, scale = 1 / (1 - p).
template <typename T>
OMNIRET_HD T diversity_entry(T g, bool diagonal, T scale) {
  const T relu = g > T(0) ? g : T(0);
  return (relu - (diagonal ? T(1) : T(0))) * scale;
}

// Loss contribution of one kept pair.
template <typename T>
OMNIRET_HD T diversity_pair_loss(T g, bool diagonal, T scale, T gamma) {
  return smooth_l1(diversity_entry(g, diagonal, scale), gamma);
}

// d (pair loss) / d g of one kept pair.
template <typename T>
OMNIRET_HD T diversity_pair_grad(T g, bool diagonal, T scale, T gamma) {
  if (!(g > T(0))) return T(0);
  return smooth_l1_grad(diversity_entry(g, diagonal, scale), gamma) * scale;
}

}  // namespace omniret
