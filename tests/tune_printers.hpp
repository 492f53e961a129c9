// How Catch prints tune values in failure messages. Every test TU gets glog's container
// printers through the precompiled header, and they need operator<< for the elements.
#pragma once

#include <ostream>

#include "core/config.hpp"
#include "tune/trial_scheduler.hpp"

namespace caftrain {

inline std::ostream& operator<<(std::ostream& os, const Config& config) {
  return os << config.to_string();
}

} // namespace caftrain

namespace caftrain::tune {

inline std::ostream& operator<<(std::ostream& os, TrialCommand::Kind kind) {
  return os << static_cast<int>(kind);
}

} // namespace caftrain::tune
