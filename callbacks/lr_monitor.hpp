// LearningRateMonitor: logs each optimizer's learning rate.
#pragma once

#include <string>

#include "callbacks/callback.hpp"
#include "core/config.hpp"

namespace caftrain {

/// Options of `LearningRateMonitor`.
struct LearningRateMonitorOptions {
  /// "step" (every logging step, default) or "epoch" (at each epoch start).
  std::string logging_interval = "step";
  /// Also log momentum (SGD's momentum, Adam's beta1). Default false.
  bool log_momentum = false;
};

/// Lightning's LearningRateMonitor: sends `lr-<Optimizer>` (and `lr-<Optimizer>/pg<i>`
/// for several param groups) to the loggers. Names: Adam, AdamW, SGD, RMSprop, Adagrad,
/// LBFGS, or "Optimizer" for others; a suffix `-<i>` tells repeated types apart.
class LearningRateMonitor : public Callback {
 public:
  /// Throws `Error(invalid_config)` for an unknown logging_interval.
  explicit LearningRateMonitor(LearningRateMonitorOptions options = {});

  std::string state_key() const override;
  void on_train_batch_start(Trainer& trainer, LightningModule& module, const Batch& batch,
                            int64_t batch_idx) override;
  void on_train_epoch_start(Trainer& trainer, LightningModule& module) override;

  /// The rates logged last.
  const Metrics& last_logged() const noexcept {
    return last_;
  }

  /// The rates of `trainer`'s optimizers now, under the names described above.
  static Metrics learning_rates(const Trainer& trainer, bool with_momentum = false);

 private:
  void record(Trainer& trainer);

  LearningRateMonitorOptions options_;
  Metrics last_;
};

} // namespace caftrain
