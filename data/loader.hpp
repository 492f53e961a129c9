// DataLoader: batches of a Dataset in the order of a DistributedSampler.
#pragma once

#include <cstdint>
#include <iterator>
#include <memory>

#include "data/dataset.hpp"
#include "data/sampler.hpp"

namespace caftrain::data {

/// Options of a `DataLoader`; defaults are PyTorch's `DataLoader`.
struct LoaderOptions {
  /// Examples per batch. Default 1.
  int64_t batch_size = 1;
  /// Reshuffle every epoch (from `seed + epoch`, identically on every rank). Default false.
  bool shuffle = false;
  /// Drop the last batch when it is smaller than batch_size. Default false.
  bool drop_last = false;
  /// Seed of the shuffling permutation. Default 0.
  uint64_t seed = 0;
};

/// Iterates a `Dataset` in batches. Single-process by default; `distributed(rank, world)`
/// gives the copy a Trainer uses on each rank (DistributedSampler semantics: disjoint
/// shares, reshuffled per epoch by `set_epoch`), as Lightning does for a DDP run.
class DataLoader {
 public:
  class iterator;

  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_argument)` for a null dataset or batch_size < 1.
  DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options = {});

  /// The same data and options, restricted to `rank`'s share of `world_size` ranks.
  DataLoader distributed(int64_t rank, int64_t world_size) const;

  // -- properties -------------------------------------------------------------------

  /// Number of batches per epoch (for this rank).
  size_t size() const noexcept;

  /// Number of examples per epoch (for this rank).
  size_t num_samples() const noexcept {
    return sampler_.num_samples();
  }

  const LoaderOptions& options() const noexcept {
    return options_;
  }

  const std::shared_ptr<Dataset>& dataset() const noexcept {
    return dataset_;
  }

  const DistributedSampler& sampler() const noexcept {
    return sampler_;
  }

  int64_t rank() const noexcept {
    return sampler_.options().rank;
  }

  int64_t world_size() const noexcept {
    return sampler_.options().num_replicas;
  }

  // -- iteration --------------------------------------------------------------------

  /// Selects the order of `epoch` (call before iterating each epoch, as with PyTorch).
  void set_epoch(int64_t epoch);

  /// Batch `i` of the current epoch, i < size().
  Batch batch(size_t i) const;

  iterator begin() const;
  iterator end() const;

 private:
  DataLoader(std::shared_ptr<Dataset> dataset, LoaderOptions options, SamplerOptions sampling);

  std::shared_ptr<Dataset> dataset_;
  LoaderOptions options_;
  DistributedSampler sampler_;
};

/// Input iterator over the batches of one epoch.
class DataLoader::iterator {
 public:
  using iterator_category = std::input_iterator_tag;
  using value_type = Batch;
  using difference_type = std::ptrdiff_t;
  using pointer = const Batch*;
  using reference = Batch;

  iterator(const DataLoader* loader, size_t index) : loader_(loader), index_(index) {
    // nop
  }

  Batch operator*() const {
    return loader_->batch(index_);
  }

  iterator& operator++() {
    ++index_;
    return *this;
  }

  size_t index() const noexcept {
    return index_;
  }

  friend bool operator==(const iterator& x, const iterator& y) {
    return x.index_ == y.index_;
  }

  friend bool operator!=(const iterator& x, const iterator& y) {
    return !(x == y);
  }

 private:
  const DataLoader* loader_;
  size_t index_;
};

} // namespace caftrain::data
