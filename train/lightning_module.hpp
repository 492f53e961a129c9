// LightningModule: a torch::nn::Module that knows how to train itself.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/data/example.h>
#include <torch/nn/module.h>

#include "core/config.hpp"
#include "train/lr_scheduler.hpp"

namespace torch::optim {
class Optimizer;
}

namespace caftrain {

class Trainer;
using Batch = torch::data::Example<>;

/// When a scheduler steps.
enum class Interval { epoch, step };

/// One learning-rate scheduler and when it steps (Lightning's lr_scheduler_config).
struct SchedulerConfig {
  /// The scheduler.
  std::shared_ptr<LRScheduler> scheduler;
  /// Step after every epoch (default) or every optimizer step.
  Interval interval = Interval::epoch;
  /// Step every `frequency` intervals. Default 1.
  int64_t frequency = 1;
};

/// What `configure_optimizers` returns: one or more optimizers and optional schedulers.
/// Converts from a single optimizer, as in the seed's `return Adam(...)`.
struct Optimizers {
  std::vector<std::shared_ptr<torch::optim::Optimizer>> optimizers;
  std::vector<SchedulerConfig> schedulers;

  Optimizers() = default;

  template <class T, class = std::enable_if_t<std::is_base_of_v<torch::optim::Optimizer, T>>>
  Optimizers(std::shared_ptr<T> optimizer) // NOLINT: implicit like the seed's return value
    : optimizers{std::move(optimizer)} {
    // nop
  }

  Optimizers(std::shared_ptr<torch::optim::Optimizer> optimizer, SchedulerConfig scheduler)
    : optimizers{std::move(optimizer)}, schedulers{std::move(scheduler)} {
    // nop
  }
};

/// Options of `LightningModule::log`. Unset on_step/on_epoch take Lightning's defaults:
/// on_step in training_step, on_epoch in validation_step and test_step.
struct LogOptions {
  /// Show in the progress bar. Default false.
  bool prog_bar = false;
  /// Log the value of each step. Default: true in training, false otherwise.
  std::optional<bool> on_step;
  /// Log the batch-size-weighted mean over the epoch. Default: false in training, true otherwise.
  std::optional<bool> on_epoch;
  /// Average the value over all ranks before it is recorded. Default false.
  bool sync_dist = false;
  /// Send to the loggers (CSV, ...). Default true.
  bool logger = true;
};

/// Lightning's `LightningModule`: a module plus the code that trains it. Subclasses
/// register their layers as usual and override `training_step` and
/// `configure_optimizers`; `validation_step` and `test_step` are optional.
class LightningModule : public torch::nn::Module {
 public:
  // -- constructors -----------------------------------------------------------------

  LightningModule();
  explicit LightningModule(const std::string& name);
  ~LightningModule() override;

  // -- what the user writes -----------------------------------------------------------

  /// The loss of one training batch; the Trainer calls backward on it.
  virtual at::Tensor training_step(const Batch& batch, int64_t batch_idx) = 0;

  /// Evaluates one validation batch, typically logging metrics. Optional.
  virtual void validation_step(const Batch& batch, int64_t batch_idx);

  /// Evaluates one test batch, typically logging metrics. Optional.
  virtual void test_step(const Batch& batch, int64_t batch_idx);

  /// The optimizers (and schedulers) that train this module's parameters.
  virtual Optimizers configure_optimizers() = 0;

  // -- optional hooks ---------------------------------------------------------------

  virtual void on_fit_start() {}
  virtual void on_fit_end() {}
  virtual void on_train_epoch_start() {}
  virtual void on_train_epoch_end() {}
  virtual void on_validation_epoch_end() {}
  virtual void on_test_epoch_end() {}

  // -- logging ----------------------------------------------------------------------

  /// Records a metric (a scalar tensor or a number) for the progress bar, the loggers and
  /// `Trainer::callback_metrics`. Outside a running Trainer this does nothing.
  void log(const std::string& name, const at::Tensor& value, LogOptions options = {});
  void log(const std::string& name, double value, LogOptions options = {});
  void log_dict(const Metrics& values, LogOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// The Trainer running this module; throws `Error(bad_state)` when none is.
  Trainer& trainer() const;

  bool has_trainer() const noexcept {
    return trainer_ != nullptr;
  }

  int64_t current_epoch() const;
  int64_t global_step() const;

  /// The device the module's parameters are on.
  torch::Device device() const;

  /// Hyperparameters recorded with `save_hyperparameters` (saved in checkpoints and by
  /// the loggers).
  const Config& hparams() const noexcept {
    return hparams_;
  }

  void save_hyperparameters(Config hparams) {
    hparams_ = std::move(hparams);
  }

 private:
  friend class Trainer;
  friend struct TrainerAccess;

  Trainer* trainer_ = nullptr;
  bool has_validation_step_ = true;
  bool has_test_step_ = true;
  Config hparams_;
};

} // namespace caftrain
