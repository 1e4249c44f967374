// A minimal check macro for the C++ unit tests: count failures, report them, exit nonzero.
#pragma once
#include <cmath>
#include <cstdio>

static int omniret_failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++omniret_failures;                                                      \
    }                                                                          \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                  \
  do {                                                                         \
    double _a = (a), _b = (b);                                                 \
    if (!(std::fabs(_a - _b) <= (tol))) {                                      \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.9g, %s = %.9g\n", __FILE__, __LINE__, #a, _a, #b, _b); \
      ++omniret_failures;                                                      \
    }                                                                          \
  } while (0)

#define TEST_MAIN_END()                                                        \
  do {                                                                         \
    if (omniret_failures) std::fprintf(stderr, "%d check(s) failed\n", omniret_failures); \
    return omniret_failures ? 1 : 0;                                           \
  } while (0)
