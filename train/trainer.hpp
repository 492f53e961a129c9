// Trainer: Lightning's training loop, for any LightningModule.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "callbacks/callback.hpp"
#include "callbacks/logger.hpp"
#include "core/config.hpp"
#include "core/handle.hpp"
#include "data/loader.hpp"
#include "environment/cluster_environment.hpp"
#include "strategies/strategy.hpp"
#include "train/lightning_module.hpp"

namespace caftrain {

/// A number of batches (an integer) or a fraction of an epoch (a double), as Lightning's
/// `limit_*_batches` and `val_check_interval` accept.
class BatchLimit {
 public:
  BatchLimit(int count) : BatchLimit(static_cast<long long>(count)) {} // NOLINT
  BatchLimit(long count) : BatchLimit(static_cast<long long>(count)) {} // NOLINT
  BatchLimit(long long count) : fraction_(false), value_(static_cast<double>(count)) {} // NOLINT
  BatchLimit(double fraction) : fraction_(true), value_(fraction) {} // NOLINT

  bool is_fraction() const noexcept {
    return fraction_;
  }

  double value() const noexcept {
    return value_;
  }

  /// The number of batches out of `total`.
  int64_t of(int64_t total) const;

 private:
  bool fraction_;
  double value_;
};

/// A strategy, given by registry name ("auto", "ddp", "fsdp", "zero", "single_device")
/// or as an object (`DDPStrategy()`, `FSDPStrategy({...})`).
class StrategyOption {
 public:
  StrategyOption(const char* name) : name_(name) {} // NOLINT
  StrategyOption(std::string name) : name_(std::move(name)) {} // NOLINT

  template <class T, class = std::enable_if_t<std::is_base_of_v<Strategy, std::decay_t<T>>>>
  StrategyOption(T&& strategy) // NOLINT
    : instance_(std::make_shared<std::decay_t<T>>(std::forward<T>(strategy))) {
    name_ = instance_->name();
  }

  template <class T, class = std::enable_if_t<std::is_base_of_v<Strategy, T>>>
  StrategyOption(std::shared_ptr<T> strategy) // NOLINT
    : instance_(std::move(strategy)) {
    name_ = instance_ ? instance_->name() : "auto";
  }

  const std::string& name() const noexcept {
    return name_;
  }

  /// The given object, or null when given by name.
  const std::shared_ptr<Strategy>& instance() const noexcept {
    return instance_;
  }

 private:
  std::string name_;
  std::shared_ptr<Strategy> instance_;
};

/// Options of a `Trainer`; defaults are Lightning's unless noted. Designated
/// initialisers must follow this order:
/// `{.max_epochs = 10, .devices = "auto", .strategy = DDPStrategy(), .callbacks = {...}}`.
struct TrainerOptions {
  /// Stop after this many epochs. Default -1: 1000, or unlimited when max_steps is set.
  int64_t max_epochs = -1;
  /// Train at least this many epochs: a stop request (`should_stop`, EarlyStopping) before
  /// then is deferred until they are done, as in Lightning; max_epochs and max_steps still
  /// end the fit. Default unset (no minimum); negative is refused.
  std::optional<int64_t> min_epochs = std::nullopt;
  /// Stop after this many optimizer steps, even mid-epoch. Default -1: no limit.
  int64_t max_steps = -1;
  /// Take at least this many optimizer steps before a stop request may end the fit
  /// (checked like min_epochs; both must be reached). Default unset; negative is refused.
  std::optional<int64_t> min_steps = std::nullopt;
  /// Devices per process: "auto" or "1". One device per worker; scale with num_workers.
  std::string devices = "auto";
  /// "auto" (the worker's device, else a GPU if present, else CPU), "cpu", "gpu" or "cuda".
  std::string accelerator = "auto";
  /// The strategy. Default "auto": DDP when the environment has several ranks.
  StrategyOption strategy = "auto";
  /// "32-true" (default), "bf16-mixed" (CPU or GPU autocast) or "16-mixed" (GPU only).
  std::string precision = "32-true";
  /// Plugins; a ClusterEnvironment among them says where this process stands.
  std::vector<Handle<ClusterEnvironment>> plugins = {};
  /// Callbacks, called in order.
  std::vector<Handle<Callback>> callbacks = {};
  /// Loggers. When empty and `logger` is true: a CSVLogger under default_root_dir.
  std::vector<Handle<Logger>> loggers = {};
  /// Use the default CSVLogger when no loggers are given. Default true.
  bool logger = true;
  /// Training batches per epoch: a count or a fraction. Default 1.0 (all).
  BatchLimit limit_train_batches = 1.0;
  /// Validation batches per validation run. Default 1.0 (all).
  BatchLimit limit_val_batches = 1.0;
  /// Test batches per test run. Default 1.0 (all).
  BatchLimit limit_test_batches = 1.0;
  /// Validate every N training batches (integer) or fraction of an epoch. Default 1.0.
  /// With check_val_every_n_epoch set, an integer N counts batches within each epoch and
  /// must not exceed the batches of an epoch; with it unset, N counts training batches
  /// across epochs (validation after global batches N, 2N, ...).
  BatchLimit val_check_interval = 1.0;
  /// Validate in every N-th epoch (at val_check_interval within it). Default 1. Unset
  /// (`std::nullopt`): validation follows an integer val_check_interval across epochs only.
  std::optional<int64_t> check_val_every_n_epoch = 1;
  /// Validation batches run before training as a sanity check. Default 2.
  int64_t num_sanity_val_steps = 2;
  /// Log (to the loggers) every N optimizer steps. Default 50.
  int64_t log_every_n_steps = 50;
  /// Accumulate gradients of k batches per optimizer step. Default 1.
  int64_t accumulate_grad_batches = 1;
  /// Clip gradients to this value (norm or value). Default: no clipping.
  std::optional<double> gradient_clip_val = std::nullopt;
  /// "norm" (default) or "value".
  std::string gradient_clip_algorithm = "norm";
  /// Show the terminal progress bar (rank 0 only). Default true.
  bool enable_progress_bar = true;
  /// Root of logs and checkpoints. Default "" (the current directory).
  std::string default_root_dir = "";
  /// Give each rank its own shard of the training and validation data. Default true.
  bool use_distributed_sampler = true;
};

/// Lightning's `Trainer`: runs fit, validate and test of a LightningModule with the
/// configured strategy, callbacks, loggers and limits.
class Trainer {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Checks the options; throws `Error(invalid_config)` naming a bad one.
  explicit Trainer(TrainerOptions options = {});
  ~Trainer();
  Trainer(Trainer&&) noexcept;
  Trainer& operator=(Trainer&&) noexcept;

  // -- entry points -----------------------------------------------------------------

  /// Trains `model` on `train` (validating on `val` if given). With `ckpt_path`, resumes
  /// from that checkpoint directory: epoch, step, optimizer and scheduler state, callback
  /// state and the data order continue where they stopped.
  void fit(std::shared_ptr<LightningModule> model, data::DataLoader train,
           std::optional<data::DataLoader> val = std::nullopt, const std::string& ckpt_path = "");

  /// Runs validation once; returns the epoch-level metrics logged (one dict per loader).
  std::vector<Metrics> validate(std::shared_ptr<LightningModule> model, data::DataLoader val);

  /// Runs the test loop once; returns the epoch-level metrics logged.
  std::vector<Metrics> test(std::shared_ptr<LightningModule> model, data::DataLoader test);

  /// Writes a checkpoint of the running fit to directory `path` (atomically).
  void save_checkpoint(const std::string& path);

  // -- progress ---------------------------------------------------------------------

  /// The epoch being trained (0-based); after fit, the number of epochs completed.
  int64_t current_epoch() const;

  /// Optimizer steps taken so far.
  int64_t global_step() const;

  /// Index of the training batch being processed in the current epoch.
  int64_t batch_idx() const;

  /// Batches per training epoch after limits (on this rank).
  int64_t num_training_batches() const;

  /// Batches per validation run after limits (on this rank).
  int64_t num_val_batches() const;

  /// Total optimizer steps fit will take (max_steps, or epochs x steps per epoch).
  int64_t estimated_stepping_batches() const;

  /// What the Trainer is doing now.
  Stage stage() const;
  bool sanity_checking() const;
  bool training() const;

  /// True once a callback (or max_steps) asked to stop; fit ends after the current batch.
  bool should_stop() const;
  void set_should_stop(bool value);

  // -- metrics ----------------------------------------------------------------------

  /// Every metric logged so far, latest values: what callbacks such as EarlyStopping and
  /// ReportCallback read.
  const Metrics& callback_metrics() const;

  /// Metrics sent to the loggers.
  const Metrics& logged_metrics() const;

  /// Metrics with prog_bar = true.
  const Metrics& progress_bar_metrics() const;

  // -- setup ------------------------------------------------------------------------

  const TrainerOptions& options() const;
  Strategy& strategy() const;
  ClusterEnvironment& environment() const;
  LightningModule& lightning_module() const;
  const std::vector<std::shared_ptr<Callback>>& callbacks() const;
  const std::vector<std::shared_ptr<Logger>>& loggers() const;
  const std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers() const;
  const std::vector<SchedulerConfig>& lr_scheduler_configs() const;

  bool is_global_zero() const;
  int64_t world_size() const;
  int64_t global_rank() const;
  int64_t local_rank() const;
  int64_t node_rank() const;

  /// Where logs go: the first logger's directory, else default_root_dir.
  std::string log_dir() const;
  std::string default_root_dir() const;

  // -- internal ---------------------------------------------------------------------

  struct Impl;

  Impl& impl() const noexcept {
    return *impl_;
  }

 private:
  std::unique_ptr<Impl> impl_;
};

/// Fixes the seed of libtorch's global generator (and the C library's). Worker threads
/// of one process share that generator; build models inside `with_seed` when several
/// in-process ranks must initialise identically.
void seed_everything(uint64_t seed);

/// Runs `fn` with libtorch's global generator seeded with `seed`, serialised against
/// other `with_seed` calls of this process: deterministic initialisation even when
/// several workers of one process build their models at once.
template <class F>
auto with_seed(uint64_t seed, F&& fn) -> decltype(fn());

/// The lock `with_seed` holds (one per process).
std::mutex& seed_mutex();

template <class F>
auto with_seed(uint64_t seed, F&& fn) -> decltype(fn()) {
  std::lock_guard<std::mutex> guard(seed_mutex());
  seed_everything(seed);
  return fn();
}

} // namespace caftrain
