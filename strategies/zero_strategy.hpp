// ZeroStrategy: ZeRO stages 1 and 2 (optimizer state, then gradients, sharded).
#pragma once

#include "strategies/sharded_strategy.hpp"

namespace caftrain {

/// Options of `ZeroStrategy`.
struct ZeroOptions {
  /// 1: optimizer state sharded; 2: gradients sharded too. Default 1.
  int stage = 1;
  /// Cap of a bucket (a flat reduced as one piece) in MiB. Default 25.
  double bucket_cap_mb = 25.0;
  /// Cap of the first bucket in MiB, so that reduction starts early in backward. Default 1.
  double first_bucket_cap_mb = 1.0;
};

/// ZeRO data parallelism (Lightning's DeepSpeedStrategy stages 1-2, Ray's
/// RayDeepSpeedStrategy): the parameters are flattened into buckets (reverse registration
/// order, like DDP's), each sharded evenly over the ranks; each rank's optimizer holds
/// state only for its shards. After backward the gradients are reduce-scattered (averaged)
/// into the shards, each rank steps its shards, and the updated shards are all-gathered
/// back into every rank's full parameters.
///
/// Stage 1 keeps full gradients (the parameters' .grad are views of a flat buffer; with
/// gradient accumulation they add up locally and are reduced once per window). Stage 2
/// keeps only the shard's gradient: each bucket's gradients are reduce-scattered as soon
/// as backward has produced them, then freed; with accumulation every micro-batch is
/// reduced and added to the shard. Any element-wise optimizer works (Adam, AdamW, SGD with
/// momentum, RMSprop, Adagrad): it is re-pointed at the shards, so LR schedulers go on
/// working. Checkpoints are sharded (see checkpoint/sharded.hpp).
class ZeroStrategy : public ShardedStrategy {
 public:
  /// Throws `Error(invalid_config)` for a stage other than 1 or 2, or bad caps.
  explicit ZeroStrategy(ZeroOptions options = {});
  ZeroStrategy(const ZeroStrategy& other);

  std::string name() const override;

  const ZeroOptions& options() const noexcept {
    return options_;
  }

 protected:
  std::vector<std::vector<std::pair<std::string, at::Tensor>>>
  partition(const std::vector<std::pair<std::string, at::Tensor>>& params) override;
  bool persistent_gradients() const override;
  bool parameters_resident() const override {
    return true;
  }
  void after_step(const std::vector<size_t>& flats) override;

 private:
  ZeroOptions options_;
};

} // namespace caftrain
