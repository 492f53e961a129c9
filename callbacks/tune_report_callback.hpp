// TuneReportCallback and TuneReportCheckpointCallback: a Trainer's metrics (and
// checkpoints) reported to the Tune trial it runs in (Ray's ray.tune.integration
// .pytorch_lightning callbacks).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "callbacks/callback.hpp"
#include "core/config.hpp"

namespace caftrain {

/// Ray's `TuneReportCallback(metrics, on)`: at each `on` hook (default "validation_end",
/// skipped during the sanity check) every rank calls `train::report` with the chosen
/// metrics under the names Tune sees: `metrics` maps a reported name to a logged one
/// (`{{"loss", "val_loss"}, {"acc", "val_accuracy"}}`); empty reports every callback
/// metric under its own name. A logged metric that does not exist at the hook is an error
/// naming it and what was logged. Outside a run `train::report` warns once and does
/// nothing. Hooks: "fit_start", "fit_end", "train_start", "train_end",
/// "train_epoch_start", "train_epoch_end", "train_batch_end", "validation_start",
/// "validation_end", "validation_epoch_end", "test_end".
class TuneReportCallback : public Callback {
 public:
  /// Throws `Error(invalid_config)` for an unknown hook.
  explicit TuneReportCallback(std::map<std::string, std::string> metrics = {},
                              std::string on = "validation_end");

  /// The metrics under their logged names (Ray's list form).
  TuneReportCallback(const std::vector<std::string>& metrics, std::string on);

  std::string state_key() const override;
  void on_fit_start(Trainer& trainer, LightningModule& module) override;
  void on_fit_end(Trainer& trainer, LightningModule& module) override;
  void on_train_start(Trainer& trainer, LightningModule& module) override;
  void on_train_end(Trainer& trainer, LightningModule& module) override;
  void on_train_epoch_start(Trainer& trainer, LightningModule& module) override;
  void on_train_epoch_end(Trainer& trainer, LightningModule& module) override;
  void on_train_batch_end(Trainer& trainer, LightningModule& module, const at::Tensor& loss,
                          const Batch& batch, int64_t batch_idx) override;
  void on_validation_start(Trainer& trainer, LightningModule& module) override;
  void on_validation_end(Trainer& trainer, LightningModule& module) override;
  void on_validation_epoch_end(Trainer& trainer, LightningModule& module) override;
  void on_test_end(Trainer& trainer, LightningModule& module) override;

  /// The metrics a report at this point carries (the mapping applied).
  Metrics metrics_of(Trainer& trainer) const;

 protected:
  /// Whether reports carry a checkpoint of the fit.
  bool checkpoint_ = false;

 private:
  void at(const char* hook, Trainer& trainer);

  std::map<std::string, std::string> metrics_;
  std::string on_;
};

/// Ray's `TuneReportCheckpointCallback(metrics, filename, on)`: as `TuneReportCallback`,
/// and every report carries a checkpoint of the running fit (model, optimizers,
/// schedulers, callbacks, progress), which the trial persists, a PBT exploit clones, and
/// a paused or restarted trial resumes from with
/// `trainer.fit(model, train, val, train::get_checkpoint()->path())`. The checkpoint is
/// the report's directory itself, so there is no file name to choose (Ray's `filename`).
class TuneReportCheckpointCallback : public TuneReportCallback {
 public:
  explicit TuneReportCheckpointCallback(std::map<std::string, std::string> metrics = {},
                                        std::string on = "validation_end");

  std::string state_key() const override;
};

} // namespace caftrain
