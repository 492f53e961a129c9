// ShardedStrategy: what ZeroStrategy and FSDPStrategy share: flat shards, optimizers over
// them, gradient reduce-scatter, sharded checkpoints.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "strategies/flat_shard.hpp"
#include "strategies/strategy.hpp"

namespace caftrain {

class GradientReducer;

/// Base of the strategies that partition parameters into flat buffers sharded over the
/// ranks (`FlatShard`), with one optimizer parameter per shard. Subclasses decide how
/// parameters are grouped into flats (buckets, units), whether full gradients persist
/// between steps, and when full parameters are resident.
///
/// Gradients reach the shards through a `GradientReducer` (the mechanism DDP uses too),
/// with one bucket per flat: a flat whose parameters all have gradients is
/// reduce-scattered (averaged) into the ranks' shard gradients while backward goes on.
class ShardedStrategy : public Strategy {
 public:
  ShardedStrategy();
  ~ShardedStrategy() override;

  bool is_distributed() const override {
    return true;
  }

  void setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
             c10::Device device) override;
  void setup_optimizers(std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers) override;
  void teardown() override;
  void before_training_step() override;
  void backward(const at::Tensor& loss) override;
  void finish_gradient_sync() override;
  double clip_grad_norm(double max_norm, double norm_type = 2.0) override;
  void clip_grad_value(double clip_value) override;
  void optimizer_step(torch::optim::Optimizer& optimizer) override;
  void zero_grad(torch::optim::Optimizer& optimizer) override;
  std::vector<at::Tensor> gradients() override;
  StateDict model_state_dict() override;
  void load_model_state_dict(const StateDict& state, bool strict = true) override;
  /// ZeRO's parameters are whole on every rank: with `writeback` each rank's shard takes
  /// what the scope wrote into its part.
  ParameterScope summon_full_params(bool writeback = true) override;
  bool sharded_checkpoints() const override {
    return true;
  }
  std::map<std::string, FileSource> shard_files(TensorCopies& copies) override;
  void load_sharded(const Checkpoint& checkpoint) override;
  void load_optimizer_state(const std::vector<SavedOptimizer>& saved) override;
  MemoryStats memory_stats() const override;

  /// Bytes of the largest saved shard file the last `load_sharded` read; it reads one at
  /// a time, and only those holding this rank's elements (its own on the same world
  /// size), so this bounds what a load holds beyond the strategy's at-rest memory.
  int64_t last_load_peak_bytes() const noexcept {
    return last_load_peak_bytes_;
  }

  /// The flats, in launch order (after setup_optimizers).
  const std::vector<std::unique_ptr<FlatShard>>& flats() const noexcept {
    return flats_;
  }

 protected:
  /// Groups one optimizer param group's parameters (name, tensor) into flats, in launch
  /// order (the order backward tends to produce gradients).
  virtual std::vector<std::vector<std::pair<std::string, at::Tensor>>>
  partition(const std::vector<std::pair<std::string, at::Tensor>>& params) = 0;

  /// Whether full gradients live between steps (ZeRO stage 1: the parameters' .grad are
  /// views of a persistent flat gradient, reduced once per accumulation window) or only
  /// while their flat is reduced (stage 2, FSDP: reduced every backward, accumulated into
  /// the shard gradient).
  virtual bool persistent_gradients() const = 0;

  /// Makes sure the full parameters of `flat` are resident (FSDP gathers; ZeRO: always).
  virtual void ensure_gathered(size_t flat) {}

  /// Called after an optimizer stepped `flats`: bring their parameters up to date (ZeRO
  /// gathers now; FSDP frees them and gathers at the next use).
  virtual void after_step(const std::vector<size_t>& flats) = 0;

  /// Brings the parameters up to date after `load_sharded` wrote new values into the
  /// shards (default: `after_step` of every flat).
  virtual void after_load();

  /// Whether the full parameters stay resident between steps (ZeRO): the shards then alias
  /// them instead of holding copies.
  virtual bool parameters_resident() const {
    return false;
  }

  /// Whether gradients are averaged with all-reduce instead of reduce-scatter (NO_SHARD).
  virtual bool replicate() const {
    return false;
  }

  /// The strategy's name in messages.
  std::string label() const;

  std::vector<std::unique_ptr<FlatShard>> flats_;
  /// Peak of the transient bytes (gathered parameters, gradient buffers in flight).
  int64_t peak_transient_ = 0;
  int64_t transient_ = 0;
  int64_t last_load_peak_bytes_ = 0;
  void add_transient(int64_t bytes);

 private:
  struct Slot {
    size_t flat = 0;
    size_t entry = 0;
  };

  /// The reducer's launch of flat `f`'s full gradient `buffer`: reduce-scatter into the
  /// shard gradient (all-reduce under NO_SHARD; nothing on one rank).
  std::shared_ptr<Work> launch(size_t f, at::Tensor& buffer);
  /// The reducer's fold of flat `f`: its reduced gradient into the shard gradient.
  void fold(size_t f, at::Tensor& buffer);

  /// Flats whose transient gradient buffers may be in flight at once.
  static constexpr size_t kInFlight = 2;

  std::unique_ptr<GradientReducer> reducer_;
  /// Per reducer parameter: its flat and entry.
  std::vector<Slot> slots_;
  std::vector<at::Tensor> grad_outputs_; // per flat: reduce-scatter output (transient modes)
  /// Per optimizer, per param group: its parameters' names in the group's original order
  /// (before the shards replaced them), by which unsharded optimizer state is indexed.
  std::vector<std::vector<std::vector<std::string>>> group_names_;
  /// optimizer -> flats it steps
  std::vector<std::pair<torch::optim::Optimizer*, std::vector<size_t>>> owners_;
};

} // namespace caftrain
