// The process tree as /proc shows it, for tests that check nothing is left behind.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace caftrain::test {

/// The live children of process `pid` (zombies, dead and waiting to be reaped, excepted).
inline std::vector<std::string> children_of(pid_t pid) {
  std::vector<std::string> out;
  auto parent = std::to_string(pid);
  for (auto& entry : std::filesystem::directory_iterator("/proc")) {
    std::ifstream f(entry.path() / "stat");
    std::string line;
    if (!std::getline(f, line))
      continue;
    auto close = line.rfind(')'); // pid (comm) state ppid ...
    if (close == std::string::npos)
      continue;
    std::istringstream rest(line.substr(close + 1));
    std::string state, ppid;
    rest >> state >> ppid;
    if (ppid == parent && state != "Z")
      out.push_back(entry.path().filename().string());
  }
  return out;
}

} // namespace caftrain::test
