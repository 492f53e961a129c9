// State dicts: a module's named tensors, saved in a file Python's torch.load reads.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/ordered_dict.h>

#include "checkpoint/file_source.hpp"

namespace torch::nn {
class Module;
}

namespace caftrain {

/// Named tensors in registration order: parameters and buffers under the usual PyTorch
/// names (`layer1.0.conv1.weight`, `bn1.running_mean`, ...).
using StateDict = torch::OrderedDict<std::string, at::Tensor>;

/// Options of `load_state_dict`.
struct LoadOptions {
  /// Require exactly the module's keys (PyTorch's strict=True). Default true.
  bool strict = true;
};

/// The module's parameters and buffers, detached (they share storage with the module).
StateDict state_dict(const torch::nn::Module& module);

/// Copies `state` into the module's parameters and buffers. Throws
/// `Error(state_mismatch)` listing missing and unexpected keys (when strict) and every
/// tensor whose shape differs, before anything is copied.
void load_state_dict(torch::nn::Module& module, const StateDict& state, LoadOptions options = {});

/// Serialises `state` in PyTorch's zip format as a name -> tensor dict: Python's
/// `torch.load(path)` returns a dict that `module.load_state_dict` accepts. Tensors are
/// copied to CPU. Returns the bytes.
std::vector<char> serialize_state_dict(const StateDict& state);

/// The same bytes as a source that serializes when it is written, straight into its
/// sink, from the tensors `state` holds (the caller copies them first if they change
/// meanwhile: a checkpoint snapshot).
FileSource state_dict_source(StateDict state);

/// Copies of tensors that live from one checkpoint snapshot to the next: a snapshot then
/// copies into memory it has touched before, where a fresh clone also pays a page fault
/// per 4 KiB (most of its cost). Used on one thread (the training thread).
class TensorCopies {
 public:
  /// A CPU copy of `t` (undefined for an undefined `t`) in the buffer named `key`. The
  /// buffer is reused when its shape and type still fit and nothing else holds it (the
  /// copy a source still serializes is never overwritten: a new buffer takes its place).
  at::Tensor copy(const std::string& key, const at::Tensor& t);

  /// Bytes held by the buffers.
  int64_t bytes() const;

 private:
  std::map<std::string, at::Tensor> buffers_;
};

/// Parses bytes written by `serialize_state_dict` (or Python's `torch.save(state_dict)`).
/// Throws `Error(corrupt_checkpoint)` naming `origin` when they are not a name -> tensor dict.
StateDict deserialize_state_dict(const std::vector<char>& bytes, const std::string& origin);

/// Writes `state` to `path` atomically (temporary file, fsync, rename).
void save_state_dict(const StateDict& state, const std::string& path);

/// Reads a state dict file. Throws `Error(io_error)` when it cannot be read and
/// `Error(corrupt_checkpoint)` naming the file when it is not a valid state dict.
StateDict load_state_dict_file(const std::string& path);

} // namespace caftrain
