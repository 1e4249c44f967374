// Plain C++ test of csrc/include/omniret/aswp_pool_math.h (no torch): sort keys, the bitonic network against
// std::stable_sort, quantile positions, the rank-order pooling rows against direct per-column formulas, and
// exp_approx. Returns nonzero on the first failure.
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "omniret/aswp_pool_math.h"

using namespace omniret::aswp;

static int failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
      ++failures;                                           \
    }                                                       \
  } while (0)

static void test_keys(std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, 10.f);
  const float specials[] = {0.f, -0.f, 1e-40f, -1e-40f, INFINITY, -INFINITY, 3.4e38f, -3.4e38f};
  std::vector<float> values(specials, specials + 8);
  for (int i = 0; i < 2000; ++i) values.push_back(dist(rng));
  for (float a : values) {
    EXPECT(key_value(pack_key(a, 7)) == a, "value round trip of %g", a);
    EXPECT(key_index(pack_key(a, 200)) == 200u, "index round trip");
    for (int k = 0; k < 4; ++k) {
      const float b = values[rng() % values.size()];
      if (a < b) EXPECT(pack_key(a, 9) < pack_key(b, 1), "order of %g < %g", a, b);
      if (a == b) EXPECT(pack_key(a, 1) < pack_key(b, 2), "ties order by index (%g)", a);
    }
    EXPECT(pack_key(a, 255) < kPadKey, "padding sorts last");
  }
}

static void test_sort(std::mt19937& rng) {
  for (int n : {1, 2, 3, 5, 17, 64, 127, 128, 200, 256}) {
    const int n_pow2 = next_pow2(n);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> v(n);
      std::uniform_int_distribution<int> few(-3, 3);  // many ties
      std::normal_distribution<float> dist(0.f, 1.f);
      for (auto& x : v) x = trial % 2 ? float(few(rng)) : dist(rng);
      // float keys
      std::vector<uint64_t> keys(n_pow2, kPadKey);
      for (int i = 0; i < n; ++i) keys[i] = pack_key(v[i], uint32_t(i));
      bitonic_sort(keys.data(), n_pow2, 1);
      std::vector<int> expect(n);
      std::iota(expect.begin(), expect.end(), 0);
      std::stable_sort(expect.begin(), expect.end(), [&](int a, int b) { return v[a] < v[b]; });
      for (int i = 0; i < n; ++i) {
        EXPECT(int(key_index(keys[i])) == expect[i], "n=%d pos %d: index %u, stable sort says %d", n, i,
               key_index(keys[i]), expect[i]);
        EXPECT(key_value(keys[i]) == v[expect[i]], "n=%d pos %d value", n, i);
      }
      for (int i = n; i < n_pow2; ++i) EXPECT(keys[i] == kPadKey, "padding stays at the end");
      // float64 keys, strided
      std::vector<KeyF64> dkeys(size_t(n_pow2) * 3, KeyF64{0.0, -1});
      for (int i = 0; i < n; ++i) dkeys[size_t(i) * 3] = KeyF64{double(v[i]), i};
      bitonic_sort(dkeys.data(), n_pow2, 3);
      for (int i = 0; i < n; ++i) EXPECT(dkeys[size_t(i) * 3].index == expect[i], "float64 n=%d pos %d", n, i);
    }
  }
}

static void test_quantiles() {
  for (int m : {1, 5, 128}) {
    for (int r = 0; r < m; ++r) {  // n == M: exactly s[r]
      int lo, hi;
      double w;
      quantile_position(r, m, m, lo, hi, w);
      EXPECT(lo == r && w == 0.0, "n == M must couple rank %d to itself (lo %d, w %g)", r, lo, w);
    }
  }
  for (int n : {1, 2, 7, 127, 300}) {
    const int m = 64;
    double last = -1;
    for (int r = 0; r < m; ++r) {
      int lo, hi;
      double w;
      quantile_position(r, n, m, lo, hi, w);
      const double t = std::min(std::max((r + 0.5) * n / m - 0.5, 0.0), double(n - 1));
      EXPECT(std::fabs(lo + w - t) < 1e-12 && lo >= 0 && hi <= n - 1 && hi >= lo && w >= 0 && w < 1,
             "n=%d r=%d: lo %d hi %d w %g t %g", n, r, lo, hi, w, t);
      EXPECT(lo + w >= last, "positions increase with rank");
      last = lo + w;
    }
  }
}

// Direct formulas for one column, in double, written independently of the row functions.
static void direct_column(int pooling, const std::vector<double>& psi, double g, double tau,
                          const std::vector<double>& weight, double& value, std::vector<double>& dpsi) {
  const int m = int(psi.size());
  int a = 0;
  for (int j = 1; j < m; ++j)
    if (psi[j] > psi[a]) a = j;
  dpsi.assign(m, 0.0);
  if (pooling == kStm || pooling == kMax) {
    value = psi[a];
    dpsi[a] = g;
    if (pooling == kStm) {
      double z = 0, ybar = 0;
      std::vector<double> y(m);
      for (int j = 0; j < m; ++j) z += y[j] = std::exp(psi[j] / tau);
      for (int j = 0; j < m; ++j) ybar += (y[j] /= z) * psi[j];
      for (int j = 0; j < m; ++j) dpsi[j] += g * y[j] * (psi[j] - ybar) / tau;
    }
  } else if (pooling == kMean) {
    value = std::accumulate(psi.begin(), psi.end(), 0.0) / m;
    for (auto& d : dpsi) d = g / m;
  } else {
    value = 0;
    for (int j = 0; j < m; ++j) value += weight[j] * psi[j], dpsi[j] = g * weight[j];
  }
}

static void test_pool_rows(std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0);
  const int m = 9, width = 3;
  for (int pooling : {kStm, kMax, kMean, kWeighted}) {
    for (int trial = 0; trial < 20; ++trial) {
      // psi for `width` columns, j-major; a random rank order per column
      std::vector<double> psi(m * width), weight(m * width), g(width);
      for (auto& x : psi) x = trial % 3 == 0 ? double(int(dist(rng) * 2)) : dist(rng);  // ties sometimes
      for (auto& x : weight) x = dist(rng);
      for (auto& x : g) x = dist(rng);
      std::vector<int> order(m * width);  // order[r * width + c] = j of rank r
      for (int c = 0; c < width; ++c) {
        std::vector<int> o(m);
        std::iota(o.begin(), o.end(), 0);
        std::shuffle(o.begin(), o.end(), rng);
        for (int r = 0; r < m; ++r) order[r * width + c] = o[r];
      }
      std::vector<double> psi_r(m * width), w_r(m * width);
      for (int r = 0; r < m; ++r)
        for (int c = 0; c < width; ++c)
          psi_r[r * width + c] = psi[order[r * width + c] * width + c],
                          w_r[r * width + c] = weight[order[r * width + c] * width + c];
      const double tau = 0.7;
      double acc[width], best[width], z[width] = {0, 0, 0}, num[width] = {0, 0, 0}, dpsi[width];
      int best_j[width], best_r[width];
      std::vector<double> e(m * width);
      for (int c = 0; c < width; ++c) acc[c] = pool_initial<double>(pooling), best[c] = -INFINITY,
                                      best_j[c] = 1 << 30, best_r[c] = 0;
      for (int r = 0; r < m; ++r) {
        pool_accumulate_row(pooling, &psi_r[r * width], &w_r[r * width], acc, width);
        argmax_update(&psi_r[r * width], &order[r * width], r, best, best_j, best_r, width);
      }
      pool_finish_row(pooling, m, acc, width);
      for (int r = 0; r < m; ++r) stm_softmax_row(&psi_r[r * width], best, 1.0 / tau, &e[r * width], z, num, width);
      stm_normalize(z, num, width);
      for (int c = 0; c < width; ++c) {
        std::vector<double> col(m), wcol(m), expect_d;
        for (int j = 0; j < m; ++j) col[j] = psi[j * width + c], wcol[j] = weight[j * width + c];
        double value;
        direct_column(pooling, col, g[c], tau, wcol, value, expect_d);
        EXPECT(std::fabs(acc[c] - value) < 1e-12, "pooling %d forward %g vs %g", pooling, acc[c], value);
        std::vector<double> got(m);
        for (int r = 0; r < m; ++r) {
          pool_grad_row(pooling, m, r, &psi_r[r * width], &e[r * width], z, num, best_r, &w_r[r * width], g.data(),
                        1.0 / tau, dpsi, width);
          got[order[r * width + c]] = dpsi[c];
        }
        for (int j = 0; j < m; ++j)
          EXPECT(std::fabs(got[j] - expect_d[j]) < 1e-12, "pooling %d grad j=%d: %g vs %g", pooling, j, got[j],
                 expect_d[j]);
      }
    }
  }
}

static void test_coupling_rows() {
  // couple_row_backward is the adjoint of couple_row: <dpsi, couple(s)> == <couple^T(dpsi), s> (refs aside).
  const int n = 5, m = 7;
  double s[n] = {-2, -0.5, 0.1, 0.3, 4}, ds[n] = {0, 0, 0, 0, 0}, dpsi[m], lhs = 0, rhs = 0;
  for (int r = 0; r < m; ++r) {
    int lo, hi;
    double w, psi, zero = 0;
    quantile_position(r, n, m, lo, hi, w);
    couple_row(&s[lo], &s[hi], w, &zero, &psi, 1);
    dpsi[r] = std::sin(r + 1.0);
    lhs += dpsi[r] * psi;
    couple_row_backward(&dpsi[r], w, &ds[lo], &ds[hi], 1);
  }
  for (int i = 0; i < n; ++i) rhs += ds[i] * s[i];
  EXPECT(std::fabs(lhs - rhs) < 1e-12, "coupling adjoint %g vs %g", lhs, rhs);
}

static void test_exp() {
  for (float x = -80.f; x <= 0.f; x += 0.01f) {
    const double ref = std::exp(double(x));
    EXPECT(std::fabs(exp_approx(x) - ref) <= 4e-7 * ref, "exp_approx(%g) = %g vs %g", x, exp_approx(x), ref);
  }
}

// Non-finite values: NaN of either sign sorts after +inf (torch.sort's order) and before the pad keys, in the
// packed float32 keys and the float64 pairs; max pooling keeps a NaN; STM's forward is NaN for any +-inf or NaN.
static void test_non_finite() {
  const float nan_neg = -std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  EXPECT(float_to_ordered(nan_neg) > float_to_ordered(inf), "negative NaN must sort after +inf");
  EXPECT(float_to_ordered(nan_neg) < kPadValueKey, "NaN must sort before the value-only pad key");
  EXPECT(pack_key(std::nanf(""), 5) < kPadKey && pack_key(std::nanf(""), 5) > pack_key(inf, 0), "NaN key order");
  EXPECT(std::isnan(key_value(pack_key(nan_neg, 3))) && key_index(pack_key(nan_neg, 3)) == 3, "NaN key decodes");
  std::vector<KeyF64> keys = {{std::nan(""), 0}, {1.0, 1}, {-std::nan(""), 2}, {-INFINITY, 3}, {INFINITY, 4},
                              {0.0, 5}, {0.0, -1}, {0.0, -1}};
  bitonic_sort(keys.data(), 8, 1);
  const int want[6] = {3, 5, 1, 4, 0, 2};  // -inf, 0, 1, inf, then the NaNs by index, then padding
  for (int i = 0; i < 6; ++i) EXPECT(keys[i].index == want[i], "float64 NaN sort: row %d holds %d", i, keys[i].index);
  EXPECT(keys[6].index < 0 && keys[7].index < 0, "padding last");
  for (int pooling : {kStm, kMax}) {
    const float rows[3][3] = {{1.f, 2.f, 3.f}, {std::nanf(""), -inf, inf}, {5.f, 5.f, 5.f}};
    float acc[3];
    for (float& a : acc) a = pool_initial<float>(pooling);
    for (const auto& row : rows) pool_accumulate_row<float>(pooling, row, nullptr, acc, 3);
    EXPECT(std::isnan(acc[0]), "pooling %d: a NaN psi must give NaN", pooling);
    EXPECT(pooling == kStm ? std::isnan(acc[1]) : acc[1] == 5.f, "pooling %d: -inf psi gives %g", pooling, acc[1]);
    EXPECT(pooling == kStm ? std::isnan(acc[2]) : acc[2] == inf, "pooling %d: +inf psi gives %g", pooling, acc[2]);
  }
}

// next_pow2 in int64: past 2^30 it doubled an int into overflow and looped forever.
static void test_next_pow2() {
  EXPECT(next_pow2(1) == 1 && next_pow2(3) == 4 && next_pow2(128) == 128, "next_pow2 small");
  EXPECT(next_pow2((int64_t(1) << 30) + 1) == (int64_t(1) << 31), "next_pow2(2^30 + 1)");
  EXPECT(next_pow2(INT32_MAX) == (int64_t(1) << 31), "next_pow2(2^31 - 1)");
}

int main() {
  std::mt19937 rng(1234);
  test_non_finite();
  test_next_pow2();
  test_keys(rng);
  test_sort(rng);
  test_quantiles();
  test_pool_rows(rng);
  test_coupling_rows();
  test_exp();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("aswp_pool_math: all passed\n");
  return 0;
}
