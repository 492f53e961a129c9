// What the tune tests share: how Catch prints tune values in failure messages (every
// test TU gets glog's container printers through the precompiled header, and they need
// operator<< for the elements), and catching the error a call must raise.
#pragma once

#include <catch2/catch.hpp>

#include <functional>
#include <ostream>
#include <string>

#include "core/config.hpp"
#include "core/error.hpp"
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

namespace caftrain::test {

/// The message of the `Error` that `f` throws, checking its code; fails the test when `f`
/// throws nothing.
inline std::string error_of(const std::function<void()>& f, Errc code = Errc::invalid_config) {
  try {
    f();
  } catch (const Error& e) {
    CHECK(e.code() == code);
    return e.what();
  }
  FAIL("no error");
  return "";
}

} // namespace caftrain::test
