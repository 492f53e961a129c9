// DistributedSampler: each rank's disjoint share of a data set, reshuffled per epoch.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/data/samplers/base.h>

namespace caftrain::data {

/// Options of a `DistributedSampler`; defaults are PyTorch's `DistributedSampler`.
struct SamplerOptions {
  /// Number of ranks sharing the data set. Default 1: the whole data set.
  int64_t num_replicas = 1;
  /// This rank, in [0, num_replicas). Default 0.
  int64_t rank = 0;
  /// Shuffle with a permutation drawn from `seed + epoch`. Default true.
  bool shuffle = true;
  /// Seed of the permutation; equal on every rank. Default 0.
  uint64_t seed = 0;
  /// Drop the tail that does not divide by num_replicas instead of padding it with
  /// indices from the front. Default false (pad, so every rank sees the same count).
  bool drop_last = false;
};

/// A sampler with the semantics of PyTorch's `torch.utils.data.DistributedSampler`: for
/// epoch e every rank draws the same permutation (seeded with seed + e, the same
/// `randperm` as Python's), pads or trims it to a multiple of num_replicas, and takes
/// every num_replicas-th index starting at its rank. Ranks' shares are disjoint except
/// for the padding. Implements libtorch's `Sampler` interface.
class DistributedSampler : public torch::data::samplers::Sampler<> {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_argument)` for num_replicas < 1 or a rank out of range.
  DistributedSampler(size_t dataset_size, SamplerOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// This rank's indices for the current epoch, in order.
  const std::vector<size_t>& indices() const noexcept {
    return indices_;
  }

  /// Number of indices this rank sees per epoch.
  size_t num_samples() const noexcept {
    return num_samples_;
  }

  int64_t epoch() const noexcept {
    return epoch_;
  }

  /// Position of the next index `next` returns.
  size_t position() const noexcept {
    return position_;
  }

  const SamplerOptions& options() const noexcept {
    return options_;
  }

  // -- modifiers --------------------------------------------------------------------

  /// Selects the permutation of `epoch` and rewinds.
  void set_epoch(int64_t epoch);

  /// Moves to `position` within the current epoch (resuming mid-epoch).
  void seek(size_t position);

  // -- torch::data::samplers::Sampler -------------------------------------------------

  void reset(torch::optional<size_t> new_size = torch::nullopt) override;

  torch::optional<std::vector<size_t>> next(size_t batch_size) override;

  void save(torch::serialize::OutputArchive& archive) const override;

  void load(torch::serialize::InputArchive& archive) override;

 private:
  void compute();

  size_t dataset_size_;
  SamplerOptions options_;
  size_t num_samples_ = 0;
  int64_t epoch_ = 0;
  size_t position_ = 0;
  std::vector<size_t> indices_;
};

} // namespace caftrain::data
