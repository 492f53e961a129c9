#include "data/dataset.hpp"

#include <torch/torch.h>

#include "core/error.hpp"

namespace caftrain::data {

TensorDataset::TensorDataset(at::Tensor data, at::Tensor targets)
  : data_(std::move(data)), targets_(std::move(targets)) {
  if (!data_.defined() || !targets_.defined() || data_.dim() == 0 || targets_.dim() == 0)
    throw Error(Errc::invalid_argument, "TensorDataset needs two defined tensors of at least "
                                        "one dimension (examples along dimension 0)");
  if (data_.size(0) != targets_.size(0))
    throw Error(Errc::invalid_argument,
                "TensorDataset: data has " + std::to_string(data_.size(0)) +
                  " examples but targets has " + std::to_string(targets_.size(0)) +
                  "; both must index the same examples along dimension 0");
}

size_t TensorDataset::length() const {
  return static_cast<size_t>(data_.size(0));
}

Batch TensorDataset::get_batch(c10::ArrayRef<size_t> indices) {
  auto index = torch::empty({static_cast<int64_t>(indices.size())}, torch::kLong);
  auto* out = index.data_ptr<int64_t>();
  for (size_t i = 0; i < indices.size(); ++i)
    out[i] = static_cast<int64_t>(indices[i]);
  return {data_.index_select(0, index), targets_.index_select(0, index)};
}

} // namespace caftrain::data
