// Logger: where the Trainer sends logged metrics (Lightning's loggers).
#pragma once

#include <cstdint>
#include <string>

#include "core/config.hpp"

namespace caftrain {

/// Receives the metrics the Trainer logs every `log_every_n_steps` steps and at epoch
/// ends. Only the global-zero rank logs.
class Logger {
 public:
  virtual ~Logger();

  /// Logger name, e.g. "csv".
  virtual std::string name() const = 0;

  /// Directory this logger writes to (the Trainer's `log_dir()`).
  virtual std::string log_dir() const = 0;

  /// Records the module's hyperparameters once per fit.
  virtual void log_hyperparams(const Config& hparams) {}

  /// Records `metrics` at optimizer step `step`.
  virtual void log_metrics(const Metrics& metrics, int64_t step) = 0;

  /// Flushes buffered output.
  virtual void save() {}

  /// Called once when fit/validate/test ends: "success", "failed" or "interrupted".
  virtual void finalize(const std::string& status) {}
};

} // namespace caftrain
