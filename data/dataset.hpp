// Batch, the Dataset interface, and TensorDataset.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include <torch/data/datasets/base.h>
#include <torch/data/example.h>

namespace caftrain {

/// One batch of inputs and targets, as libtorch's data API shapes it (`.data`, `.target`).
using Batch = torch::data::Example<>;

namespace data {

/// A data set read in batches of indices: libtorch's `BatchDataset`, so samplers and
/// loaders of `torch::data` work with it too. Subclass it for data of your own.
class Dataset : public torch::data::datasets::BatchDataset<Dataset, Batch> {
 public:
  /// Number of examples; every dataset used with `DataLoader` has a known size.
  virtual size_t length() const = 0;

  torch::optional<size_t> size() const final {
    return length();
  }
};

/// Examples held in two tensors whose first dimension indexes the example.
class TensorDataset : public Dataset {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_argument)` when the first dimensions differ.
  TensorDataset(at::Tensor data, at::Tensor targets);

  // -- properties -------------------------------------------------------------------

  size_t length() const override;

  const at::Tensor& data() const noexcept {
    return data_;
  }

  const at::Tensor& targets() const noexcept {
    return targets_;
  }

  // -- access -----------------------------------------------------------------------

  Batch get_batch(c10::ArrayRef<size_t> indices) override;

 private:
  at::Tensor data_;
  at::Tensor targets_;
};

} // namespace data
} // namespace caftrain
