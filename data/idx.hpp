// Reader for the IDX format of MNIST and Fashion-MNIST (gzip-compressed or plain).
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

namespace caftrain::data {

/// Reads the IDX file at `path` (`.gz` or plain: zlib reads both) into a uint8 tensor of
/// the shape the file declares. `expected_dims` (when > 0) is the number of dimensions the
/// caller needs, e.g. 3 for images and 1 for labels. Throws `Error(data_error)` naming the
/// file and the problem when it is missing, has a wrong magic number, another element type
/// or dimension count than expected, or is shorter than its header says.
at::Tensor read_idx(const std::string& path, int expected_dims = 0);

} // namespace caftrain::data
