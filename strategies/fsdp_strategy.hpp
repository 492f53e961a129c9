// FSDPStrategy: fully sharded data parallelism (parameters, gradients and optimizer state).
#pragma once

#include <cstdint>
#include <exception>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "strategies/sharded_strategy.hpp"

namespace c10 {
struct StorageImpl;
}

namespace caftrain {

/// What FSDP shards (PyTorch's ShardingStrategy).
enum class ShardingStrategy {
  /// Parameters, gradients and optimizer state sharded; a unit's parameters are gathered
  /// for its forward, freed after, gathered again for its backward.
  FULL_SHARD,
  /// Gradients and optimizer state sharded; parameters gathered at first use and kept
  /// until the optimizer step (ZeRO-2-like; fewer gathers, more memory while computing).
  SHARD_GRAD_OP,
  /// Nothing sharded: every rank holds everything and gradients are all-reduced (DDP).
  NO_SHARD,
};

const char* to_string(ShardingStrategy strategy);

/// Options of `FSDPStrategy`; defaults are PyTorch FSDP's.
struct FSDPOptions {
  /// What to shard. Default FULL_SHARD.
  ShardingStrategy sharding_strategy = ShardingStrategy::FULL_SHARD;
  /// Wrapping policy. 0 (default): every top-level child module is a unit (plus the
  /// root's own parameters). n > 0: size-based, like `size_based_auto_wrap_policy`: a
  /// submodule whose parameters not yet in a unit number at least n becomes a unit,
  /// deepest first; the rest belongs to the root unit.
  int64_t min_num_params = 0;
  /// Start gathering the next unit (in the order of the first forward) while the current
  /// one computes. Default false.
  bool forward_prefetch = false;
};

/// Fully sharded data parallelism (Lightning's FSDPStrategy, Ray's RayFSDPStrategy).
///
/// Each wrapping unit's parameters are flattened and sharded evenly over the ranks; at
/// rest every rank holds only its shards (and its optimizer state for them). libtorch has
/// no module forward hooks, so a unit is gathered when the first operator that reads one
/// of its parameters runs: a thread-local RecordFunction observer sees the operator's
/// inputs, and storage identity tells whether they belong to a unit (views too, such as
/// the transposed weight Linear saves for backward). Under FULL_SHARD at most two units
/// (three with prefetch) stay gathered: gathering another frees the least recently used
/// one; backward gathers again what it reads. Each unit's gradients are reduce-scattered
/// (averaged) into the shards as soon as backward has produced them.
///
/// The observer gathers only inside a step (the module's training/validation/test step,
/// backward, the optimizer step), which every rank runs at the same point. Outside one,
/// a read of a unit that is not gathered (a callback logging a weight norm on rank 0)
/// would be a gather of that rank alone and desynchronise the ranks: it sees NaN instead,
/// and the rank's next step fails with an error that names the parameter and
/// `summon_full_params`, the collective scope that gathers everything for such code.
///
/// The observer lives on the thread that trained (set up by `setup_optimizers`, removed by
/// `teardown`); after teardown every unit is gathered again so that the module can be used
/// as an ordinary one (after a failed fit it is not: a gather needs every rank, and the
/// parameters that were not here read as NaN).
class FSDPStrategy : public ShardedStrategy {
 public:
  explicit FSDPStrategy(FSDPOptions options = {});
  FSDPStrategy(const FSDPStrategy& other);
  ~FSDPStrategy() override;

  std::string name() const override;

  void setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
             c10::Device device) override;
  void setup_optimizers(std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers) override;
  void teardown() override;
  void on_exception(const std::exception& failure) override;
  void begin_module_step() override;
  void end_module_step() override;
  ParameterScope summon_full_params(bool writeback = true) override;
  StateDict model_state_dict() override;
  void load_model_state_dict(const StateDict& state, bool strict = true) override;
  void backward(const at::Tensor& loss) override;
  void optimizer_step(torch::optim::Optimizer& optimizer) override;

  const FSDPOptions& options() const noexcept {
    return options_;
  }

  /// The units, by the module path that roots them ("" is the root unit).
  const std::vector<std::string>& units() const noexcept {
    return unit_names_;
  }

  /// Number of gathers so far (for tests and benchmarks).
  int64_t gathers() const noexcept {
    return gathers_;
  }

  /// Internal: the observer saw an operator read flats `touched`.
  void on_access(const std::vector<size_t>& touched);

  /// Internal: a gather the observer started failed. libtorch only logs what an observer
  /// throws, so the failure is kept and rethrown by the next backward or optimizer step.
  void record_failure(std::exception_ptr failure);

  /// Internal: the flat whose full buffer is `storage`, or -1.
  int64_t flat_of(const c10::StorageImpl* storage) const;

 protected:
  std::vector<std::vector<std::pair<std::string, at::Tensor>>>
  partition(const std::vector<std::pair<std::string, at::Tensor>>& params) override;
  bool persistent_gradients() const override {
    return false;
  }
  bool replicate() const override {
    return options_.sharding_strategy == ShardingStrategy::NO_SHARD;
  }
  void ensure_gathered(size_t flat) override;
  void after_step(const std::vector<size_t>& flats) override;
  void after_load() override;

 private:
  void assign_units(torch::nn::Module& module);
  void free_flat(size_t flat);
  void free_all();
  size_t capacity() const;
  void end_summon(bool writeback) noexcept;
  /// Throws the error for parameters read outside a step, if any was.
  void check_reads_outside();

  FSDPOptions options_;
  std::vector<std::string> unit_names_;
  std::map<const c10::TensorImpl*, size_t> unit_of_;
  std::map<const c10::StorageImpl*, size_t> storage_to_flat_;
  std::list<size_t> lru_;                      // gathered flats, most recent first
  std::map<size_t, std::shared_ptr<Work>> prefetching_;
  std::vector<size_t> forward_order_;          // flats in the order of the first forward
  bool order_recorded_ = false;
  int64_t gathers_ = 0;
  uint64_t observer_ = 0;
  bool observing_ = false;
  std::exception_ptr failure_;
  void rethrow_failure();
  int in_step_ = 0;                      // steps (and backward, optimizer step) entered
  int summoned_ = 0;                     // summon_full_params scopes open
  bool failed_ = false;                  // fit failed on this rank: no collective in teardown
  std::vector<size_t> read_outside_;     // flats read outside a step while not gathered
};

} // namespace caftrain
