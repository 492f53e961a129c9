#include "actors/torch_trainer.hpp"

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <algorithm>
#include <filesystem>
#include <random>
#include <thread>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include "actors/cluster.hpp"
#include "actors/messages.hpp"
#include "actors/placed_run.hpp"
#include "actors/run_files.hpp"
#include "actors/trainer_actor.hpp"
#include "actors/worker.hpp"
#include "actors/worker_process.hpp"
#include "checkpoint/checkpoint_manager.hpp"
#include "checkpoint/files.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void refuse(Errc code, const std::string& what) {
  throw Error(code, "TorchTrainer: " + what);
}

/// Joins `items` with "; ".
std::string joined(const std::vector<std::string>& items) {
  std::string text;
  for (auto& item : items)
    text += (text.empty() ? "" : "; ") + item;
  return text;
}

/// Makes the directory of a new TorchTrainer's run. When it holds a run of that name
/// already, that run is resumed (Ray's behaviour): the trainer actor adopts its
/// checkpoints and history, and the options given now replace the stored ones. Anything
/// else in the way is refused, naming it.
void prepare_run_directory(const RunSpec& spec) {
  auto& dir = spec.dir;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    refuse(Errc::invalid_config, "the run directory '" + dir +
                                   "' exists and is not a directory; choose another "
                                   "RunConfig.name or storage_path");
  if (!fs::exists(dir, ec) || fs::is_empty(dir, ec)) {
    fs::create_directories(dir, ec);
    if (ec)
      refuse(Errc::io_error, "cannot create run directory '" + dir + "': " + ec.message());
    return;
  }
  if (!has_run_file(dir))
    refuse(Errc::invalid_config, "the run directory '" + dir + "' exists but holds no run (it has no " +
                                   kRunFile + "); choose another RunConfig.name or storage_path, "
                                              "or remove the directory");
  StoredRun stored;
  try {
    stored = read_run_file(dir);
  } catch (const Error& e) {
    refuse(e.code(), std::string("cannot resume run '") + spec.name + "': " + e.what());
  }
  if (stored.name != spec.name)
    refuse(Errc::invalid_config, "the run directory '" + dir + "' holds run '" + stored.name +
                                   "', not '" + spec.name + "'; continue it with "
                                   "TorchTrainer::restore, or choose another RunConfig.name");
  auto checkpoints = find_checkpoints(dir, spec.name);
  auto reports = read_history(dir, spec.name).size();
  spdlog::info("caftrain: resuming run '{}' in '{}' from {} ({} reports so far)", spec.name, dir,
               checkpoints.empty() ? std::string("the start (it has no checkpoint)")
                                   : "its latest checkpoint '" + checkpoints.back().path() + "'",
               reports);
  auto changes = run_file_changes(stored, spec.options);
  if (!changes.empty())
    spdlog::warn("caftrain: run '{}' resumes with options that differ from its {}; the new "
                 "ones apply (and are stored): {}",
                 spec.name, kRunFile, joined(changes));
}

} // namespace

std::vector<ResourceSet> ScalingConfig::worker_bundles() const {
  auto n = std::max<int64_t>(num_workers, 1);
  auto cores = static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
  ResourceSet bundle = ResourceSet::from_map(resources_per_worker.custom);
  bundle.set("CPU", resources_per_worker.cpus > 0 ? resources_per_worker.cpus
                                                  : std::min(1.0, cores / static_cast<double>(n)));
  if (use_gpu)
    bundle.set("GPU", std::max(resources_per_worker.gpus, 1.0));
  std::vector<ResourceSet> bundles(static_cast<size_t>(n), bundle);
  bundles.front() += ResourceSet::from_map(trainer_resources.custom);
  ResourceSet trainer;
  trainer.set("CPU", trainer_resources.cpus);
  trainer.set("GPU", trainer_resources.gpus);
  bundles.front() += trainer;
  return bundles;
}

ResourceSet ScalingConfig::total_resources() const {
  ResourceSet sum;
  for (auto& b : worker_bundles())
    sum += b;
  return sum;
}

std::string resolve_backend(const TorchTrainerOptions& o) {
  auto& b = o.torch_config.backend;
  if (b != "auto")
    return b;
  if (o.scaling.use_gpu)
    return "nccl";
  return o.scaling.worker_mode == "process" ? "gloo" : "local";
}

void validate(const TorchTrainerOptions& o, bool this_machine) {
  auto& s = o.scaling;
  static const char* backends[] = {"auto", "local", "gloo", "nccl"};
  auto& b = o.torch_config.backend;
  if (std::find(std::begin(backends), std::end(backends), b) == std::end(backends))
    refuse(Errc::invalid_config, "TorchConfig.backend '" + b +
                                   "' is unknown; use \"auto\", \"local\", \"gloo\" or \"nccl\"");
  if (b == "nccl" && !s.use_gpu)
    refuse(Errc::invalid_config, "TorchConfig.backend \"nccl\" needs GPU workers; set "
                                 "ScalingConfig.use_gpu = true or use \"gloo\"");
  if (b == "local" && s.use_gpu)
    refuse(Errc::invalid_config, "TorchConfig.backend \"local\" reduces CPU tensors; GPU "
                                 "workers use \"nccl\" (or \"auto\")");
  if (s.worker_mode != "thread" && s.worker_mode != "process")
    refuse(Errc::invalid_config, "ScalingConfig.worker_mode '" + s.worker_mode +
                                   "' is unknown; use \"thread\" (workers are threads of this "
                                   "process) or \"process\" (each worker its own process)");
  if (o.run.failure.warm_spares && s.worker_mode != "process")
    refuse(Errc::invalid_config, "FailureConfig.warm_spares keeps spare worker processes; set "
                                 "ScalingConfig.worker_mode = \"process\" (thread workers restart "
                                 "without starting anything)");
  if (b == "local" && s.worker_mode == "process")
    refuse(Errc::invalid_config, "TorchConfig.backend \"local\" joins threads of one process; "
                                 "worker processes use \"gloo\" (or \"auto\")");
  if (s.num_workers < 1)
    refuse(Errc::invalid_config, "ScalingConfig.num_workers is " + std::to_string(s.num_workers) +
                                   "; a run needs at least 1 worker");
  try {
    placement_strategy_from_string(s.placement_strategy);
    ResourceSet::from_map(s.resources_per_worker.custom);
    ResourceSet::from_map(s.trainer_resources.custom);
  } catch (const Error& e) {
    refuse(Errc::invalid_config, std::string("ScalingConfig: ") + e.what());
  }
  if (s.resources_per_worker.cpus < 0 || s.resources_per_worker.gpus < 0)
    refuse(Errc::invalid_config, "ScalingConfig.resources_per_worker must not be negative");
  auto cores = static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
  auto wanted = s.resources_per_worker.cpus * static_cast<double>(s.num_workers) +
                s.trainer_resources.cpus;
  if (wanted > cores && this_machine)
    refuse(Errc::invalid_config,
           "ScalingConfig asks for " + std::to_string(wanted) + " CPUs but this node has " +
             std::to_string(static_cast<int>(cores)) +
             "; lower resources_per_worker.cpus (0 shares the cores evenly) or num_workers");
  if (s.use_gpu && this_machine) {
    if (!torch::cuda::is_available())
      refuse(Errc::unavailable,
             "ScalingConfig.use_gpu is true but no CUDA GPU is visible to this process "
             "(this libtorch build or machine has none); set use_gpu = false to train on CPU");
    auto gpus = static_cast<int64_t>(torch::cuda::device_count());
    if (gpus < s.num_workers)
      refuse(Errc::unavailable, "ScalingConfig wants a GPU for each of " +
                                  std::to_string(s.num_workers) + " workers but this node has " +
                                  std::to_string(gpus));
  } else if (!s.use_gpu && s.resources_per_worker.gpus > 0) {
    refuse(Errc::invalid_config,
           "resources_per_worker.gpus is set but use_gpu is false; set use_gpu = true");
  }
  if (s.resources_per_worker.gpus > 1)
    refuse(Errc::invalid_config, "a worker drives one GPU; use more workers for more GPUs");
  auto& r = o.run;
  if (r.failure.max_failures < -1)
    refuse(Errc::invalid_config, "FailureConfig.max_failures is " +
                                   std::to_string(r.failure.max_failures) +
                                   "; use -1 (unlimited), 0 (none) or a positive count");
  CheckpointManager check(RetentionPolicy{r.checkpoint.num_to_keep,
                                          r.checkpoint.checkpoint_score_attribute,
                                          r.checkpoint.checkpoint_score_order});
  if (r.report_timeout.count() <= 0 || r.collective_timeout.count() <= 0 ||
      r.stop_grace.count() < 0)
    refuse(Errc::invalid_config, "RunConfig timeouts must be positive");
  if (!r.name.empty() && (r.name.find('/') != std::string::npos || r.name == "." || r.name == ".."))
    refuse(Errc::invalid_config, "RunConfig.name '" + r.name + "' must be a plain directory name");
}

TorchTrainer::TorchTrainer(caf::actor_system& system, std::shared_ptr<RunSpec> spec)
  : system_(&system), spec_(std::move(spec)) {
  if (spec_->options.scaling.worker_mode == "process")
    spec_->job = detail::next_job();
  if (!is_worker_process())
    actor_ = system.spawn(trainer_actor, spec_);
}

namespace {

/// The checked and prepared spec of a new (or resumed-by-name) run.
std::shared_ptr<RunSpec> make_run_spec(caf::actor_system& system, TrainFunc train_func,
                                       TorchTrainerOptions options) {
  if (!train_func)
    refuse(Errc::invalid_config, "train_func is empty");
  auto on_cluster = cluster_of(system).has_value();
  if (on_cluster && options.scaling.worker_mode != "process")
    refuse(Errc::invalid_config, "this program is connected to a cluster (caftrain::connect), whose "
                                 "nodes run workers as processes; set ScalingConfig.worker_mode "
                                 "= \"process\"");
  validate(options, !on_cluster);
  auto spec = std::make_shared<RunSpec>();
  spec->train_func = std::move(train_func);
  spec->name = options.run.name.empty() ? timestamped_name("TorchTrainer") : options.run.name;
  spec->dir = (fs::path(storage_root(options.run.storage_path)) / spec->name).string();
  spec->options = std::move(options);
  prepare_run_directory(*spec);
  write_run_file(spec->dir, spec->name, spec->options);
  return spec;
}

} // namespace

namespace {

/// In a worker process: the trainer's spec as the program built it (its train function
/// and options), with no run directory touched; the run's own come from the driver.
std::shared_ptr<RunSpec> worker_process_spec(TrainFunc train_func, TorchTrainerOptions options) {
  if (!train_func)
    refuse(Errc::invalid_config, "train_func is empty");
  auto spec = std::make_shared<RunSpec>();
  spec->train_func = std::move(train_func);
  spec->name = options.run.name;
  spec->options = std::move(options);
  return spec;
}

} // namespace

TorchTrainer::TorchTrainer(caf::actor_system& system, TrainFunc train_func,
                           TorchTrainerOptions options)
  : TorchTrainer(system, is_worker_process()
                           ? worker_process_spec(std::move(train_func), std::move(options))
                           : make_run_spec(system, std::move(train_func), std::move(options))) {
  // nop
}

PlacedRun spawn_placed_run(caf::actor_system& system, TrainFunc train_func,
                           TorchTrainerOptions options, Placement placement, int64_t job) {
  if (options.scaling.worker_mode == "process" && job < 0)
    refuse(Errc::invalid_config, "a placed run of worker processes needs its caller's job number "
                                 "(detail::next_job), which its worker processes run up to");
  auto spec = make_run_spec(system, std::move(train_func), std::move(options));
  spec->job = job;
  if (placement.bundles.size() != static_cast<size_t>(spec->options.scaling.num_workers))
    refuse(Errc::invalid_argument, "the placement holds " + std::to_string(placement.bundles.size()) +
                                     " bundles for " +
                                     std::to_string(spec->options.scaling.num_workers) + " workers");
  spec->placement = std::move(placement);
  spec->prefer_initial_checkpoint = !spec->options.resume_from_checkpoint.empty();
  return PlacedRun{system.spawn(trainer_actor, spec), spec->name, spec->dir};
}

TorchTrainer::TorchTrainer(caf::actor_system& system, std::function<void()> train_func,
                           TorchTrainerOptions options)
  : TorchTrainer(system,
                 train_func ? TrainFunc([f = std::move(train_func)](const Config&) { f(); })
                            : TrainFunc(),
                 std::move(options)) {
  // nop
}

TorchTrainer::~TorchTrainer() = default;
TorchTrainer::TorchTrainer(TorchTrainer&&) noexcept = default;
TorchTrainer& TorchTrainer::operator=(TorchTrainer&&) noexcept = default;

bool TorchTrainer::can_restore(const std::string& path) {
  return has_run_file(expand_home(path));
}

TorchTrainer TorchTrainer::restore(caf::actor_system& system, const std::string& path,
                                   TrainFunc train_func, TorchTrainerOptions overrides) {
  if (!train_func)
    refuse(Errc::invalid_config, "restore needs the run's train_func");
  auto dir = expand_home(path);
  StoredRun stored;
  try {
    stored = read_run_file(dir);
  } catch (const Error& e) {
    refuse(e.code(), std::string("cannot restore: ") + e.what());
  }
  // The stored options, with the caller's callbacks and timeouts.
  auto o = std::move(stored.options);
  auto& given = overrides.run;
  o.run.callbacks = std::move(given.callbacks);
  o.run.report_timeout = given.report_timeout;
  o.run.collective_timeout = given.collective_timeout;
  o.run.heartbeat_timeout = given.heartbeat_timeout;
  o.run.stop_grace = given.stop_grace;
  o.scaling.trainer_resources = overrides.scaling.trainer_resources;
  validate(o, !cluster_of(system).has_value());
  auto spec = std::make_shared<RunSpec>();
  spec->train_func = std::move(train_func);
  spec->name = stored.name;
  spec->dir = fs::absolute(dir).lexically_normal().string();
  if (spec->dir.size() > 1 && spec->dir.back() == '/')
    spec->dir.pop_back();
  spec->options = std::move(o);
  spdlog::info("caftrain: restoring run '{}' from '{}'", spec->name, spec->dir);
  return TorchTrainer(system, std::move(spec));
}

namespace {

/// In a worker process: runs the rank it was started for when `spec` is that run's
/// trainer (and then never returns).
void run_if_my_job(caf::actor_system& system, const RunSpec& spec) {
  if (detail::is_my_job(spec))
    detail::run_worker_process(system, spec);
}

/// What an inert TorchTrainer of a worker process (not the one it was started for)
/// returns.
Result skipped_in_worker_process(const RunSpec& spec) {
  auto& env = *detail::worker_process_env();
  Result r;
  r.error = RunError{Errc::cancelled,
                     "this process is a worker process of run '" + env.run_name +
                       "' (process-mode TorchTrainer #" + std::to_string(env.job) +
                       " of the program); no other TorchTrainer runs here"};
  return r;
}

} // namespace

Result TorchTrainer::fit() {
  if (result_)
    return *result_;
  if (is_worker_process()) {
    run_if_my_job(*system_, *spec_);
    result_ = skipped_in_worker_process(*spec_);
    return *result_;
  }
  caf::scoped_actor self{*system_};
  Result result;
  self->request(actor_, caf::infinite, fit_atom::value)
    .receive([&](Result& r) { result = std::move(r); },
             [&](caf::error& err) {
               // Started with start() and already over: the trainer actor ended with its
               // run, which left its result on disk.
               if (err == caf::sec::request_receiver_down) {
                 try {
                   result = Result::from_path(spec_->dir);
                   return;
                 } catch (const Error&) {
                   // no result file: report the actor's end as it is
                 }
               }
               result.error = to_run_error(err);
             });
  join_worker_threads(spec_->name, spec_->options.run.stop_grace);
  result_ = result;
  return result;
}

caf::actor TorchTrainer::start() {
  if (is_worker_process()) {
    run_if_my_job(*system_, *spec_);
    return actor_; // none: this trainer does not run here
  }
  caf::anon_send(actor_, start_atom::value);
  return actor_;
}

const caf::actor& TorchTrainer::actor() const noexcept {
  return actor_;
}

const std::string& TorchTrainer::path() const {
  return spec_->dir;
}

const std::string& TorchTrainer::name() const {
  return spec_->name;
}

RunCallback::~RunCallback() = default;

} // namespace caftrain
