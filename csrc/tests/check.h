// A minimal check macro for the framework-free C++ unit tests (run by ctest).
#pragma once
#include <cstdio>
#include <cstdlib>

inline int& vpit_test_failures() {
  static int failures = 0;
  return failures;
}

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                  \
      std::fprintf(stderr, "\n");                                         \
      ++vpit_test_failures();                                             \
    }                                                                     \
  } while (0)

#define TEST_MAIN_RESULT()                                                      \
  (vpit_test_failures() == 0 ? (std::printf("all checks passed\n"), 0)          \
                             : (std::fprintf(stderr, "%d checks failed\n", vpit_test_failures()), 1))
