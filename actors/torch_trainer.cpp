#include "actors/torch_trainer.hpp"

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <algorithm>
#include <filesystem>
#include <random>
#include <thread>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>

#include "actors/messages.hpp"
#include "actors/trainer_actor.hpp"
#include "actors/worker.hpp"
#include "checkpoint/checkpoint_manager.hpp"
#include "checkpoint/files.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void refuse(Errc code, const std::string& what) {
  throw Error(code, "TorchTrainer: " + what);
}

std::string default_storage() {
  const char* home = std::getenv("HOME");
  return (fs::path(home && *home ? home : "/tmp") / "caftrain_results").string();
}

std::string default_name() {
  auto t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof(buf), "TorchTrainer_%Y-%m-%d_%H-%M-%S", &tm);
  std::random_device rd;
  char suffix[8];
  std::snprintf(suffix, sizeof(suffix), "_%04x", rd() & 0xffff);
  return std::string(buf) + suffix;
}

std::string expand_home(const std::string& path) {
  if (path.rfind("~/", 0) == 0 || path == "~") {
    const char* home = std::getenv("HOME");
    return std::string(home ? home : "/tmp") + path.substr(1);
  }
  return path;
}

/// The options the run was started with, saved in its directory for `restore`.
void write_run_file(const RunSpec& spec) {
  auto& o = spec.options;
  nlohmann::json config = nlohmann::json::object();
  for (auto& [k, v] : o.train_loop_config.values())
    std::visit([&](const auto& x) { config[k] = x; }, v);
  nlohmann::json j = {
    {"name", spec.name},
    {"train_loop_config", config},
    {"backend", o.torch_config.backend},
    {"num_workers", o.scaling.num_workers},
    {"use_gpu", o.scaling.use_gpu},
    {"cpus_per_worker", o.scaling.resources_per_worker.cpus},
    {"gpus_per_worker", o.scaling.resources_per_worker.gpus},
    {"max_failures", o.run.failure.max_failures},
    {"num_to_keep", o.run.checkpoint.num_to_keep ? nlohmann::json(*o.run.checkpoint.num_to_keep)
                                                  : nlohmann::json(nullptr)},
    {"checkpoint_score_attribute", o.run.checkpoint.checkpoint_score_attribute},
    {"checkpoint_score_order", o.run.checkpoint.checkpoint_score_order},
    {"stop", o.run.stop},
  };
  write_file_atomic((fs::path(spec.dir) / "run.json").string(), j.dump(2));
}

} // namespace

std::string resolve_backend(const TorchTrainerOptions& o) {
  auto& b = o.torch_config.backend;
  if (b != "auto")
    return b;
  return o.scaling.use_gpu ? "nccl" : "local";
}

void validate(const TorchTrainerOptions& o) {
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
  if (s.num_workers < 1)
    refuse(Errc::invalid_config, "ScalingConfig.num_workers is " + std::to_string(s.num_workers) +
                                   "; a run needs at least 1 worker");
  if (s.resources_per_worker.cpus < 0 || s.resources_per_worker.gpus < 0)
    refuse(Errc::invalid_config, "ScalingConfig.resources_per_worker must not be negative");
  auto cores = static_cast<double>(std::max(1u, std::thread::hardware_concurrency()));
  auto wanted = s.resources_per_worker.cpus * static_cast<double>(s.num_workers) +
                s.trainer_resources.cpus;
  if (wanted > cores)
    refuse(Errc::invalid_config,
           "ScalingConfig asks for " + std::to_string(wanted) + " CPUs but this node has " +
             std::to_string(static_cast<int>(cores)) +
             "; lower resources_per_worker.cpus (0 shares the cores evenly) or num_workers");
  if (s.use_gpu) {
    if (!torch::cuda::is_available())
      refuse(Errc::unavailable,
             "ScalingConfig.use_gpu is true but no CUDA GPU is visible to this process "
             "(this libtorch build or machine has none); set use_gpu = false to train on CPU");
    auto gpus = static_cast<int64_t>(torch::cuda::device_count());
    if (gpus < s.num_workers)
      refuse(Errc::unavailable, "ScalingConfig wants a GPU for each of " +
                                  std::to_string(s.num_workers) + " workers but this node has " +
                                  std::to_string(gpus));
  } else if (s.resources_per_worker.gpus > 0) {
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
  actor_ = system.spawn(trainer_actor, spec_);
}

TorchTrainer::TorchTrainer(caf::actor_system& system, TrainFunc train_func,
                           TorchTrainerOptions options)
  : system_(&system) {
  if (!train_func)
    refuse(Errc::invalid_config, "train_func is empty");
  validate(options);
  auto spec = std::make_shared<RunSpec>();
  spec->train_func = std::move(train_func);
  spec->name = options.run.name.empty() ? default_name() : options.run.name;
  auto storage = options.run.storage_path.empty() ? default_storage()
                                                  : expand_home(options.run.storage_path);
  spec->dir = (fs::path(storage) / spec->name).string();
  spec->options = std::move(options);
  if (!find_checkpoints(spec->dir).empty())
    refuse(Errc::invalid_config,
           "run directory '" + spec->dir + "' already holds checkpoints of an earlier run; "
           "continue it with TorchTrainer::restore, or choose another RunConfig.name");
  std::error_code ec;
  fs::create_directories(spec->dir, ec);
  if (ec)
    refuse(Errc::io_error, "cannot create run directory '" + spec->dir + "': " + ec.message());
  write_run_file(*spec);
  spec_ = std::move(spec);
  actor_ = system.spawn(trainer_actor, spec_);
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
  std::error_code ec;
  return fs::is_regular_file(fs::path(path) / "run.json", ec);
}

TorchTrainer TorchTrainer::restore(caf::actor_system& system, const std::string& path,
                                   TrainFunc train_func, TorchTrainerOptions overrides) {
  if (!can_restore(path))
    refuse(Errc::invalid_config, "'" + path + "' is not a run directory (it has no run.json); "
                                              "pass the directory of the run to continue");
  if (!train_func)
    refuse(Errc::invalid_config, "restore needs the run's train_func");
  auto bytes = read_file((fs::path(path) / "run.json").string());
  nlohmann::json j;
  TorchTrainerOptions o = std::move(overrides);
  try {
    j = nlohmann::json::parse(bytes.begin(), bytes.end());
    Config config;
    for (auto& [k, v] : j.at("train_loop_config").items()) {
      if (v.is_boolean())
        config.set(k, v.get<bool>());
      else if (v.is_number_integer())
        config.set(k, v.get<int64_t>());
      else if (v.is_number())
        config.set(k, v.get<double>());
      else
        config.set(k, v.get<std::string>());
    }
    o.train_loop_config = config;
    o.torch_config.backend = j.value("backend", "auto");
    o.scaling.num_workers = j.at("num_workers").get<int64_t>();
    o.scaling.use_gpu = j.at("use_gpu").get<bool>();
    o.scaling.resources_per_worker.cpus = j.value("cpus_per_worker", 0.0);
    o.scaling.resources_per_worker.gpus = j.value("gpus_per_worker", 0.0);
    o.run.failure.max_failures = j.at("max_failures").get<int64_t>();
    if (!j.at("num_to_keep").is_null())
      o.run.checkpoint.num_to_keep = j.at("num_to_keep").get<int64_t>();
    o.run.checkpoint.checkpoint_score_attribute = j.at("checkpoint_score_attribute").get<std::string>();
    o.run.checkpoint.checkpoint_score_order = j.at("checkpoint_score_order").get<std::string>();
    o.run.stop = j.value("stop", Metrics{});
  } catch (const nlohmann::json::exception& e) {
    refuse(Errc::corrupt_checkpoint, "run.json of '" + path + "' is not valid: " + e.what());
  }
  validate(o);
  auto spec = std::make_shared<RunSpec>();
  spec->train_func = std::move(train_func);
  spec->name = j.at("name").get<std::string>();
  spec->dir = fs::absolute(path).lexically_normal().string();
  if (!spec->dir.empty() && spec->dir.back() == '/')
    spec->dir.pop_back();
  o.run.name = spec->name;
  spec->options = std::move(o);
  return TorchTrainer(system, std::move(spec));
}

Result TorchTrainer::fit() {
  if (result_)
    return *result_;
  caf::scoped_actor self{*system_};
  Result result;
  self->request(actor_, caf::infinite, fit_atom::value)
    .receive([&](Result& r) { result = std::move(r); },
             [&](caf::error& err) { result.error = to_run_error(err); });
  join_worker_threads(spec_->name, spec_->options.run.stop_grace);
  result_ = result;
  return result;
}

caf::actor TorchTrainer::start() {
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
