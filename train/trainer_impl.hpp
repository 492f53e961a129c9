// Trainer::Impl: the loop's state. Internal to train/; not part of the public API.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include <c10/core/Device.h>

#include "checkpoint/state_dict.hpp"
#include "data/loader.hpp"
#include "train/metrics_collector.hpp"
#include "train/precision.hpp"
#include "train/trainer.hpp"

namespace caftrain {

/// The Trainer's access to a LightningModule's private bookkeeping.
struct TrainerAccess {
  static void attach(LightningModule& module, Trainer* trainer) {
    module.trainer_ = trainer;
  }
  static bool has_validation_step(const LightningModule& module) {
    return module.has_validation_step_;
  }
  static bool has_test_step(const LightningModule& module) {
    return module.has_test_step_;
  }
};

struct Trainer::Impl {
  explicit Impl(TrainerOptions opts) : options(std::move(opts)) {
    // nop
  }

  // -- configuration ------------------------------------------------------------------

  TrainerOptions options;
  Trainer* self = nullptr;
  std::vector<std::shared_ptr<Callback>> callbacks;
  std::vector<std::shared_ptr<Logger>> loggers;
  std::shared_ptr<ClusterEnvironment> environment;
  std::shared_ptr<Strategy> strategy;
  std::shared_ptr<LightningModule> module;
  std::vector<std::shared_ptr<torch::optim::Optimizer>> optimizers;
  std::vector<SchedulerConfig> schedulers;
  c10::Device device{c10::kCPU};
  std::unique_ptr<Precision> precision;
  bool setup_done = false;
  /// Where checkpoint snapshots copy the model and optimizer state (reused from one
  /// checkpoint to the next: a checkpoint's worth of memory for the fit's lifetime).
  TensorCopies snapshot_copies;

  // -- progress -----------------------------------------------------------------------

  int64_t epoch = 0;
  int64_t global_step = 0;
  int64_t batch_idx = 0;
  /// Where a resumed fit starts: first batch of `epoch` to run.
  int64_t resume_batch = 0;
  /// Training batches of the current epoch whose backward (and step) are done: where a
  /// checkpoint taken now resumes.
  int64_t batches_done = 0;
  /// True from the end of an epoch's last batch until the next epoch starts; a
  /// checkpoint taken then resumes at the next epoch.
  bool epoch_finished = false;
  /// True once the epoch-interval schedulers stepped for the finished epoch.
  bool epoch_schedulers_stepped = false;
  /// Micro-batches since the last optimizer step (gradient accumulation).
  int64_t accumulated = 0;
  int64_t num_training_batches = 0;
  int64_t num_val_batches = 0;
  Stage stage = Stage::fit;
  bool sanity = false;
  bool training = false;
  bool memory_logged = false; // the strategy's memory_stats were logged (after the first step)
  bool should_stop = false;
  bool stop_deferred_logged = false; // said once that min_epochs/min_steps defer a stop

  // -- metrics ------------------------------------------------------------------------

  MetricsCollector collector;
  Metrics callback_metrics;
  Metrics logged_metrics;
  Metrics progress_bar_metrics;

  // -- data ---------------------------------------------------------------------------

  std::optional<data::DataLoader> train_loader;
  std::optional<data::DataLoader> val_loader;
};

} // namespace caftrain
