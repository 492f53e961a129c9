#include "train/trainer.hpp"

#include <cmath>
#include <cstdlib>
#include <filesystem>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "callbacks/csv_logger.hpp"
#include "callbacks/progress_bar.hpp"
#include "core/error.hpp"
#include "data/loader.hpp"
#include "train/trainer_impl.hpp"
#include "train/trainer_state.hpp"

namespace caftrain {

namespace {

/// Lightning's max_epochs when neither max_epochs nor max_steps is set.
constexpr int64_t kDefaultMaxEpochs = 1000;

[[noreturn]] void bad_option(const std::string& what) {
  throw Error(Errc::invalid_config, "Trainer: " + what);
}

void check_options(const TrainerOptions& o) {
  if (o.max_epochs < -1)
    bad_option("max_epochs is " + std::to_string(o.max_epochs) + "; use -1 or a count >= 0");
  if (o.max_steps < -1)
    bad_option("max_steps is " + std::to_string(o.max_steps) + "; use -1 or a count >= 0");
  if (o.min_epochs && *o.min_epochs < 0)
    bad_option("min_epochs is " + std::to_string(*o.min_epochs) +
               "; use a count >= 0 or leave it unset (no minimum)");
  if (o.min_steps && *o.min_steps < 0)
    bad_option("min_steps is " + std::to_string(*o.min_steps) +
               "; use a count >= 0 or leave it unset (no minimum)");
  if (o.accumulate_grad_batches < 1)
    bad_option("accumulate_grad_batches is " + std::to_string(o.accumulate_grad_batches) +
               "; it must be at least 1");
  if (o.log_every_n_steps < 1)
    bad_option("log_every_n_steps must be at least 1");
  if (o.check_val_every_n_epoch && *o.check_val_every_n_epoch < 1)
    bad_option("check_val_every_n_epoch is " + std::to_string(*o.check_val_every_n_epoch) +
               "; use a count >= 1, or std::nullopt to validate every val_check_interval "
               "training batches across epochs");
  if (o.num_sanity_val_steps < -1)
    bad_option("num_sanity_val_steps must be -1 (all) or >= 0");
  if (o.gradient_clip_val && *o.gradient_clip_val < 0)
    bad_option("gradient_clip_val must not be negative");
  if (o.gradient_clip_algorithm != "norm" && o.gradient_clip_algorithm != "value")
    bad_option("gradient_clip_algorithm '" + o.gradient_clip_algorithm +
               "' is unknown; use \"norm\" or \"value\"");
  for (auto* limit : {&o.limit_train_batches, &o.limit_val_batches, &o.limit_test_batches})
    if (limit->value() < 0 || (limit->is_fraction() && limit->value() > 1.0))
      bad_option("batch limits are counts >= 0 or fractions in [0, 1]");
  if (o.val_check_interval.value() <= 0 ||
      (o.val_check_interval.is_fraction() && o.val_check_interval.value() > 1.0))
    bad_option("val_check_interval is a count >= 1 or a fraction in (0, 1]");
  if (!o.check_val_every_n_epoch && o.val_check_interval.is_fraction() &&
      o.val_check_interval.value() < 1.0)
    bad_option("val_check_interval is the fraction " + std::to_string(o.val_check_interval.value()) +
               " but check_val_every_n_epoch is unset, so it counts training batches across "
               "epochs; give it as a number of batches (e.g. val_check_interval = 100) or set "
               "check_val_every_n_epoch");
  if (o.devices != "auto" && o.devices != "1" && o.devices != "-1")
    bad_option("devices = \"" + o.devices +
               "\": a caftrain process drives one device; to use several, run several "
               "workers (ScalingConfig.num_workers) with devices = \"auto\"");
  static const char* accelerators[] = {"auto", "cpu", "gpu", "cuda"};
  if (std::find(std::begin(accelerators), std::end(accelerators), o.accelerator) ==
      std::end(accelerators))
    bad_option("accelerator '" + o.accelerator + "' is unknown; use auto, cpu, gpu or cuda");
  Precision(o.precision, c10::Device(c10::kCPU)); // validates the name (16-mixed: below)
}

int64_t batch_size_of(const Batch& batch) {
  return batch.data.defined() && batch.data.dim() > 0 ? batch.data.size(0) : 1;
}

Batch to_device(const Batch& batch, c10::Device device) {
  if (device.is_cpu())
    return batch;
  return {batch.data.to(device, /*non_blocking=*/true), batch.target.to(device, true)};
}

/// Calls `hook` on every callback, then returns.
template <class F>
void each(const std::vector<std::shared_ptr<Callback>>& callbacks, F&& hook) {
  for (auto& cb : callbacks)
    hook(*cb);
}

} // namespace

int64_t BatchLimit::of(int64_t total) const {
  if (fraction_)
    return static_cast<int64_t>(std::floor(static_cast<double>(total) * value_));
  return std::min<int64_t>(total, static_cast<int64_t>(value_));
}

// -- Trainer::Impl helpers (free functions over the state) --------------------------

namespace {

using Impl = Trainer::Impl;

c10::Device resolve_device(const Impl& s) {
  auto& acc = s.options.accelerator;
  bool cuda = torch::cuda::is_available();
  auto given = s.environment->device();
  if (!given.empty()) {
    c10::Device device(given);
    if ((acc == "gpu" || acc == "cuda") && !device.is_cuda())
      throw Error(Errc::invalid_config,
                  "accelerator = \"" + acc + "\" but this worker was given " + given +
                    "; set ScalingConfig.use_gpu = true or use accelerator = \"auto\"");
    if (acc == "cpu")
      return c10::Device(c10::kCPU);
    return device;
  }
  if (acc == "cpu")
    return c10::Device(c10::kCPU);
  if (acc == "gpu" || acc == "cuda") {
    if (!cuda)
      throw Error(Errc::unavailable, "accelerator = \"" + acc +
                                       "\" but no CUDA device is available to this process; "
                                       "use accelerator = \"cpu\" or \"auto\"");
  }
  // "auto" or GPU: one device per process, chosen by local rank.
  if (acc == "auto" && !cuda)
    return c10::Device(c10::kCPU);
  auto count = static_cast<int64_t>(torch::cuda::device_count());
  auto index = count > 0 ? s.environment->local_rank() % count : 0;
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

std::shared_ptr<Strategy> resolve_strategy(const Impl& s) {
  auto& opt = s.options.strategy;
  if (opt.instance())
    return opt.instance();
  if (opt.name() == "auto")
    return make_strategy(s.environment->world_size() > 1 ? "ddp" : "single_device");
  return make_strategy(opt.name());
}

void setup(Impl& s, std::shared_ptr<LightningModule> model) {
  if (!model)
    throw Error(Errc::invalid_argument, "Trainer: the model is null");
  s.module = std::move(model);
  TrainerAccess::attach(*s.module, s.self);
  if (s.setup_done)
    return;
  // Environment: the first ClusterEnvironment plugin, else a single process.
  for (auto& plugin : s.options.plugins)
    if (!s.environment)
      s.environment = plugin.shared();
  if (!s.environment)
    s.environment = std::make_shared<LightningEnvironment>();
  s.device = resolve_device(s);
  s.precision = std::make_unique<Precision>(s.options.precision, s.device);
  s.strategy = resolve_strategy(s);
  if (s.environment->world_size() > 1 && !s.strategy->is_distributed())
    throw Error(Errc::invalid_config,
                "strategy '" + s.strategy->name() + "' trains on one device but the environment has " +
                  std::to_string(s.environment->world_size()) +
                  " ranks; use DDPStrategy, ZeroStrategy or FSDPStrategy");
  // Callbacks: the user's, plus the progress bar unless disabled or given.
  for (auto& cb : s.options.callbacks)
    s.callbacks.push_back(cb.shared());
  bool has_bar = false;
  for (auto& cb : s.callbacks)
    has_bar = has_bar || dynamic_cast<ProgressBar*>(cb.get()) != nullptr;
  if (s.options.enable_progress_bar && !has_bar)
    s.callbacks.push_back(std::make_shared<ProgressBar>());
  // Loggers write on the global-zero rank only.
  if (s.environment->global_rank() == 0) {
    for (auto& lg : s.options.loggers)
      s.loggers.push_back(lg.shared());
    if (s.loggers.empty() && s.options.logger)
      s.loggers.push_back(std::make_shared<CSVLogger>(
        s.options.default_root_dir.empty() ? "." : s.options.default_root_dir));
  }
  s.collector.set_reducer([&s](double v) { return s.strategy->reduce(v, ReduceOp::avg); });
  s.setup_done = true;
}

void log_to_loggers(Impl& s, Metrics metrics) {
  if (metrics.empty() || s.loggers.empty())
    return;
  metrics["epoch"] = static_cast<double>(s.epoch);
  for (auto& lg : s.loggers)
    lg->log_metrics(metrics, s.global_step);
}

void merge(Metrics& into, const Metrics& from) {
  for (auto& [k, v] : from)
    into[k] = v;
}

/// The module's own step runs inside: every rank is at the same point (FSDP gathers the
/// units the step reads only there).
class ModuleStep {
 public:
  explicit ModuleStep(Strategy& strategy) : strategy_(strategy) {
    strategy_.begin_module_step();
  }
  ~ModuleStep() {
    strategy_.end_module_step();
  }
  ModuleStep(const ModuleStep&) = delete;
  ModuleStep& operator=(const ModuleStep&) = delete;

 private:
  Strategy& strategy_;
};

/// Runs one evaluation loop (validation, sanity check or test) over `loader`.
Metrics run_evaluation(Impl& s, const data::DataLoader& loader, LogScope scope, int64_t limit) {
  auto& module = *s.module;
  bool test = scope == LogScope::test;
  bool was_training = module.is_training();
  module.eval();
  torch::NoGradGuard no_grad;
  s.collector.reset_epoch(scope);
  auto& cbs = s.callbacks;
  Trainer& t = *s.self;
  if (test)
    each(cbs, [&](Callback& cb) { cb.on_test_start(t, module); });
  else {
    each(cbs, [&](Callback& cb) { cb.on_validation_start(t, module); });
    each(cbs, [&](Callback& cb) { cb.on_validation_epoch_start(t, module); });
  }
  for (int64_t i = 0; i < limit; ++i) {
    auto batch = to_device(loader.batch(static_cast<size_t>(i)), s.device);
    s.collector.begin_batch(scope, batch_size_of(batch));
    {
      ModuleStep step(*s.strategy);
      Precision::Autocast autocast(*s.precision);
      if (test)
        module.test_step(batch, i);
      else
        module.validation_step(batch, i);
    }
    if ((test && !TrainerAccess::has_test_step(module)) ||
        (!test && !TrainerAccess::has_validation_step(module)))
      break; // not overridden: nothing to evaluate
    if (test)
      each(cbs, [&](Callback& cb) { cb.on_test_batch_end(t, module, batch, i); });
    else
      each(cbs, [&](Callback& cb) { cb.on_validation_batch_end(t, module, batch, i); });
    s.collector.end_step();
  }
  // What the module logs in its epoch-end hook counts with the epoch's metrics, which the
  // callbacks' epoch-end and end hooks (EarlyStopping, ModelCheckpoint) then see.
  s.collector.begin_epoch_end(scope);
  if (test)
    module.on_test_epoch_end();
  else
    module.on_validation_epoch_end();
  auto metrics = s.collector.epoch_metrics(scope);
  if (!s.sanity) {
    merge(s.callback_metrics, metrics);
    merge(s.progress_bar_metrics, s.collector.progress_bar());
  }
  if (test) {
    each(cbs, [&](Callback& cb) { cb.on_test_epoch_end(t, module); });
    each(cbs, [&](Callback& cb) { cb.on_test_end(t, module); });
  } else {
    each(cbs, [&](Callback& cb) { cb.on_validation_epoch_end(t, module); });
    each(cbs, [&](Callback& cb) { cb.on_validation_end(t, module); });
  }
  if (!s.sanity) {
    auto logged = s.collector.epoch_metrics(scope, /*for_logger=*/true);
    merge(s.logged_metrics, logged);
    log_to_loggers(s, logged);
  }
  if (was_training)
    module.train();
  return metrics;
}

bool validation_enabled(const Impl& s) {
  return s.val_loader && s.num_val_batches > 0 && TrainerAccess::has_validation_step(*s.module);
}

void run_validation(Impl& s) {
  if (!validation_enabled(s))
    return;
  auto previous = s.stage;
  run_evaluation(s, *s.val_loader, LogScope::validation, s.num_val_batches);
  s.stage = previous;
}

void step_schedulers(Impl& s, Interval interval, int64_t count) {
  for (auto& sc : s.schedulers)
    if (sc.interval == interval && count % std::max<int64_t>(sc.frequency, 1) == 0)
      sc.scheduler->step();
}

/// One optimizer step after the last micro-batch of an accumulation window.
void optimizer_step(Impl& s) {
  auto& strategy = *s.strategy;
  Trainer& t = *s.self;
  strategy.finish_gradient_sync();
  each(s.callbacks, [&](Callback& cb) { cb.on_before_optimizer_step(t, *s.module); });
  bool take = s.precision->unscale(strategy.gradients(), strategy);
  if (take && s.options.gradient_clip_val && *s.options.gradient_clip_val > 0) {
    if (s.options.gradient_clip_algorithm == "norm")
      strategy.clip_grad_norm(*s.options.gradient_clip_val);
    else
      strategy.clip_grad_value(*s.options.gradient_clip_val);
  }
  for (auto& opt : s.optimizers) {
    if (take)
      strategy.optimizer_step(*opt);
    strategy.zero_grad(*opt);
  }
  ++s.global_step;
  step_schedulers(s, Interval::step, s.global_step);
  if (!s.memory_logged && s.environment->global_rank() == 0 && strategy.is_distributed()) {
    // Once, after the first step (when optimizer state exists): what this rank holds.
    s.memory_logged = true;
    auto m = strategy.memory_stats();
    constexpr double MiB = 1024.0 * 1024.0;
    spdlog::info("caftrain: {} on rank 0 holds {:.1f} MiB parameters, {:.1f} MiB gradients, "
                 "{:.1f} MiB optimizer state (peak transient {:.1f} MiB)",
                 strategy.name(), static_cast<double>(m.parameter_bytes) / MiB,
                 static_cast<double>(m.gradient_bytes) / MiB,
                 static_cast<double>(m.optimizer_state_bytes) / MiB,
                 static_cast<double>(m.peak_transient_bytes) / MiB);
  }
}

bool max_steps_reached(const Impl& s) {
  return s.options.max_steps >= 0 && s.global_step >= s.options.max_steps;
}

int64_t max_epochs(const Impl& s) {
  if (s.options.max_epochs >= 0)
    return s.options.max_epochs;
  return s.options.max_steps >= 0 ? std::numeric_limits<int64_t>::max() : kDefaultMaxEpochs;
}

/// Lightning's `_can_stop_early`: a stop request may end the fit once `epochs_done`
/// epochs are finished and the steps taken reach min_epochs and min_steps.
bool can_stop_early(const Impl& s, int64_t epochs_done) {
  auto& o = s.options;
  return (!o.min_epochs || epochs_done >= *o.min_epochs) &&
         (!o.min_steps || s.global_step >= *o.min_steps);
}

/// True when `should_stop` is set and may take effect now (`epochs_done` finished).
bool stop_requested(Impl& s, int64_t epochs_done) {
  if (!s.should_stop)
    return false;
  if (can_stop_early(s, epochs_done))
    return true;
  if (!s.stop_deferred_logged && s.environment->global_rank() == 0) {
    s.stop_deferred_logged = true;
    spdlog::info("caftrain: the Trainer was asked to stop, but min_epochs={} or min_steps={} is "
                 "not reached yet; training continues",
                 s.options.min_epochs ? std::to_string(*s.options.min_epochs) : "unset",
                 s.options.min_steps ? std::to_string(*s.options.min_steps) : "unset");
  }
  return false;
}

/// The integer val_check_interval must fit in an epoch while validation is per epoch
/// (Lightning's check); otherwise validation would silently never run.
void check_val_interval(const Impl& s) {
  auto& o = s.options;
  auto n = s.num_training_batches;
  if (!o.check_val_every_n_epoch || o.val_check_interval.is_fraction() || n == 0)
    return;
  auto every = static_cast<int64_t>(o.val_check_interval.value());
  if (every > n)
    bad_option("val_check_interval = " + std::to_string(every) +
               " training batches, but an epoch has only " + std::to_string(n) +
               " (after limit_train_batches), so validation would never run; use "
               "val_check_interval <= " + std::to_string(n) +
               " or a fraction of the epoch, set check_val_every_n_epoch = std::nullopt to "
               "count batches across epochs, or limit_val_batches = 0 to turn validation off");
}

void run_train_epoch(Impl& s) {
  auto& module = *s.module;
  auto& strategy = *s.strategy;
  auto& cbs = s.callbacks;
  Trainer& t = *s.self;
  auto& loader = *s.train_loader;
  loader.set_epoch(s.epoch);
  s.collector.reset_epoch(LogScope::train);
  module.train();
  module.on_train_epoch_start();
  each(cbs, [&](Callback& cb) { cb.on_train_epoch_start(t, module); });
  auto n = s.num_training_batches;
  auto k = s.options.accumulate_grad_batches;
  auto& vci = s.options.val_check_interval;
  int64_t val_every = vci.is_fraction()
                        ? std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(n) * vci.value()))
                        : static_cast<int64_t>(vci.value());
  // Per epoch (check_val_every_n_epoch set): batches count within the epoch; unset: the
  // interval counts training batches across epochs (Lightning's total_batch_idx).
  auto& every_n_epoch = s.options.check_val_every_n_epoch;
  bool val_epoch = !every_n_epoch || (s.epoch + 1) % *every_n_epoch == 0;
  int64_t batches_before = every_n_epoch ? 0 : s.epoch * n;
  int64_t first = s.resume_batch;
  s.resume_batch = 0;
  s.batches_done = first;
  s.epoch_finished = false;
  s.epoch_schedulers_stepped = false;
  for (int64_t i = first; i < n; ++i) {
    s.batch_idx = i;
    s.environment->check_stop();
    auto batch = to_device(loader.batch(static_cast<size_t>(i)), s.device);
    each(cbs, [&](Callback& cb) { cb.on_train_batch_start(t, module, batch, i); });
    bool last_micro = (i + 1) % k == 0 || i + 1 == n;
    s.collector.begin_batch(LogScope::train, batch_size_of(batch));
    strategy.set_gradient_sync(last_micro);
    strategy.before_training_step();
    at::Tensor loss;
    {
      ModuleStep step(strategy);
      Precision::Autocast autocast(*s.precision);
      loss = module.training_step(batch, i);
    }
    if (!loss.defined())
      throw Error(Errc::invalid_argument,
                  "training_step returned an undefined tensor at batch " + std::to_string(i) +
                    "; return the loss to optimise");
    // Lightning divides by k even for a shorter last window.
    strategy.backward(s.precision->scale(loss / static_cast<double>(k)));
    ++s.accumulated;
    if (last_micro) {
      optimizer_step(s);
      s.accumulated = 0;
    }
    s.batches_done = i + 1;
    auto step_metrics = s.collector.step_metrics();
    merge(s.callback_metrics, step_metrics);
    s.progress_bar_metrics = s.collector.progress_bar();
    if (last_micro && (s.global_step % s.options.log_every_n_steps == 0)) {
      auto logged = s.collector.step_metrics(/*for_logger=*/true);
      merge(s.logged_metrics, logged);
      log_to_loggers(s, logged);
    }
    each(cbs, [&](Callback& cb) { cb.on_train_batch_end(t, module, loss.detach(), batch, i); });
    s.collector.end_step();
    s.batch_idx = i + 1;
    bool max_reached = max_steps_reached(s);
    if (max_reached)
      s.should_stop = true;
    // A stop request validates before ending the fit, once min_epochs/min_steps allow it.
    bool stopping = max_reached || stop_requested(s, s.epoch);
    if (val_epoch && ((batches_before + i + 1) % val_every == 0 || stopping))
      run_validation(s);
    if (stopping || stop_requested(s, s.epoch)) // EarlyStopping decides in validation
      break;
  }
  // Stopped mid-epoch (max_steps, a stop request): the epoch-end hooks still run, as in
  // Lightning, but the epoch is not complete: a checkpoint taken now resumes at its next
  // batch, and the epoch-interval schedulers wait for its real end.
  s.epoch_finished = s.batches_done >= n;
  // What the module logs in on_train_epoch_end reaches callback_metrics before the
  // callbacks' on_train_epoch_end (ModelCheckpoint, EarlyStopping, ReportCallback).
  s.collector.begin_epoch_end(LogScope::train);
  module.on_train_epoch_end();
  merge(s.callback_metrics, s.collector.epoch_metrics(LogScope::train));
  each(cbs, [&](Callback& cb) { cb.on_train_epoch_end(t, module); });
  log_to_loggers(s, s.collector.epoch_metrics(LogScope::train, /*for_logger=*/true));
  if (s.epoch_finished) {
    step_schedulers(s, Interval::epoch, s.epoch + 1);
    s.epoch_schedulers_stepped = true;
  }
}

void finalize_loggers(Impl& s, const std::string& status) {
  for (auto& lg : s.loggers) {
    lg->save();
    lg->finalize(status);
  }
}

} // namespace

// -- Trainer --------------------------------------------------------------------------

Trainer::Trainer(TrainerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  check_options(impl_->options);
  impl_->self = this;
}

Trainer::~Trainer() = default;

Trainer::Trainer(Trainer&& other) noexcept : impl_(std::move(other.impl_)) {
  if (impl_) {
    impl_->self = this;
    if (impl_->module)
      TrainerAccess::attach(*impl_->module, this);
  }
}

Trainer& Trainer::operator=(Trainer&& other) noexcept {
  impl_ = std::move(other.impl_);
  if (impl_) {
    impl_->self = this;
    if (impl_->module)
      TrainerAccess::attach(*impl_->module, this);
  }
  return *this;
}

void Trainer::fit(std::shared_ptr<LightningModule> model, data::DataLoader train,
                  std::optional<data::DataLoader> val, const std::string& ckpt_path) {
  auto& s = *impl_;
  setup(s, std::move(model));
  auto& module = *s.module;
  s.stage = Stage::fit;
  auto world = s.environment->world_size();
  auto rank = s.environment->global_rank();
  if (s.options.use_distributed_sampler && world > 1) {
    train = train.distributed(rank, world);
    if (val)
      val = val->distributed(rank, world);
  }
  s.train_loader = std::move(train);
  s.val_loader = std::move(val);
  s.num_training_batches = s.options.limit_train_batches.of(static_cast<int64_t>(s.train_loader->size()));
  s.num_val_batches =
    s.val_loader ? s.options.limit_val_batches.of(static_cast<int64_t>(s.val_loader->size())) : 0;
  check_val_interval(s);
  try {
    s.strategy->setup(module, s.environment, s.device);
    auto configured = module.configure_optimizers();
    if (configured.optimizers.empty())
      throw Error(Errc::invalid_config, "configure_optimizers returned no optimizer");
    s.optimizers = configured.optimizers;
    s.schedulers = configured.schedulers;
    s.strategy->setup_optimizers(s.optimizers);
    for (auto& lg : s.loggers)
      lg->log_hyperparams(module.hparams());
    each(s.callbacks, [&](Callback& cb) { cb.setup(*this, module, Stage::fit); });
    if (!ckpt_path.empty())
      restore_checkpoint(*this, ckpt_path);
    module.on_fit_start();
    each(s.callbacks, [&](Callback& cb) { cb.on_fit_start(*this, module); });
    if (ckpt_path.empty() && s.options.num_sanity_val_steps != 0 && validation_enabled(s)) {
      s.sanity = true;
      auto steps = s.options.num_sanity_val_steps < 0
                     ? s.num_val_batches
                     : std::min(s.num_val_batches, s.options.num_sanity_val_steps);
      run_evaluation(s, *s.val_loader, LogScope::validation, steps);
      s.collector.clear(LogScope::validation);
      s.sanity = false;
    }
    s.training = true;
    each(s.callbacks, [&](Callback& cb) { cb.on_train_start(*this, module); });
    auto last = max_epochs(s);
    while (!stop_requested(s, s.epoch) && s.epoch < last && !max_steps_reached(s)) {
      run_train_epoch(s);
      if (!s.epoch_finished)
        break;
      // The next epoch starts here: a checkpoint taken from now on (on_train_end, or
      // save_checkpoint after fit) resumes at its first batch, not one epoch later.
      ++s.epoch;
      s.epoch_finished = false;
      s.batches_done = 0;
    }
    s.training = false;
    each(s.callbacks, [&](Callback& cb) { cb.on_train_end(*this, module); });
    module.on_fit_end();
    each(s.callbacks, [&](Callback& cb) { cb.on_fit_end(*this, module); });
    each(s.callbacks, [&](Callback& cb) { cb.teardown(*this, module, Stage::fit); });
    finalize_loggers(s, "success");
    s.strategy->teardown();
  } catch (const std::exception& e) {
    s.training = false;
    s.strategy->on_exception(e);
    for (auto& cb : s.callbacks) {
      try {
        cb->on_exception(*this, module, e);
      } catch (...) {
        // The original failure is the one to report.
      }
    }
    finalize_loggers(s, "failed");
    try {
      s.strategy->teardown();
    } catch (const std::exception& teardown_failure) {
      spdlog::warn("caftrain: the strategy's teardown after a failed fit failed too: {}",
                   teardown_failure.what());
    }
    throw;
  }
}

std::vector<Metrics> Trainer::validate(std::shared_ptr<LightningModule> model, data::DataLoader val) {
  auto& s = *impl_;
  setup(s, std::move(model));
  s.stage = Stage::validate;
  if (s.options.use_distributed_sampler && s.environment->world_size() > 1)
    val = val.distributed(s.environment->global_rank(), s.environment->world_size());
  s.strategy->setup(*s.module, s.environment, s.device);
  auto limit = s.options.limit_val_batches.of(static_cast<int64_t>(val.size()));
  auto metrics = run_evaluation(s, val, LogScope::validation, limit);
  finalize_loggers(s, "success");
  return {metrics};
}

std::vector<Metrics> Trainer::test(std::shared_ptr<LightningModule> model, data::DataLoader test) {
  auto& s = *impl_;
  setup(s, std::move(model));
  s.stage = Stage::test;
  if (s.options.use_distributed_sampler && s.environment->world_size() > 1)
    test = test.distributed(s.environment->global_rank(), s.environment->world_size());
  s.strategy->setup(*s.module, s.environment, s.device);
  auto limit = s.options.limit_test_batches.of(static_cast<int64_t>(test.size()));
  auto metrics = run_evaluation(s, test, LogScope::test, limit);
  finalize_loggers(s, "success");
  return {metrics};
}

void Trainer::save_checkpoint(const std::string& path) {
  write_checkpoint(*this, path);
}

int64_t Trainer::current_epoch() const {
  return impl_->epoch;
}

int64_t Trainer::global_step() const {
  return impl_->global_step;
}

int64_t Trainer::batch_idx() const {
  return impl_->batch_idx;
}

int64_t Trainer::num_training_batches() const {
  return impl_->num_training_batches;
}

int64_t Trainer::num_val_batches() const {
  return impl_->num_val_batches;
}

int64_t Trainer::estimated_stepping_batches() const {
  auto& s = *impl_;
  if (s.options.max_steps >= 0)
    return s.options.max_steps;
  auto k = s.options.accumulate_grad_batches;
  auto per_epoch = (s.num_training_batches + k - 1) / k;
  return per_epoch * max_epochs(s);
}

Stage Trainer::stage() const {
  return impl_->stage;
}

bool Trainer::sanity_checking() const {
  return impl_->sanity;
}

bool Trainer::training() const {
  return impl_->training;
}

bool Trainer::should_stop() const {
  return impl_->should_stop;
}

void Trainer::set_should_stop(bool value) {
  impl_->should_stop = value;
}

const Metrics& Trainer::callback_metrics() const {
  return impl_->callback_metrics;
}

const Metrics& Trainer::logged_metrics() const {
  return impl_->logged_metrics;
}

const Metrics& Trainer::progress_bar_metrics() const {
  return impl_->progress_bar_metrics;
}

const TrainerOptions& Trainer::options() const {
  return impl_->options;
}

Strategy& Trainer::strategy() const {
  if (!impl_->strategy)
    throw Error(Errc::bad_state, "Trainer::strategy() is set when fit/validate/test starts");
  return *impl_->strategy;
}

ClusterEnvironment& Trainer::environment() const {
  if (!impl_->environment)
    throw Error(Errc::bad_state, "Trainer::environment() is set when fit/validate/test starts");
  return *impl_->environment;
}

LightningModule& Trainer::lightning_module() const {
  if (!impl_->module)
    throw Error(Errc::bad_state, "the Trainer has no module before fit/validate/test");
  return *impl_->module;
}

const std::vector<std::shared_ptr<Callback>>& Trainer::callbacks() const {
  return impl_->callbacks;
}

const std::vector<std::shared_ptr<Logger>>& Trainer::loggers() const {
  return impl_->loggers;
}

const std::vector<std::shared_ptr<torch::optim::Optimizer>>& Trainer::optimizers() const {
  return impl_->optimizers;
}

const std::vector<SchedulerConfig>& Trainer::lr_scheduler_configs() const {
  return impl_->schedulers;
}

bool Trainer::is_global_zero() const {
  return global_rank() == 0;
}

int64_t Trainer::world_size() const {
  return impl_->environment ? impl_->environment->world_size() : 1;
}

int64_t Trainer::global_rank() const {
  return impl_->environment ? impl_->environment->global_rank() : 0;
}

int64_t Trainer::local_rank() const {
  return impl_->environment ? impl_->environment->local_rank() : 0;
}

int64_t Trainer::node_rank() const {
  return impl_->environment ? impl_->environment->node_rank() : 0;
}

std::string Trainer::log_dir() const {
  if (!impl_->loggers.empty())
    return impl_->loggers.front()->log_dir();
  return default_root_dir();
}

std::string Trainer::default_root_dir() const {
  return impl_->options.default_root_dir.empty() ? std::filesystem::current_path().string()
                                                  : impl_->options.default_root_dir;
}

void seed_everything(uint64_t seed) {
  torch::manual_seed(seed);
  std::srand(static_cast<unsigned>(seed));
}

std::mutex& seed_mutex() {
  static std::mutex mtx;
  return mtx;
}

} // namespace caftrain
