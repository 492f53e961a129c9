// Error codes and the exception type of caftrain.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace caftrain {

/// Error codes of caftrain. Inside a worker's training thread they travel as `Error`
/// exceptions; across actor boundaries as `caf::error` (see actors/messages.hpp).
enum class Errc : uint8_t {
  /// Not an error.
  none = 0,
  /// An argument or option is outside its domain (the message names it and the fix).
  invalid_argument,
  /// A run configuration that cannot work, refused before anything starts.
  invalid_config,
  /// A data file is missing, truncated, or not in the format its name promises.
  data_error,
  /// The operating system refused to read or write a file or directory.
  io_error,
  /// A checkpoint or weights file failed validation (checksum, format, version).
  corrupt_checkpoint,
  /// A state dict does not fit the model (missing or unexpected keys, shapes, dtypes).
  state_mismatch,
  /// A collective did not complete within its timeout.
  collective_timeout,
  /// A collective was cut short because its communicator was closed.
  collective_aborted,
  /// Ranks disagree where they must agree (parameter shapes, report counts, bucket order).
  rank_mismatch,
  /// A worker failed: it threw, its actor died, or it stopped responding.
  worker_failed,
  /// A rank did not reach a report that the other ranks reached, within the timeout.
  report_timeout,
  /// The run was cancelled by its owner.
  cancelled,
  /// A requested backend or device is not available on this machine.
  unavailable,
  /// A run has already finished, or a request arrived in a state that cannot serve it.
  bad_state,
};

/// The enumerator's name, e.g. "invalid_config".
const char* to_string(Errc code);

/// Exception thrown by caftrain's synchronous APIs; `what()` names the problem and the fix.
class Error : public std::runtime_error {
 public:
  // -- constructors -----------------------------------------------------------------

  Error(Errc code, const std::string& message);

  // -- properties -------------------------------------------------------------------

  /// The kind of failure.
  Errc code() const noexcept {
    return code_;
  }

 private:
  Errc code_;
};

} // namespace caftrain
