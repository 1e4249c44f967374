// Unit tests of omniret/resampler_attention_math.h (the online-softmax math shared by the CPU and CUDA kernels).
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "omniret/resampler_attention_math.h"

using namespace omniret::resampler;

// fast_exp against std::exp over the whole range the kernels feed it (scores minus a running max <= 0, and a
// little above 0 for the lse-shifted backward), relative error below 2e-7.
static void test_fast_exp() {
  double worst = 0;
  for (float x = -87.0f; x <= 20.0f; x += 0.001953125f) {
    const double want = std::exp(static_cast<double>(x));
    const double rel = std::fabs(fast_exp(x) - want) / want;
    worst = rel > worst ? rel : worst;
  }
  CHECK(worst < 2e-7);
  CHECK(fast_exp(0.0f) == 1.0f);
  CHECK(fast_exp(-1000.0f) < 1e-37f);  // clamped: effectively 0, never NaN or a denormal storm
  CHECK(fast_exp(-1000.0f) >= 0.0f);
  CHECK(std::isfinite(fast_exp(1000.0f)));
  CHECK(std::isnan(fast_exp(std::nanf(""))));  // a NaN score poisons its row, as std::exp does
  CHECK(std::isnan(fast_exp(-std::nanf(""))));
  CHECK(fast_exp(-INFINITY) == 0.0f);
}

// Running online_softmax_step over blocks, with the rescaling of an accumulator, gives the softmax-weighted sum and
// the log-sum-exp of a direct computation, whatever the block size.
template <typename T>
static void test_online_softmax_blocks(int64_t n, int64_t block, double tol) {
  std::mt19937 rng(1234 + static_cast<unsigned>(n * 7 + block));
  std::normal_distribution<double> normal(0.0, 3.0);
  std::vector<T> s(n), val(n);
  for (int64_t j = 0; j < n; ++j) {
    s[j] = static_cast<T>(normal(rng));
    val[j] = static_cast<T>(normal(rng));
  }
  double mx = -INFINITY;
  for (auto x : s) mx = x > mx ? x : mx;
  double z = 0, weighted = 0;
  for (int64_t j = 0; j < n; ++j) {
    z += std::exp(s[j] - mx);
    weighted += std::exp(s[j] - mx) * val[j];
  }
  const double want_out = weighted / z, want_lse = mx + std::log(z);

  T m = -std::numeric_limits<T>::infinity(), l = 0, acc = 0;
  std::vector<T> buf(block);
  for (int64_t j0 = 0; j0 < n; j0 += block) {
    const int64_t nb = std::min(block, n - j0);
    for (int64_t j = 0; j < nb; ++j) buf[j] = s[j0 + j];
    const T rescale = online_softmax_step(buf.data(), nb, m, l);
    if (j0 == 0) CHECK(rescale == T(0));
    acc *= rescale;
    for (int64_t j = 0; j < nb; ++j) acc += buf[j] * val[j0 + j];
  }
  CHECK_NEAR(acc / l, want_out, tol * (1 + std::fabs(want_out)));
  CHECK_NEAR(finish_lse(m, l), want_lse, tol * (1 + std::fabs(want_lse)));

  // recompute_probs from the lse gives probabilities summing to 1, equal to the direct softmax
  std::vector<T> p(s);
  recompute_probs(p.data(), n, finish_lse(m, l));
  double total = 0;
  for (int64_t j = 0; j < n; ++j) {
    total += p[j];
    CHECK_NEAR(p[j], std::exp(s[j] - mx) / z, tol);
  }
  CHECK_NEAR(total, 1.0, tol * n);
}

// softmax_grad: dS = P * (dP - delta) with delta = sum_j P_j dP_j is the Jacobian-vector product of softmax,
// checked against central finite differences of sum_j g_j softmax(s)_j.
static void test_softmax_grad() {
  const int n = 9;
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> s(n), g(n);
  for (int j = 0; j < n; ++j) s[j] = normal(rng), g[j] = normal(rng);
  auto objective = [&](const std::vector<double>& x) {
    double mx = row_max(x.data(), n), z = 0, acc = 0;
    for (int j = 0; j < n; ++j) z += std::exp(x[j] - mx);
    for (int j = 0; j < n; ++j) acc += g[j] * std::exp(x[j] - mx) / z;
    return acc;
  };
  double mx = row_max(s.data(), n), z = 0;
  for (int j = 0; j < n; ++j) z += std::exp(s[j] - mx);
  std::vector<double> p(s);
  recompute_probs(p.data(), n, mx + std::log(z));
  std::vector<double> ds(g);
  softmax_grad(p.data(), ds.data(), n, dot(p.data(), g.data(), n));
  for (int j = 0; j < n; ++j) {
    std::vector<double> hi(s), lo(s);
    hi[j] += 1e-6;
    lo[j] -= 1e-6;
    CHECK_NEAR(ds[j], (objective(hi) - objective(lo)) / 2e-6, 1e-8);
  }
}

int main() {
  test_fast_exp();
  for (int64_t n : {1, 7, 256, 729, 1500}) {
    for (int64_t block : {1, 16, 256}) {
      test_online_softmax_blocks<double>(n, block, 1e-12);
      test_online_softmax_blocks<float>(n, block, 2e-5);
    }
  }
  test_softmax_grad();
  TEST_MAIN_END();
}
