#include "tune/rng.hpp"

#include <cmath>
#include <limits>

namespace caftrain::tune {

double Rng::uniform01() {
  return static_cast<double>(next() >> 11) * 0x1.0p-53;
}

double Rng::uniform(double lower, double upper) {
  return lower + (upper - lower) * uniform01();
}

int64_t Rng::integer(int64_t lower, int64_t upper) {
  auto range = static_cast<uint64_t>(upper) - static_cast<uint64_t>(lower);
  // Accept only draws below the largest multiple of `range`, so every residue is equally likely.
  auto limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % range;
  uint64_t x = next();
  while (x >= limit)
    x = next();
  return static_cast<int64_t>(static_cast<uint64_t>(lower) + x % range);
}

std::size_t Rng::index(std::size_t n) {
  return static_cast<std::size_t>(integer(0, static_cast<int64_t>(n)));
}

double Rng::normal(double mean, double sd) {
  constexpr double two_pi = 6.283185307179586476925286766559;
  double u1 = 1.0 - uniform01(); // in (0, 1]: log(u1) is finite
  double u2 = uniform01();
  return mean + sd * std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2);
}

} // namespace caftrain::tune
