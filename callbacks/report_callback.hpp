// ReportCallback: reports metrics and checkpoints of a Trainer to its TorchTrainer run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "callbacks/callback.hpp"

namespace caftrain {

/// Options of `ReportCallback`.
struct ReportOptions {
  /// Report at the end of every N-th training epoch; 0 turns epoch reports off. Default 1.
  int64_t every_n_epochs = 1;
  /// Also report every N optimizer steps (at the end of the step's batch); 0: never.
  /// Default 0.
  int64_t every_n_steps = 0;
  /// Attach a checkpoint of the fit to reports. Default true.
  bool checkpoint = true;
  /// With `checkpoint`: attach one to every N-th report only (the N-th, 2N-th, ...).
  /// Default 1 (every report).
  int64_t checkpoint_every = 1;
  /// Write checkpoints on a background thread while training goes on; the report
  /// completes once the checkpoint is durable. Default false (Ray's blocking report).
  bool async_checkpoint = false;
  /// Metrics to report; empty (default) reports every callback metric.
  std::vector<std::string> metrics = {};
};

/// Ray's RayTrainReportCallback: at each train epoch end (by default) every rank calls
/// `train::report` with the Trainer's callback metrics plus `epoch` and `step`, and a
/// checkpoint of the running fit (model, optimizers, schedulers, callbacks, progress). The
/// run persists it and `train::get_checkpoint()` hands it back after a restart. Outside a
/// TorchTrainer run its reports do nothing (`train::report` warns once) and no checkpoint
/// is taken.
class ReportCallback : public Callback {
 public:
  explicit ReportCallback(ReportOptions options = {});

  std::string state_key() const override;
  void on_train_epoch_end(Trainer& trainer, LightningModule& module) override;
  void on_train_batch_end(Trainer& trainer, LightningModule& module, const at::Tensor& loss,
                          const Batch& batch, int64_t batch_idx) override;

  /// Reports now (collective: every rank must call it at the same point).
  void report(Trainer& trainer);

 private:
  ReportOptions options_;
  int64_t last_reported_step_ = -1;
  int64_t reports_ = 0;
};

} // namespace caftrain
