// The random source of Tune: a seeded 64-bit Mersenne Twister with caftrain's own
// transforms, so sampled configs are the same on every standard library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>

namespace caftrain::tune {

/// A seeded `std::mt19937_64` with its own transforms to uniform, integer and normal
/// values. `std::uniform_real_distribution` and friends are implementation-defined;
/// these transforms are not, so a seed gives the same configs with any libstdc++/libc++.
class Rng {
 public:
  // -- constructors -----------------------------------------------------------------

  /// A generator seeded with `seed` (default 0, like any other seed).
  explicit Rng(uint64_t seed = 0) : engine_(seed) {
    // nop
  }

  // -- sampling ---------------------------------------------------------------------

  /// The next raw 64-bit output of the engine.
  uint64_t next() {
    return engine_();
  }

  /// Uniform in [0, 1): the top 53 bits of one output scaled by 2^-53.
  double uniform01();

  /// Uniform in [lower, upper): `lower + (upper - lower) * uniform01()`.
  double uniform(double lower, double upper);

  /// Uniform integer in [lower, upper) (upper exclusive, as numpy's `integers`), without
  /// modulo bias (rejection of the top partial range). Requires lower < upper.
  int64_t integer(int64_t lower, int64_t upper);

  /// Uniform index in [0, n). Requires n > 0.
  std::size_t index(std::size_t n);

  /// Normal with mean `mean` and standard deviation `sd` (Box-Muller, one output per
  /// two uniforms, nothing cached between calls).
  double normal(double mean, double sd);

  /// True with probability `p`: `uniform01() < p` (Python's `random.random() < p`).
  bool bernoulli(double p) {
    return uniform01() < p;
  }

 private:
  std::mt19937_64 engine_;
};

} // namespace caftrain::tune
