#include "strategies/zero_strategy.hpp"

#include "core/error.hpp"

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
  // Reverse registration order (the order backward produces gradients); a new bucket at
  // the cap or at a change of dtype.
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> buckets;
  double bytes = 0;
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    auto& p = it->second;
    double cap = (buckets.size() <= 1 ? options_.first_bucket_cap_mb : options_.bucket_cap_mb) * kMiB;
    auto size = static_cast<double>(p.numel() * p.element_size());
    if (buckets.empty() || p.scalar_type() != buckets.back().front().second.scalar_type() ||
        (bytes > 0 && bytes + size > cap)) {
      buckets.emplace_back();
      bytes = 0;
    }
    buckets.back().push_back(*it);
    bytes += size;
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
