#include "checkpoint/state_dict.hpp"

#include <set>

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include "checkpoint/files.hpp"
#include "core/error.hpp"

namespace caftrain {

StateDict state_dict(const torch::nn::Module& module) {
  StateDict result;
  for (auto& item : module.named_parameters(/*recurse=*/true))
    result.insert(item.key(), item.value().detach());
  for (auto& item : module.named_buffers(/*recurse=*/true))
    result.insert(item.key(), item.value().detach());
  return result;
}

void load_state_dict(torch::nn::Module& module, const StateDict& state, LoadOptions options) {
  auto own = state_dict(module);
  std::vector<std::string> missing, unexpected, mismatched;
  for (auto& item : own) {
    auto* theirs = state.find(item.key());
    if (!theirs) {
      missing.push_back(item.key());
    } else if (theirs->sizes() != item.value().sizes()) {
      std::ostringstream msg;
      msg << item.key() << " (checkpoint " << theirs->sizes() << ", model " << item.value().sizes()
          << ")";
      mismatched.push_back(msg.str());
    }
  }
  for (auto& item : state)
    if (!own.contains(item.key()))
      unexpected.push_back(item.key());
  auto list = [](const std::vector<std::string>& xs) {
    std::string out;
    for (size_t i = 0; i < xs.size() && i < 8; ++i)
      out += (i ? ", " : "") + xs[i];
    if (xs.size() > 8)
      out += ", ... (" + std::to_string(xs.size()) + " in all)";
    return out;
  };
  std::string problems;
  if (!mismatched.empty())
    problems += " shape mismatch: " + list(mismatched) + ".";
  if (options.strict && !missing.empty())
    problems += " missing keys: " + list(missing) + ".";
  if (options.strict && !unexpected.empty())
    problems += " unexpected keys: " + list(unexpected) + ".";
  if (!problems.empty())
    throw Error(Errc::state_mismatch,
                "state dict does not fit the model:" + problems +
                  " Load it into the model it was saved from (or pass strict = false to skip "
                  "missing and unexpected keys).");
  torch::NoGradGuard no_grad;
  for (auto& item : own)
    if (auto* theirs = state.find(item.key()))
      item.value().copy_(*theirs);
}

std::vector<char> serialize_state_dict(const StateDict& state) {
  return bytes_of(state_dict_source(state));
}

FileSource state_dict_source(StateDict state) {
  return [state = std::move(state)](const ByteSink& out) {
    c10::Dict<std::string, at::Tensor> dict;
    for (auto& item : state)
      dict.insert(item.key(), item.value().detach().to(torch::kCPU).contiguous());
    // What torch::pickle_save does (Python's torch.save format: data.pkl and one record
    // per tensor), with the archive going to `out` as it is made instead of into one
    // vector: the pickle holds references, the records the tensors' own memory.
    std::vector<char> pickled;
    torch::jit::Pickler pickler(
      [&](const char* data, size_t size) { pickled.insert(pickled.end(), data, data + size); });
    pickler.protocol();
    pickler.pushIValue(dict);
    pickler.stop();
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t size) {
      out(static_cast<const char*>(data), size);
      return size;
    });
    torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(),
                                       writer);
    writer.writeEndOfFile();
  };
}

at::Tensor TensorCopies::copy(const std::string& key, const at::Tensor& t) {
  if (!t.defined())
    return {};
  torch::NoGradGuard no_grad;
  auto& buffer = buffers_[key];
  bool fits = buffer.defined() && buffer.sizes() == t.sizes() && buffer.dtype() == t.dtype() &&
              buffer.use_count() == 1 && buffer.storage().use_count() == 1;
  if (!fits)
    buffer = at::empty(t.sizes(), t.options().device(torch::kCPU).requires_grad(false));
  buffer.copy_(t.detach());
  return buffer;
}

int64_t TensorCopies::bytes() const {
  int64_t total = 0;
  for (auto& [key, t] : buffers_)
    total += static_cast<int64_t>(t.nbytes());
  return total;
}

StateDict deserialize_state_dict(const std::vector<char>& bytes, const std::string& origin) {
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw Error(Errc::corrupt_checkpoint,
                "'" + origin + "' is not a readable state dict (" +
                  what.substr(0, what.find('\n')) + "); the file is corrupt or truncated");
  }
  if (!value.isGenericDict())
    throw Error(Errc::corrupt_checkpoint, "'" + origin + "' holds a " + value.tagKind() +
                                            ", not a name -> tensor dict");
  StateDict result;
  for (auto& entry : value.toGenericDict()) {
    if (!entry.key().isString() || !entry.value().isTensor())
      throw Error(Errc::corrupt_checkpoint,
                  "'" + origin + "' has an entry that is not string -> tensor");
    result.insert(entry.key().toStringRef(), entry.value().toTensor());
  }
  return result;
}

void save_state_dict(const StateDict& state, const std::string& path) {
  write_file_atomic(path, serialize_state_dict(state));
}

StateDict load_state_dict_file(const std::string& path) {
  return deserialize_state_dict(read_file(path), path);
}

} // namespace caftrain
