// DDPStrategy: data parallelism with bucketed gradient all-reduce overlapped with backward.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "strategies/strategy.hpp"

namespace caftrain {

class GradientReducer;

/// Options of `DDPStrategy`; defaults are PyTorch DDP's.
struct DDPOptions {
  /// Cap of a gradient bucket in MiB (c10d's kDefaultBucketBytesCap). Default 25.
  double bucket_cap_mb = 25.0;
  /// Cap of the first bucket in MiB, so that communication starts early in backward
  /// (c10d's kDefaultFirstBucketBytes). Default 1.
  double first_bucket_cap_mb = 1.0;
  /// Allow parameters that get no gradient in a step (they are reduced as zeros).
  /// Default false: such a parameter is an error naming it.
  bool find_unused_parameters = false;
  /// Broadcast rank 0's buffers (BatchNorm statistics) before every training step.
  /// Default true.
  bool broadcast_buffers = true;
};

/// Distributed data parallel training (Lightning's DDPStrategy, Ray's RayDDPStrategy).
///
/// At setup every rank checks that its parameters have the same shapes as rank 0's and
/// takes rank 0's parameters and buffers. Gradients live in flat buckets (parameters in
/// reverse registration order, the order backward produces them; first bucket small so
/// communication starts early). A full bucket is averaged with an asynchronous all-reduce
/// while backward goes on (`GradientReducer`, the mechanism ZeRO and FSDP share, with
/// persistent buckets and all-reduce as its policy). While gradient sync is off
/// (accumulation) gradients just accumulate locally.
class DDPStrategy : public Strategy {
 public:
  explicit DDPStrategy(DDPOptions options = {});
  ~DDPStrategy() override;
  DDPStrategy(const DDPStrategy& other);

  std::string name() const override;
  bool is_distributed() const override {
    return true;
  }

  void setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
             c10::Device device) override;
  void teardown() override;
  void before_training_step() override;
  void finish_gradient_sync() override;
  void zero_grad(torch::optim::Optimizer& optimizer) override;
  MemoryStats memory_stats() const override;

  const DDPOptions& options() const noexcept {
    return options_;
  }

  /// Number of gradient buckets (after setup).
  size_t num_buckets() const;

  /// Parameter indices of each bucket, in bucket order (after setup).
  std::vector<std::vector<size_t>> bucket_assignment() const;

 private:
  DDPOptions options_;
  std::unique_ptr<GradientReducer> reducer_;
};

/// Checks that every rank's parameters have rank 0's names and shapes; throws
/// `Error(rank_mismatch)` naming the first difference. Collective.
void verify_same_parameters(torch::nn::Module& module, Communicator& communicator);

/// Copies rank 0's parameters and buffers to every rank (one coalesced broadcast per
/// dtype). Collective.
void broadcast_module_state(torch::nn::Module& module, Communicator& communicator,
                            bool parameters = true, bool buffers = true);

} // namespace caftrain
