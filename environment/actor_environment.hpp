// ActorEnvironment: the cluster environment of a TorchTrainer worker.
#pragma once

#include "environment/cluster_environment.hpp"

namespace caftrain {

class WorkerRuntime;

/// The plugin that tells a Trainer it runs as a worker of a `TorchTrainer` (Ray's
/// RayLightningEnvironment): ranks, device and communicator come from the worker this
/// thread trains for. Create it inside `train_func`. Outside a run (train_func called
/// directly) it is a process training alone, like `LightningEnvironment`: world size 1,
/// rank 0, no communicator, the device the Trainer's accelerator picks.
class ActorEnvironment : public ClusterEnvironment {
 public:
  /// Binds to the calling thread's worker if there is one (else at first use).
  ActorEnvironment();

  std::string name() const override;
  int64_t world_size() const override;
  int64_t global_rank() const override;
  int64_t local_rank() const override;
  int64_t node_rank() const override;
  std::shared_ptr<Communicator> communicator() const override;
  std::string device() const override;
  void check_stop() const override;
  bool managed_by_actors() const override {
    return true;
  }

  /// True when bound to a worker (false outside a TorchTrainer run).
  bool bound() const;

 private:
  /// The worker, or null outside a run.
  WorkerRuntime* worker() const;

  mutable WorkerRuntime* worker_;
};

} // namespace caftrain
