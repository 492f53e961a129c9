#include "core/error.hpp"

namespace caftrain {

const char* to_string(Errc code) {
  switch (code) {
    case Errc::none: return "none";
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::invalid_config: return "invalid_config";
    case Errc::data_error: return "data_error";
    case Errc::io_error: return "io_error";
    case Errc::corrupt_checkpoint: return "corrupt_checkpoint";
    case Errc::state_mismatch: return "state_mismatch";
    case Errc::collective_timeout: return "collective_timeout";
    case Errc::collective_aborted: return "collective_aborted";
    case Errc::rank_mismatch: return "rank_mismatch";
    case Errc::worker_failed: return "worker_failed";
    case Errc::report_timeout: return "report_timeout";
    case Errc::cancelled: return "cancelled";
    case Errc::unavailable: return "unavailable";
    case Errc::bad_state: return "bad_state";
  }
  return "unknown";
}

Error::Error(Errc code, const std::string& message)
  : std::runtime_error(message), code_(code) {
  // nop
}

} // namespace caftrain
