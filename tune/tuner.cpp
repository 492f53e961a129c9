#include "tune/tuner.hpp"

#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <random>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "actors/messages.hpp"
#include "actors/run_files.hpp"
#include "actors/torch_trainer.hpp"
#include "actors/worker.hpp"
#include "actors/worker_process.hpp"
#include "checkpoint/files.hpp"
#include "core/error.hpp"
#include "tune/basic_variant_generator.hpp"
#include "tune/fifo_scheduler.hpp"
#include "tune/tuner_actor.hpp"

namespace caftrain::tune {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void refuse(const std::string& what) {
  throw Error(Errc::invalid_config, "Tuner: " + what);
}

} // namespace

struct Tuner::Impl {
  caf::actor_system* system = nullptr;
  std::shared_ptr<TunerSpec> spec;
  caf::actor actor;
  std::optional<ResultGrid> result;
  bool started = false;

  ~Impl() {
    // A tuner actor that was never started would keep the actor system from shutting down.
    if (!started && actor)
      caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
  }
};

namespace {

/// The grid of an ended experiment, read back from its directory (after `start()`, the
/// tuner actor ends with its experiment). False when the directory holds none.
bool read_back(const TunerSpec& spec, ResultGrid& grid) {
  auto& dir = spec.dir;
  std::vector<RestoredTrial> trials;
  try {
    trials = read_experiment_state(dir);
    auto bytes = read_file((fs::path(dir) / "experiment_state.json").string());
    auto state = nlohmann::json::parse(bytes.begin(), bytes.end());
    if (state.value("state", "") != "finished")
      return false;
    std::optional<RunError> error;
    if (!state.value("error", std::string()).empty())
      error = RunError{static_cast<Errc>(state.value("error_code", 0)), state.value("error", "")};
    std::vector<TrialResult> results;
    for (auto& t : trials) {
      TrialResult r;
      try {
        static_cast<Result&>(r) = Result::from_path((fs::path(dir) / t.id).string());
      } catch (const Error&) {
        r.path = (fs::path(dir) / t.id).string(); // never ran
      }
      if (!t.last.empty())
        r.metrics = t.last;
      r.trial_id = t.id;
      r.config = t.config;
      r.status = t.status;
      if (t.status == "TERMINATED" && r.error && r.error->code == Errc::cancelled)
        r.error.reset();
      if (t.status == "ERROR" && !r.error)
        r.error = RunError{Errc::worker_failed, t.error};
      results.push_back(std::move(r));
    }
    auto& tc = spec.options.tune_config;
    grid = ResultGrid(dir, std::move(results), tc.metric, tc.mode, error);
    return true;
  } catch (const Error&) {
    return false;
  } catch (const std::exception&) {
    return false;
  }
}

} // namespace

Tuner::Tuner(caf::actor_system& system, TrainFunc trainable, TunerOptions options)
  : Tuner(system, std::move(trainable), std::move(options), {}) {
  // nop
}

bool Tuner::can_restore(const std::string& path) {
  std::error_code ec;
  return fs::exists(fs::path(expand_home(path)) / "experiment_state.json", ec);
}

Tuner Tuner::restore(caf::actor_system& system, const std::string& path, TrainFunc trainable,
                     TunerOptions options) {
  auto dir = fs::absolute(expand_home(path)).lexically_normal();
  if (dir.has_filename() == false)
    dir = dir.parent_path();
  std::string name;
  auto trials = read_experiment_state(dir.string(), &name);
  if (name != dir.filename().string())
    refuse("'" + dir.string() + "' holds experiment '" + name +
           "' under another name; restore it from a directory named after it");
  options.run_config.name = name;
  options.run_config.storage_path = dir.parent_path().string();
  return Tuner(system, std::move(trainable), std::move(options), std::move(trials));
}

Tuner::Tuner(caf::actor_system& system, TrainFunc trainable, TunerOptions options,
             std::vector<RestoredTrial> restored)
  : impl_(std::make_unique<Impl>()) {
  if (!trainable)
    refuse("the trainable is empty");
  auto& tc = options.tune_config;
  if (tc.num_samples == 0 || tc.num_samples < -1)
    refuse("TuneConfig.num_samples is " + std::to_string(tc.num_samples) +
           "; use a positive count, or -1 to sample until time_budget_s");
  if (tc.max_concurrent_trials < 0)
    refuse("TuneConfig.max_concurrent_trials must not be negative (0: as many as fit)");
  if (tc.time_budget_s < 0)
    refuse("TuneConfig.time_budget_s must not be negative (0: no limit)");
  if (!tc.mode.empty() && tc.mode != "min" && tc.mode != "max")
    refuse("TuneConfig.mode '" + tc.mode + "' is unknown; use \"min\" or \"max\"");
  if (tc.metric.empty() != tc.mode.empty())
    refuse("TuneConfig.metric and TuneConfig.mode go together; set both or neither");
  if (tc.num_samples == -1 && tc.time_budget_s <= 0 && !tc.search_alg)
    refuse("TuneConfig.num_samples = -1 samples forever; set time_budget_s to end the experiment");
  if (!tc.search_alg)
    tc.search_alg = std::make_shared<BasicVariantGenerator>(
      ParamSpace{}, BasicVariantGeneratorOptions{tc.num_samples, tc.seed});
  if (!tc.search_alg->set_search_properties(tc.metric, tc.mode, options.param_space))
    refuse("the search algorithm already has a metric, mode or search space that differs from "
           "TuneConfig's and param_space; set them in one place");
  if (!tc.scheduler)
    tc.scheduler = std::make_shared<FIFOScheduler>();
  if (!tc.scheduler->set_search_properties(tc.metric, tc.mode))
    refuse("the scheduler's metric or mode ('" + tc.scheduler->metric() + "', '" +
           tc.scheduler->mode() + "') differs from TuneConfig's ('" + tc.metric + "', '" + tc.mode +
           "'); set them in one place");
  if (options.report_interval_s <= 0)
    refuse("report_interval_s must be positive");
  // What every trial's run will be checked against, before anything starts.
  TorchTrainerOptions probe;
  probe.scaling = options.scaling;
  probe.torch_config = options.torch_config;
  probe.run = options.run_config;
  probe.run.name = "trial";
  auto on_cluster = cluster_of(system).has_value();
  try {
    validate(probe, !on_cluster && !is_worker_process()); // a node's worker holds one bundle
  } catch (const Error& e) {
    refuse(std::string("a trial's run would be refused: ") + e.what());
  }
  if (on_cluster && options.scaling.worker_mode != "process")
    refuse("this program is connected to a cluster (caftrain::connect), whose nodes run a "
           "trial's workers as processes; set ScalingConfig.worker_mode = \"process\"");
  auto spec = std::make_shared<TunerSpec>();
  spec->trainable = std::move(trainable);
  spec->name = options.run_config.name.empty() ? timestamped_name("Tuner") : options.run_config.name;
  spec->dir = fs::absolute(fs::path(storage_root(options.run_config.storage_path)) / spec->name)
                .lexically_normal()
                .string();
  if (options.scaling.worker_mode == "process")
    spec->job = detail::next_job(); // as a TorchTrainer's: the same number in every process
  impl_->system = &system;
  if (is_worker_process()) {
    // A trial's worker process runs the program up to here: the trial's run and its
    // directory are the driver's; nothing is created or spawned.
    spec->options = std::move(options);
    impl_->spec = spec;
    return;
  }
  std::error_code ec;
  if (restored.empty() && fs::exists(fs::path(spec->dir) / "experiment_state.json", ec))
    refuse("'" + spec->dir + "' holds an experiment already; continue it with Tuner::restore, "
           "or choose another RunConfig.name");
  spec->restored = std::move(restored);
  fs::create_directories(spec->dir, ec);
  if (ec)
    throw Error(Errc::io_error, "Tuner: cannot create the experiment directory '" + spec->dir +
                                  "': " + ec.message());
  spec->options = std::move(options);
  impl_->spec = spec;
  impl_->actor = system.spawn(tuner_actor, std::move(spec));
}

Tuner::~Tuner() = default;
Tuner::Tuner(Tuner&&) noexcept = default;
Tuner& Tuner::operator=(Tuner&&) noexcept = default;

namespace {

/// In a worker process: runs the trial's rank when this process was started for one of
/// this Tuner's trials (and then never returns); else the grid of an inert Tuner.
ResultGrid run_if_my_job(caf::actor_system& system, const TunerSpec& spec) {
  if (spec.job >= 0) {
    RunSpec run;
    run.train_func = spec.trainable;
    run.options.scaling = spec.options.scaling;
    run.options.torch_config = spec.options.torch_config;
    run.options.run = spec.options.run_config;
    run.job = spec.job;
    if (detail::is_my_job(run))
      detail::run_worker_process(system, run); // the trial's config and run come from the driver
  }
  auto& env = *detail::worker_process_env();
  auto& tc = spec.options.tune_config;
  return ResultGrid(spec.dir, {}, tc.metric, tc.mode,
                    RunError{Errc::cancelled, "this process is a worker process of run '" + env.run_name +
                                                "' (process-mode job #" + std::to_string(env.job) +
                                                " of the program); no other Tuner runs here"});
}

} // namespace

ResultGrid Tuner::fit() {
  if (impl_->result)
    return *impl_->result;
  if (is_worker_process()) {
    impl_->result = run_if_my_job(*impl_->system, *impl_->spec);
    return *impl_->result;
  }
  impl_->started = true;
  caf::scoped_actor self{*impl_->system};
  ResultGrid grid;
  std::optional<RunError> failed;
  self->request(impl_->actor, caf::infinite, fit_atom::value)
    .receive([&](ResultGrid& g) { grid = std::move(g); },
             [&](caf::error& err) {
               // Started with start() and over already: the actor ended with its
               // experiment, whose results are on disk.
               failed = to_run_error(err);
               if (err == caf::sec::request_receiver_down)
                 failed->code = Errc::bad_state;
             });
  if (failed && read_back(*impl_->spec, grid))
    failed.reset();
  if (failed)
    throw Error(failed->code == Errc::none ? Errc::bad_state : failed->code,
                "Tuner: the tuner actor of '" + impl_->spec->name + "' ended without a result (" +
                  failed->message + "); its trials are in '" + impl_->spec->dir + "'");
  impl_->result = grid;
  return grid;
}

caf::actor Tuner::start() {
  if (is_worker_process()) {
    impl_->result = run_if_my_job(*impl_->system, *impl_->spec);
    return impl_->actor; // none: this Tuner does not run here
  }
  impl_->started = true;
  caf::anon_send(impl_->actor, start_atom::value);
  return impl_->actor;
}

const caf::actor& Tuner::actor() const noexcept {
  return impl_->actor;
}

const std::string& Tuner::path() const {
  return impl_->spec->dir;
}

const std::string& Tuner::name() const {
  return impl_->spec->name;
}

} // namespace caftrain::tune
