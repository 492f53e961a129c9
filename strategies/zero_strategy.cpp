#include "strategies/zero_strategy.hpp"

#include "core/error.hpp"
#include "strategies/gradient_reducer.hpp"

namespace caftrain {

namespace {

constexpr double kMiB = 1024.0 * 1024.0;

} // namespace

ZeroStrategy::ZeroStrategy(ZeroOptions options) : options_(options) {
  if (options_.stage != 1 && options_.stage != 2)
    throw Error(Errc::invalid_config, "ZeroStrategy stage " + std::to_string(options_.stage) +
                                        " is not supported; use 1 (optimizer state) or 2 (+ "
                                        "gradients), or FSDPStrategy to shard parameters too");
  if (options_.bucket_cap_mb <= 0 || options_.first_bucket_cap_mb <= 0)
    throw Error(Errc::invalid_config, "ZeroStrategy: bucket caps must be positive");
}

ZeroStrategy::ZeroStrategy(const ZeroStrategy& other) : ShardedStrategy(), options_(other.options_) {
  // A copy starts unconfigured: flats and hooks belong to one setup.
}

std::string ZeroStrategy::name() const {
  return "zero_stage_" + std::to_string(options_.stage);
}

bool ZeroStrategy::persistent_gradients() const {
  return options_.stage == 1;
}

std::vector<std::vector<std::pair<std::string, at::Tensor>>>
ZeroStrategy::partition(const std::vector<std::pair<std::string, at::Tensor>>& params) {
  // c10d's bucket plan, as DDP's: reverse registration order (the order backward
  // produces gradients), a new bucket at the cap or at a change of dtype.
  std::vector<at::Tensor> tensors;
  for (auto& item : params)
    tensors.push_back(item.second);
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> buckets;
  for (auto& members : plan_buckets(tensors, options_.first_bucket_cap_mb * kMiB,
                                    options_.bucket_cap_mb * kMiB)) {
    buckets.emplace_back();
    for (auto k : members)
      buckets.back().push_back(params[k]);
  }
  return buckets;
}

void ZeroStrategy::after_step(const std::vector<size_t>& flats) {
  // Every rank stepped its shards: gather them back into everyone's full parameters.
  std::vector<std::shared_ptr<Work>> works;
  for (auto f : flats)
    works.push_back(flats_[f]->gather(communicator_.get()));
  for (auto& w : works)
    if (w)
      w->wait();
}

} // namespace caftrain
