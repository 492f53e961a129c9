// Strategy: how a model is spread over the ranks of a run.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "checkpoint/state_dict.hpp"
#include "environment/communicator.hpp"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace caftrain {

class Checkpoint;
class ClusterEnvironment;
struct SavedOptimizer;

/// Bytes a strategy holds on this rank, so that sharding's savings are measured, not
/// assumed. `peak_*` are high-water marks since setup (or the last reset).
struct MemoryStats {
  int64_t parameter_bytes = 0;
  int64_t gradient_bytes = 0;
  int64_t optimizer_state_bytes = 0;
  /// Peak of the bytes held transiently: gathered parameters of a unit being computed,
  /// gradient buffers in flight.
  int64_t peak_transient_bytes = 0;

  int64_t total() const noexcept {
    return parameter_bytes + gradient_bytes + optimizer_state_bytes;
  }
};

/// Keeps a strategy's parameters whole on this rank until it is destroyed or released
/// (see `Strategy::summon_full_params`). Movable, not copyable.
class [[nodiscard]] ParameterScope {
 public:
  ParameterScope() = default;
  explicit ParameterScope(std::function<void()> release) noexcept;
  ParameterScope(ParameterScope&& other) noexcept;
  ParameterScope& operator=(ParameterScope&& other) noexcept;
  ParameterScope(const ParameterScope&) = delete;
  ParameterScope& operator=(const ParameterScope&) = delete;
  ~ParameterScope();

  /// Ends the scope now; later calls do nothing.
  void release() noexcept;

 private:
  std::function<void()> release_;
};

/// Lightning's `Strategy`: sets the model up on its device and communicator, runs
/// backward and the optimizer step, and decides what gradient synchronisation, sharding
/// and checkpoint layout mean. The base class is the single-device behaviour; the
/// distributed strategies override what they change.
///
/// A strategy object belongs to one Trainer at a time.
class Strategy {
 public:
  virtual ~Strategy();

  // -- identity ---------------------------------------------------------------------

  /// Registry name: "single_device", "ddp", "zero", "fsdp".
  virtual std::string name() const = 0;

  /// True when the strategy synchronises several ranks (and needs a communicator when
  /// the world has more than one rank).
  virtual bool is_distributed() const {
    return false;
  }

  // -- lifecycle (called by the Trainer) ----------------------------------------------

  /// Binds the strategy to its environment and `module`, moves the module to `device` and
  /// makes every rank start from the same state.
  virtual void setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
                     c10::Device device);

  /// Adapts the optimizers returned by configure_optimizers (sharding strategies point
  /// them at this rank's shards). Called once after `setup`.
  virtual void setup_optimizers(std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers);

  /// Releases hooks and buffers; the module keeps its (full) parameters.
  virtual void teardown();

  /// Called when fit fails on this rank, before `teardown`: the strategy gives up
  /// whatever would need the other ranks, which may have failed too or be stuck in
  /// another collective (FSDP does not gather its units back).
  virtual void on_exception(const std::exception& failure) {}

  // -- one optimisation step ----------------------------------------------------------

  /// Called before each training step's forward (DDP broadcasts buffers here).
  virtual void before_training_step() {}

  /// The module's own steps (training_step, validation_step, test_step) run between
  /// these, on every rank at the same point. FSDP gathers the units a step reads only
  /// inside them (and inside backward and the optimizer step): anywhere else a gather
  /// would be one rank's alone.
  virtual void begin_module_step() {}
  virtual void end_module_step() {}

  /// Runs backward of `loss` (distributed strategies start gradient reduction from here).
  virtual void backward(const at::Tensor& loss);

  /// Whether the next backward passes synchronise gradients. The Trainer turns it off for
  /// all but the last micro-batch of an accumulation window (DDP's `no_sync`).
  virtual void set_gradient_sync(bool enabled) {
    sync_enabled_ = enabled;
  }

  bool gradient_sync() const noexcept {
    return sync_enabled_;
  }

  /// Completes gradient synchronisation; after it the gradients the optimizer sees are
  /// the global average.
  virtual void finish_gradient_sync() {}

  /// Clips the global gradient norm to `max_norm`; returns the norm before clipping.
  virtual double clip_grad_norm(double max_norm, double norm_type = 2.0);

  /// Clamps every gradient element to [-clip_value, clip_value].
  virtual void clip_grad_value(double clip_value);

  /// Steps `optimizer` (sharding strategies step their shard and gather the result).
  virtual void optimizer_step(torch::optim::Optimizer& optimizer);

  /// Resets gradients before the next accumulation window.
  virtual void zero_grad(torch::optim::Optimizer& optimizer);

  // -- collectives for the loop -----------------------------------------------------

  int64_t world_size() const;
  int64_t global_rank() const;
  bool is_global_zero() const {
    return global_rank() == 0;
  }

  /// Reduces a scalar over all ranks (identity on one rank).
  virtual double reduce(double value, ReduceOp op = ReduceOp::avg);

  /// Blocks until every rank arrives.
  virtual void barrier();

  /// Rank 0's `value` on every rank.
  virtual std::string broadcast(const std::string& value);

  // -- checkpoints ------------------------------------------------------------------

  /// The full model state (every rank returns it; sharded strategies gather it).
  virtual StateDict model_state_dict();

  /// Loads a full model state on every rank.
  virtual void load_model_state_dict(const StateDict& state, bool strict = true);

  /// True when each rank saves and loads its own shard of model and optimizer state.
  virtual bool sharded_checkpoints() const {
    return false;
  }

  /// This rank's files of a sharded checkpoint (`sharded_checkpoints()` strategies):
  /// its shard, and on rank 0 the layout and the buffers. Collective. A snapshot: the
  /// shards are copied into `copies` now and serialized when the files are written.
  virtual std::map<std::string, FileSource> shard_files(TensorCopies& copies);

  /// Restores parameters and optimizer state from a sharded checkpoint written with any
  /// world size (resharding as needed).
  virtual void load_sharded(const Checkpoint& checkpoint);

  /// Restores the optimizers' state from full (unsharded) per-parameter state, `saved[i]`
  /// for optimizer i, by param group and parameter index in the order configure_optimizers
  /// built them (libtorch's own order, see `read_optimizer_archive`). Sharded strategies
  /// slice each parameter's state into their shards; the base class installs it as it is.
  /// Throws `Error(state_mismatch)` when the groups or parameters do not match.
  virtual void load_optimizer_state(const std::vector<SavedOptimizer>& saved);

  /// The gradient tensors the optimizers step with (after finish_gradient_sync): the
  /// parameters' gradients, or the shards' for sharded strategies.
  virtual std::vector<at::Tensor> gradients();

  // -- parameters outside a step -------------------------------------------------------

  /// Gathers the module's full parameters on this rank until the returned scope ends
  /// (PyTorch FSDP's `summon_full_params`), so that code outside a step (a callback that
  /// logs a weight norm, a hook that edits a weight) can read them, and with `writeback`
  /// change them: each rank keeps the part of the change that falls in its shard.
  /// Collective: every rank calls it at the same point. Strategies that keep whole
  /// parameters return an empty scope.
  ///
  ///     auto full = trainer.strategy().summon_full_params();
  ///     norm = module.fc1->weight.norm().item<double>();
  virtual ParameterScope summon_full_params(bool writeback = true);

  // -- memory -----------------------------------------------------------------------

  /// The bytes held on this rank right now (and peaks).
  virtual MemoryStats memory_stats() const;

  // -- access -----------------------------------------------------------------------

  torch::nn::Module& module() const;

  const std::shared_ptr<ClusterEnvironment>& environment() const noexcept {
    return environment_;
  }

  /// The environment's communicator, or null on one rank.
  const std::shared_ptr<Communicator>& communicator() const noexcept {
    return communicator_;
  }

  c10::Device device() const noexcept {
    return device_;
  }

  const std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers() const noexcept {
    return optimizers_;
  }

 protected:
  /// Throws `Error(invalid_config)` unless the strategy was set up.
  void require_setup(const char* what) const;

  torch::nn::Module* module_ = nullptr;
  std::shared_ptr<ClusterEnvironment> environment_;
  std::shared_ptr<Communicator> communicator_;
  c10::Device device_{c10::kCPU};
  std::vector<std::shared_ptr<torch::optim::Optimizer>> optimizers_;
  bool sync_enabled_ = true;
};

/// Training on one device, no communication (Lightning's SingleDeviceStrategy).
class SingleDeviceStrategy : public Strategy {
 public:
  std::string name() const override;
};

/// Bytes of the optimizer's state tensors (Adam's moments, SGD's momentum buffers).
int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

/// A factory of strategies by name, for `strategy = "ddp"` and friends.
using StrategyFactory = std::function<std::shared_ptr<Strategy>()>;

/// Registers `factory` under `name`; the built-in strategies register themselves.
void register_strategy(const std::string& name, StrategyFactory factory);

/// A new strategy by registry name; throws `Error(invalid_config)` listing the known
/// names for an unknown one.
std::shared_ptr<Strategy> make_strategy(const std::string& name);

/// Names of the registered strategies, sorted.
std::vector<std::string> strategy_names();

} // namespace caftrain
