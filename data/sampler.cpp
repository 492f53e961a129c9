#include "data/sampler.hpp"

#include <torch/torch.h>

#include "core/error.hpp"

namespace caftrain::data {

DistributedSampler::DistributedSampler(size_t dataset_size, SamplerOptions options)
  : dataset_size_(dataset_size), options_(options) {
  if (options_.num_replicas < 1)
    throw Error(Errc::invalid_argument, "DistributedSampler: num_replicas is " +
                                          std::to_string(options_.num_replicas) +
                                          "; it must be at least 1");
  if (options_.rank < 0 || options_.rank >= options_.num_replicas)
    throw Error(Errc::invalid_argument,
                "DistributedSampler: rank " + std::to_string(options_.rank) +
                  " is outside [0, " + std::to_string(options_.num_replicas) + ")");
  compute();
}

void DistributedSampler::compute() {
  auto n = static_cast<int64_t>(dataset_size_);
  auto replicas = options_.num_replicas;
  int64_t samples = 0;
  if (options_.drop_last && n % replicas != 0)
    samples = (n - replicas + replicas - 1) / replicas; // ceil((n - replicas) / replicas)
  else
    samples = (n + replicas - 1) / replicas;
  samples = std::max<int64_t>(samples, 0);
  num_samples_ = static_cast<size_t>(samples);
  auto total = samples * replicas;
  std::vector<int64_t> order(static_cast<size_t>(n));
  if (options_.shuffle && n > 0) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + static_cast<uint64_t>(epoch_));
    auto perm = torch::randperm(n, gen, torch::kLong);
    std::copy_n(perm.data_ptr<int64_t>(), n, order.begin());
  } else {
    for (int64_t i = 0; i < n; ++i)
      order[static_cast<size_t>(i)] = i;
  }
  if (total > n && n > 0) {
    for (int64_t i = 0, pad = total - n; i < pad; ++i)
      order.push_back(order[static_cast<size_t>(i % n)]);
  } else {
    order.resize(static_cast<size_t>(total));
  }
  indices_.clear();
  indices_.reserve(num_samples_);
  for (auto i = options_.rank; i < total; i += replicas)
    indices_.push_back(static_cast<size_t>(order[static_cast<size_t>(i)]));
  position_ = 0;
}

void DistributedSampler::set_epoch(int64_t epoch) {
  epoch_ = epoch;
  compute();
}

void DistributedSampler::seek(size_t position) {
  position_ = std::min(position, indices_.size());
}

void DistributedSampler::reset(torch::optional<size_t> new_size) {
  if (new_size && *new_size != dataset_size_) {
    dataset_size_ = *new_size;
    compute();
  }
  position_ = 0;
}

torch::optional<std::vector<size_t>> DistributedSampler::next(size_t batch_size) {
  if (position_ >= indices_.size())
    return torch::nullopt;
  auto end = std::min(indices_.size(), position_ + batch_size);
  std::vector<size_t> batch(indices_.begin() + static_cast<ptrdiff_t>(position_),
                            indices_.begin() + static_cast<ptrdiff_t>(end));
  position_ = end;
  return batch;
}

void DistributedSampler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("epoch", torch::tensor(epoch_, torch::kLong), /*is_buffer=*/true);
  archive.write("position", torch::tensor(static_cast<int64_t>(position_), torch::kLong), true);
}

void DistributedSampler::load(torch::serialize::InputArchive& archive) {
  auto epoch = torch::empty({}, torch::kLong);
  auto position = torch::empty({}, torch::kLong);
  archive.read("epoch", epoch, /*is_buffer=*/true);
  archive.read("position", position, true);
  set_epoch(epoch.item<int64_t>());
  seek(static_cast<size_t>(position.item<int64_t>()));
}

} // namespace caftrain::data
