// WorkerContext: where a worker of a TorchTrainer run stands; the thread's current worker.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace caftrain {

class Communicator;

/// Where one worker of a run stands (Ray's TrainContext): its ranks and sizes, its
/// device, and the run it belongs to.
struct WorkerContext {
  /// Rank among all workers of the run, in [0, world_size).
  int64_t world_rank = 0;
  /// Rank among the workers on this node.
  int64_t local_rank = 0;
  /// Index of this worker's node.
  int64_t node_rank = 0;
  /// Number of workers of the run.
  int64_t world_size = 1;
  /// Number of workers on this node.
  int64_t local_world_size = 1;
  /// "cpu" or "cuda:<index>".
  std::string device = "cpu";
  /// Intra-op threads this worker's training uses.
  int64_t num_threads = 1;
  /// Run name (RunConfig.name) and its directory under the storage path.
  std::string run_name;
  std::string run_dir;
  /// Attempt of the run (0 first, +1 per restart after a failure).
  int64_t attempt = 0;
  /// Trial name when the run is a Tune trial, else "".
  std::string trial_name;
};

/// What the worker actor provides to the training thread it runs. The thread-local
/// current worker is what `ActorEnvironment` and `train::report` talk to.
class WorkerRuntime {
 public:
  virtual ~WorkerRuntime();

  virtual const WorkerContext& context() const = 0;

  /// The run's communicator for this attempt; null when world_size == 1.
  virtual std::shared_ptr<Communicator> communicator() const = 0;

  /// True once the trainer stopped this attempt (failure elsewhere, cancel).
  virtual bool stop_requested() const = 0;

  /// Why the attempt was stopped.
  virtual std::string stop_reason() const = 0;

  /// Records that training is making progress (the Trainer calls it every batch); a
  /// worker without progress for RunConfig.heartbeat_timeout is declared failed.
  virtual void heartbeat() = 0;
};

/// The worker the calling thread trains for, or null outside a TorchTrainer worker.
WorkerRuntime* current_worker() noexcept;

/// Makes `worker` the calling thread's current worker while alive.
class ScopedWorker {
 public:
  explicit ScopedWorker(WorkerRuntime* worker);
  ~ScopedWorker();
  ScopedWorker(const ScopedWorker&) = delete;
  ScopedWorker& operator=(const ScopedWorker&) = delete;

 private:
  WorkerRuntime* previous_;
};

} // namespace caftrain
