// MetricsCollector: what LightningModule::log records, per step and per epoch.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "core/config.hpp"
#include "train/lightning_module.hpp"

namespace caftrain {

/// Where `log` was called from; decides Lightning's on_step/on_epoch defaults and which
/// epoch accumulators a reset clears.
enum class LogScope { train, validation, test };

/// Collects the values LightningModule::log records. Values stay tensors (no device
/// synchronisation per step) until a reader asks for numbers. Epoch values are means
/// weighted by batch size, like Lightning's.
class MetricsCollector {
 public:
  /// Reduces a scalar over ranks (sync_dist); the Trainer passes its strategy's reduce.
  using Reducer = std::function<double(double)>;

  /// Sets how sync_dist values are reduced over ranks (a collective every rank runs).
  void set_reducer(Reducer reducer) {
    reducer_ = std::move(reducer);
  }

  /// Sets the scope of subsequent `log` calls and the batch size that weighs them.
  void begin_batch(LogScope scope, int64_t batch_size);

  /// Sets the scope of subsequent `log` calls to the epoch-end hook of `scope`
  /// (`on_train_epoch_end`, `on_validation_epoch_end`, `on_test_epoch_end`): values are
  /// epoch-level there (on_epoch, not on_step), as in Lightning, and reach `epoch_metrics`
  /// of that scope. The next `begin_batch` ends it.
  void begin_epoch_end(LogScope scope);

  /// Records one value. In an epoch-end hook, on_step = true or on_epoch = false is
  /// refused with `Error(invalid_argument)`: there is no step to log for.
  void log(const std::string& name, const at::Tensor& value, const LogOptions& options);

  /// Forgets the epoch accumulators of `scope` (at the start of an epoch or a run).
  void reset_epoch(LogScope scope);

  /// Forgets every key logged in `scope` (after a sanity check, whose values must not
  /// show anywhere).
  void clear(LogScope scope);

  /// Values logged with on_step in the current step: "name", or "name_step" when the key
  /// is logged on_epoch as well (then, unless `for_logger`, also under "name", as
  /// Lightning's callback_metrics). Only keys with logger = true when `for_logger`.
  Metrics step_metrics(bool for_logger = false) const;

  /// Epoch means of `scope`'s on_epoch keys: "name", or "name_epoch" when also on_step
  /// (then, unless `for_logger`, also under "name").
  /// A sync_dist key is reduced over ranks as each value is logged, so its mean is global.
  Metrics epoch_metrics(LogScope scope, bool for_logger = false) const;

  /// Metrics logged with prog_bar: the step value when fresh, else the epoch mean so far.
  Metrics progress_bar() const;

  /// Clears the per-step values (after they were read for a step).
  void end_step();

 private:
  struct Entry {
    LogScope scope = LogScope::train;
    LogOptions options;
    bool on_step = false;
    bool on_epoch = false;
    at::Tensor last;      // value of the latest step
    bool fresh = false;   // logged during the current step
    at::Tensor sum;       // batch-size-weighted sum over the epoch
    double weight = 0.0;  // total batch size over the epoch
  };

  Reducer reducer_;
  LogScope scope_ = LogScope::train;
  int64_t batch_size_ = 1;
  bool epoch_end_ = false; // inside an epoch-end hook (begin_epoch_end)
  std::map<std::string, Entry> entries_;
};

} // namespace caftrain
