// ScalingConfig, RunConfig and friends: what a TorchTrainer run is asked to do.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "actors/resource_pool.hpp"
#include "core/config.hpp"

namespace caftrain {

struct ReportRecord;
struct Result;
struct RunStatus;

/// The function every worker runs (Ray's train_loop_per_worker).
using TrainFunc = std::function<void(const Config& config)>;

/// Resources of one worker or of the trainer.
struct Resources {
  /// CPU cores. For a worker this is its intra-op thread count; 0 (default) shares the
  /// node's cores evenly among its workers.
  double cpus = 0;
  /// GPUs (0 or 1 per worker). Default 0.
  double gpus = 0;
  /// Custom resources by name (e.g. {"memory_gb", 4}), matched against the pool's nodes.
  /// Default none.
  std::map<std::string, double> custom = {};
};

/// How many workers a run has and what each needs (Ray's ScalingConfig).
struct ScalingConfig {
  /// Number of workers (ranks). Default 1; must be at least 1.
  int64_t num_workers = 1;
  /// Give each worker a GPU and use NCCL. Default false. An error on a machine without one.
  bool use_gpu = false;
  /// Resources of each worker; see `Resources`.
  Resources resources_per_worker = {};
  /// Resources reserved for the trainer actor itself. Default none.
  Resources trainer_resources = {};
  /// How the workers' bundles are spread over the pool's nodes: "PACK" (default, Ray's),
  /// "SPREAD", "STRICT_PACK" or "STRICT_SPREAD" (see PlacementStrategy).
  std::string placement_strategy = "PACK";
  /// Where each worker runs: "thread" (default; a thread of this process, what an
  /// embedding service wants) or "process" (this program started again in worker mode,
  /// see actors/worker_process.hpp: a crash, abort, OOM kill or hang of one worker is a
  /// failure the run restarts from, never the end of the caller's process). Processes
  /// use the "gloo" backend on CPU ("auto" picks it).
  std::string worker_mode = "thread";

  /// One bundle per worker, as the run asks the resource pool for them: CPU is
  /// resources_per_worker.cpus, or when 0 one CPU (Ray's default) and, when the run has
  /// more workers than this machine has cores, an even share of them; GPU is 1 per worker
  /// with use_gpu; custom resources as given; trainer_resources join the first bundle.
  std::vector<ResourceSet> worker_bundles() const;

  /// The sum of `worker_bundles()` (Ray's ScalingConfig.total_resources).
  ResourceSet total_resources() const;
};

/// When a failed run is restarted (Ray's FailureConfig).
struct FailureConfig {
  /// Restarts allowed after worker failures: 0 (default) fails at the first, -1 never
  /// gives up.
  int64_t max_failures = 0;
  /// Keep a warm spare process per rank (worker processes on the driver's machine): it
  /// starts, as the rank's process did, while the attempt trains and waits at its hello;
  /// a restart takes the spares over instead of starting processes, which saves the
  /// process start (loading the binary and its libraries, the program's code before
  /// fit). Costs a second process, and its memory, per rank. Needs
  /// ScalingConfig.worker_mode "process"; not on a cluster's nodes yet. Default false.
  bool warm_spares = false;
};

/// Which checkpoints a run keeps (Ray's CheckpointConfig).
struct CheckpointConfig {
  /// Keep at most this many checkpoints (the best by score, plus always the latest);
  /// unset (default) keeps all.
  std::optional<int64_t> num_to_keep = std::nullopt;
  /// Reported metric that ranks checkpoints; "" (default) ranks by recency.
  std::string checkpoint_score_attribute = "";
  /// "max" (default) or "min": which scores are better.
  std::string checkpoint_score_order = "max";
};

/// Observer of a run, called on the trainer actor (keep it quick; for heavy work,
/// subscribe an actor instead). Ray's RunConfig callbacks.
class RunCallback {
 public:
  virtual ~RunCallback();
  /// A report completed on every rank (and its checkpoint persisted).
  virtual void on_report(const ReportRecord& record) {}
  /// A worker failed; the run restarts as attempt `next_attempt` (or ends, when
  /// `restarting` is false).
  virtual void on_failure(const std::string& error, int64_t next_attempt, bool restarting) {}
  /// The run entered the state `status.state` (see `RunStatus`); `status.states` holds
  /// every state so far.
  virtual void on_state(const RunStatus& status) {}
  /// The run ended.
  virtual void on_finish(const Result& result) {}
};

/// Name, storage and policies of a run (Ray's RunConfig).
struct RunConfig {
  /// Run name; its directory is `<storage_path>/<name>`. Default "TorchTrainer_<time>".
  std::string name = "";
  /// Root of run directories. Default "~/caftrain_results".
  std::string storage_path = "";
  /// Restarts after failures.
  FailureConfig failure = {};
  /// Checkpoint retention.
  CheckpointConfig checkpoint = {};
  /// Observers of the run.
  std::vector<std::shared_ptr<RunCallback>> callbacks = {};
  /// Stop criteria: the run ends successfully once a report's metric reaches the value
  /// (e.g. {"training_iteration", 10} or {"val_accuracy", 0.9}).
  Metrics stop = {};
  /// A rank that does not reach a report within this time after the first rank did
  /// fails the run, naming the rank. Default 10 minutes.
  std::chrono::milliseconds report_timeout = std::chrono::minutes(10);
  /// Timeout of every collective and of rendezvous. Default 5 minutes.
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(5);
  /// A worker whose training shows no progress (a batch, a report) for this long is
  /// declared failed. Default 10 minutes; 0 turns the check off.
  std::chrono::milliseconds heartbeat_timeout = std::chrono::minutes(10);
  /// How long a stopping attempt's threads may take to exit before the next attempt
  /// starts anyway. Default 10 s.
  std::chrono::milliseconds stop_grace = std::chrono::seconds(10);
};

/// How the workers' process group is set up (Ray's TorchConfig).
struct TorchConfig {
  /// "auto" (default): "local" when every worker is a CPU thread of this process, "nccl"
  /// for GPU workers; "local": shared-memory collectives between threads of one process;
  /// "gloo": TCP between any ranks (what PyTorch DDP on CPU uses); "nccl": GPUs.
  std::string backend = "auto";
};

/// Everything a TorchTrainer needs besides its train function (Ray's TorchTrainer args).
struct TorchTrainerOptions {
  /// Handed to every worker's train_func (Ray's train_loop_config).
  Config train_loop_config = {};
  /// The process group's backend.
  TorchConfig torch_config = {};
  /// Workers and their resources.
  ScalingConfig scaling = {};
  /// Name, storage and policies.
  RunConfig run = {};
  /// A checkpoint directory the first attempt starts from (train::get_checkpoint()).
  std::string resume_from_checkpoint = "";
};

} // namespace caftrain
