// ShardedStrategy: what ZeroStrategy and FSDPStrategy share: flat shards, optimizers over
// them, gradient reduce-scatter, sharded checkpoints.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "strategies/flat_shard.hpp"
#include "strategies/strategy.hpp"

namespace torch::autograd {
struct Node;
}

namespace caftrain {

/// Base of the strategies that partition parameters into flat buffers sharded over the
/// ranks (`FlatShard`), with one optimizer parameter per shard. Subclasses decide how
/// parameters are grouped into flats (buckets, units), whether full gradients persist
/// between steps, and when full parameters are resident.
///
/// Gradients reach the shards through hooks on the parameters' gradient accumulators: a
/// flat whose parameters all have gradients is reduce-scattered (averaged) into the ranks'
/// shard gradients while backward goes on. Flats are launched strictly in index order on
/// every rank, because every rank must issue collectives in the same order.
class ShardedStrategy : public Strategy {
 public:
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

  /// Internal: a gradient-accumulator hook saw parameter `index`'s gradient accumulated.
  void on_gradient(size_t index);

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

  /// Counts parameter `index`'s gradient (or none) into its flat, and launches the flats
  /// that became complete.
  void mark_ready(size_t index);
  /// Adds `grad` (entry `e` of flat `f`) into the flat's full gradient buffer.
  void accumulate_into_buffer(size_t f, size_t e, const at::Tensor& grad);
  void launch_ready();
  /// Marks the parameters without gradient as ready (zero), waits for every flat's
  /// reduction and moves it into the shard gradients.
  void complete_reduction();
  /// Waits for flat `f`'s reduction and adds it into its shard gradient; frees transient
  /// buffers.
  void fold(size_t f);

  /// Flats whose transient gradient buffers may be in flight at once.
  static constexpr size_t kInFlight = 2;
  void reset_step();

  /// Per parameter (global index): where it lives.
  std::vector<at::Tensor> params_;
  std::vector<Slot> slots_;
  std::vector<bool> ready_;
  /// Per parameter: a backward of this accumulation window produced its gradient here.
  std::vector<bool> used_;
  /// Parameters no rank used in the last reduced window; the next step leaves them alone.
  std::vector<size_t> unused_;
  std::vector<size_t> pending_;          // per flat: parameters without gradient yet
  std::vector<at::Tensor> grad_buffers_; // per flat: full flat gradient (persistent or transient)
  std::vector<at::Tensor> grad_outputs_; // per flat: reduce-scatter output (transient modes)
  std::vector<std::shared_ptr<Work>> works_;
  size_t next_launch_ = 0;
  size_t next_fold_ = 0; // flats before it are folded into their shards (transient modes)
  bool step_active_ = false;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  std::vector<uintptr_t> hook_keys_;
  /// Per optimizer, per param group: its parameters' names in the group's original order
  /// (before the shards replaced them), by which unsharded optimizer state is indexed.
  std::vector<std::vector<std::vector<std::string>>> group_names_;
  /// optimizer -> flats it steps
  std::vector<std::pair<torch::optim::Optimizer*, std::vector<size_t>>> owners_;
  std::mutex mtx_;
};

} // namespace caftrain
