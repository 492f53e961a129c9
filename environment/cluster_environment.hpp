// ClusterEnvironment: where this process stands in a run (Lightning's plugin of that name).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace caftrain {

class Communicator;

/// Where a training process stands: its ranks, the size of its group, and the
/// communicator connecting it to the others. The Trainer takes one as a plugin; without
/// one it trains alone (`LightningEnvironment`). `ActorEnvironment` is the one a worker of
/// a `TorchTrainer` uses (Ray's RayLightningEnvironment).
class ClusterEnvironment {
 public:
  virtual ~ClusterEnvironment();

  /// Plugin name, e.g. "ActorEnvironment".
  virtual std::string name() const = 0;

  virtual int64_t world_size() const = 0;
  virtual int64_t global_rank() const = 0;
  virtual int64_t local_rank() const = 0;
  virtual int64_t node_rank() const = 0;

  /// The group's communicator; null when world_size() == 1.
  virtual std::shared_ptr<Communicator> communicator() const = 0;

  /// The device this process must train on ("cpu", "cuda:1"), or "" to let the Trainer
  /// choose from its accelerator option.
  virtual std::string device() const {
    return "";
  }

  /// Throws `Error(cancelled)` when the run this process belongs to was stopped; the
  /// Trainer calls it before every batch so that a stopped worker ends promptly (and a
  /// running one shows it makes progress).
  virtual void check_stop() const {}

  /// True for environments created by a caftrain worker (the `TorchTrainer` path).
  virtual bool managed_by_actors() const {
    return false;
  }
};

/// A single process training alone: world size 1, rank 0, no communicator.
class LightningEnvironment : public ClusterEnvironment {
 public:
  std::string name() const override;
  int64_t world_size() const override;
  int64_t global_rank() const override;
  int64_t local_rank() const override;
  int64_t node_rank() const override;
  std::shared_ptr<Communicator> communicator() const override;
};

/// An environment given explicitly: ranks and a communicator built by the caller (for
/// tests, or programs that rendezvous on their own).
class StaticEnvironment : public ClusterEnvironment {
 public:
  /// `communicator` may be null only when its size would be 1.
  explicit StaticEnvironment(std::shared_ptr<Communicator> communicator, int64_t local_rank = -1,
                             int64_t node_rank = 0);

  std::string name() const override;
  int64_t world_size() const override;
  int64_t global_rank() const override;
  int64_t local_rank() const override;
  int64_t node_rank() const override;
  std::shared_ptr<Communicator> communicator() const override;

 private:
  std::shared_ptr<Communicator> communicator_;
  int64_t local_rank_;
  int64_t node_rank_;
};

} // namespace caftrain
