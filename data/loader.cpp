#include "data/loader.hpp"

#include "core/error.hpp"

namespace caftrain::data {

namespace {

std::shared_ptr<Dataset> checked(std::shared_ptr<Dataset> dataset, const LoaderOptions& options) {
  if (!dataset)
    throw Error(Errc::invalid_argument, "DataLoader needs a dataset, got a null pointer");
  if (options.batch_size < 1)
    throw Error(Errc::invalid_argument, "DataLoader: batch_size is " +
                                          std::to_string(options.batch_size) +
                                          "; it must be at least 1");
  return dataset;
}

} // namespace

DataLoader::DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options)
  : DataLoader(std::move(dataset), options,
               SamplerOptions{1, 0, options.shuffle, options.seed, false}) {
  // nop
}

DataLoader::DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options,
                       SamplerOptions sampling)
  : dataset_(checked(std::move(dataset), options)),
    options_(options),
    sampler_(dataset_->length(), sampling) {
  // nop
}

DataLoader DataLoader::distributed(int64_t rank, int64_t world_size) const {
  return DataLoader(dataset_, options_,
                    SamplerOptions{world_size, rank, options_.shuffle, options_.seed, false});
}

size_t DataLoader::size() const noexcept {
  auto n = sampler_.num_samples();
  auto bs = static_cast<size_t>(options_.batch_size);
  return options_.drop_last ? n / bs : (n + bs - 1) / bs;
}

void DataLoader::set_epoch(int64_t epoch) {
  if (epoch != sampler_.epoch())
    sampler_.set_epoch(epoch);
}

Batch DataLoader::batch(size_t i) const {
  auto& indices = sampler_.indices();
  auto bs = static_cast<size_t>(options_.batch_size);
  auto first = i * bs;
  if (i >= size())
    throw Error(Errc::invalid_argument, "DataLoader: batch " + std::to_string(i) +
                                          " requested but an epoch has " +
                                          std::to_string(size()) + " batches");
  auto last = std::min(indices.size(), first + bs);
  return dataset_->get_batch(c10::ArrayRef<size_t>(indices.data() + first, last - first));
}

DataLoader::iterator DataLoader::begin() const {
  return iterator(this, 0);
}

DataLoader::iterator DataLoader::end() const {
  return iterator(this, size());
}

} // namespace caftrain::data
