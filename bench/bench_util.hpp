// Small helpers the benchmarks share.
#pragma once

#include <algorithm>
#include <array>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace caftrain::bench {

/// The median of `xs` (the upper one of the two middle values for an even count; 0 when
/// empty).
inline double median(std::vector<double> xs) {
  if (xs.empty())
    return 0;
  std::sort(xs.begin(), xs.end());
  return xs[xs.size() / 2];
}

/// Runs `cmd` with the shell and returns what it printed on stdout (add "2>&1" to the
/// command for stderr too). Throws when the command cannot be started.
inline std::string capture(const std::string& cmd) {
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (!pipe)
    throw std::runtime_error("cannot run " + cmd);
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0)
    out.append(buf.data(), n);
  ::pclose(pipe);
  return out;
}

} // namespace caftrain::bench
