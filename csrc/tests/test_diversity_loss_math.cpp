// Unit test of csrc/include/omniret/diversity_loss_math.h (no torch): smooth-L1 against its definition, and every
// analytic derivative against central finite differences on both sides of each branch point.
#include <cmath>
#include <cstdio>

#include "omniret/diversity_loss_math.h"

static int failures = 0;

static void expect_close(const char* what, double got, double want, double tol) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s: got %.17g, expected %.17g\n", what, got, want);
    ++failures;
  }
}

// smooth_l1 written straight from SPEC section 3.
static double spec_smooth_l1(double x, double gamma) {
  return std::fabs(x) < gamma ? 0.5 * x * x / gamma : std::fabs(x) - 0.5 * gamma;
}

int main() {
  const double gammas[] = {0.05, 0.5, 2.0};
  const double xs[] = {-3.0, -0.7, -0.3, -0.01, 0.0, 0.01, 0.2, 0.49, 0.51, 1.0, 4.5};
  const double h = 1e-6;
  for (double gamma : gammas) {
    for (double x : xs) {
      expect_close("smooth_l1", omniret::smooth_l1(x, gamma), spec_smooth_l1(x, gamma), 1e-15);
      expect_close("smooth_l1<float>", omniret::smooth_l1(static_cast<float>(x), static_cast<float>(gamma)),
                   spec_smooth_l1(x, gamma), 1e-6);
      if (std::fabs(std::fabs(x) - gamma) > 10 * h) {  // away from the kink
        const double fd = (spec_smooth_l1(x + h, gamma) - spec_smooth_l1(x - h, gamma)) / (2 * h);
        expect_close("smooth_l1_grad", omniret::smooth_l1_grad(x, gamma), fd, 1e-6);
      }
    }
    // Continuity at the branch point |x| = gamma: both branches give gamma / 2 and slope +-1.
    expect_close("smooth_l1 at gamma", omniret::smooth_l1(gamma, gamma), 0.5 * gamma, 1e-15);
    expect_close("smooth_l1_grad at gamma", omniret::smooth_l1_grad(gamma, gamma), 1.0, 1e-15);
    expect_close("smooth_l1_grad at -gamma", omniret::smooth_l1_grad(-gamma, gamma), -1.0, 1e-15);
  }
  expect_close("smooth_l1_grad at 0", omniret::smooth_l1_grad(0.0, 0.5), 0.0, 0.0);

  // Pair loss and its derivative in g, for off-diagonal and diagonal pairs and several dropout scales.
  const double gs[] = {-0.8, -0.1, 0.05, 0.3, 0.7, 0.95, 1.2, 3.0};
  const double scales[] = {1.0, 2.0, 10.0};
  for (double scale : scales) {
    for (double gamma : gammas) {
      for (int diag = 0; diag < 2; ++diag) {
        for (double g : gs) {
          const double a = ((g > 0 ? g : 0.0) - diag) * scale;
          expect_close("diversity_entry", omniret::diversity_entry(g, diag == 1, scale), a, 1e-15);
          expect_close("diversity_pair_loss", omniret::diversity_pair_loss(g, diag == 1, scale, gamma),
                       spec_smooth_l1(a, gamma), 1e-15);
          const double plus = ((g + h > 0 ? g + h : 0.0) - diag) * scale;
          const double minus = ((g - h > 0 ? g - h : 0.0) - diag) * scale;
          if (std::fabs(std::fabs(a) - gamma) > 20 * h * scale) {
            const double fd = (spec_smooth_l1(plus, gamma) - spec_smooth_l1(minus, gamma)) / (2 * h);
            expect_close("diversity_pair_grad", omniret::diversity_pair_grad(g, diag == 1, scale, gamma), fd, 1e-5);
          }
        }
      }
    }
  }
  // relu'(0) = 0, as torch: a pair with g exactly 0 passes no gradient.
  expect_close("pair_grad at g = 0", omniret::diversity_pair_grad(0.0, false, 2.0, 0.5), 0.0, 0.0);
  expect_close("pair_grad at g = 0 (diag)", omniret::diversity_pair_grad(0.0, true, 2.0, 0.5), 0.0, 0.0);

  if (failures) std::printf("%d failure(s)\n", failures);
  else std::printf("diversity_loss_math: all checks passed\n");
  return failures ? 1 : 0;
}
