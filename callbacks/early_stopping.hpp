// EarlyStopping: stop training when a monitored metric stops improving.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "callbacks/callback.hpp"

namespace caftrain {

/// Options of `EarlyStopping`; defaults are Lightning's.
struct EarlyStoppingOptions {
  /// Metric to watch, e.g. "val_loss". Required.
  std::string monitor;
  /// Smallest change that counts as an improvement. Default 0.
  double min_delta = 0.0;
  /// Checks without improvement before stopping. Default 3.
  int64_t patience = 3;
  /// "min" (default) or "max".
  std::string mode = "min";
  /// Fail when the metric is missing (true, default) instead of skipping the check.
  bool strict = true;
  /// Stop when the metric becomes NaN or infinite. Default true.
  bool check_finite = true;
  /// Stop as soon as the metric is better than this.
  std::optional<double> stopping_threshold = std::nullopt;
  /// Stop as soon as the metric is worse than this.
  std::optional<double> divergence_threshold = std::nullopt;
  /// Check at the end of each training epoch instead of after validation. Default false.
  bool check_on_train_epoch_end = false;
  /// Print why training stopped. Default false.
  bool verbose = false;
};

/// Lightning's EarlyStopping: sets `trainer.should_stop` once `monitor` has not improved
/// by min_delta for `patience` checks (or crossed a threshold). Its counters are saved in
/// checkpoints, so a resumed run keeps its patience.
class EarlyStopping : public Callback {
 public:
  /// Throws `Error(invalid_config)` for an empty monitor, bad mode or negative patience.
  explicit EarlyStopping(EarlyStoppingOptions options);

  std::string state_key() const override;
  void on_validation_end(Trainer& trainer, LightningModule& module) override;
  void on_train_epoch_end(Trainer& trainer, LightningModule& module) override;
  nlohmann::json state_dict() const override;
  void load_state_dict(const nlohmann::json& state) override;

  int64_t wait_count() const noexcept {
    return wait_count_;
  }

  /// Epoch at which it stopped training, or 0.
  int64_t stopped_epoch() const noexcept {
    return stopped_epoch_;
  }

  double best_score() const noexcept {
    return best_score_;
  }

  /// Why it stopped, or "".
  const std::string& reason() const noexcept {
    return reason_;
  }

 private:
  void check(Trainer& trainer);
  bool better(double current, double reference) const;

  EarlyStoppingOptions options_;
  int64_t wait_count_ = 0;
  int64_t stopped_epoch_ = 0;
  double best_score_;
  std::string reason_;
};

} // namespace caftrain
