// Sharded checkpoints: each rank's shard of flattened parameters and optimizer state, a
// layout to put them back together, and consolidation into one state dict.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/state_dict.hpp"

namespace caftrain {

/// File names of a sharded checkpoint.
constexpr const char* kLayoutFile = "layout.json";
constexpr const char* kBuffersFile = "buffers.pt";
/// Every optimizer's param-group options (lr, weight_decay, ...; libtorch's archive of
/// them, see `optimizer_options_bytes`), written by rank 0.
constexpr const char* kOptimizerOptionsFile = "optimizer_options.pt";

/// The shard file of `rank`: "shards/rank_<rank>.pt".
std::string shard_file(int64_t rank);

/// One flat buffer of a sharded checkpoint.
struct FlatLayout {
  std::string id;
  int64_t numel = 0;
  int64_t padded = 0;
  int64_t shard_size = 0;
  /// Parameter name, shape and place in the flat buffer, in order.
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0;
    int64_t numel = 0;
  };
  std::vector<Entry> entries;
};

/// How a sharded checkpoint was cut: the writer's world size, strategy and flat buffers.
struct ShardLayout {
  int64_t world_size = 1;
  std::string strategy;
  std::vector<FlatLayout> flats;
};

std::string to_json(const ShardLayout& layout);
ShardLayout layout_from_json(const std::string& text, const std::string& origin);

/// The full (unsharded) content of a sharded checkpoint, by parameter name.
struct ConsolidatedState {
  /// Parameters and buffers under the module's names (what `state_dict(module)` gives).
  StateDict model;
  /// Element-wise optimizer state of each parameter: name -> state key -> tensor of the
  /// parameter's shape ("step" is a 0-dim int64 tensor).
  std::map<std::string, std::map<std::string, at::Tensor>> optimizer;
};

/// True when the checkpoint was written by a sharded strategy (it has layout.json).
bool is_sharded(const Checkpoint& checkpoint);

/// Reads every rank's shard and puts parameters, buffers and optimizer state back
/// together. Throws `Error(corrupt_checkpoint)` naming a missing or inconsistent shard.
ConsolidatedState consolidate(const Checkpoint& checkpoint);

/// Writes the consolidated model state as a file Python's torch.load reads (`model.pt`
/// of an unsharded checkpoint), atomically.
void consolidate_to_file(const Checkpoint& checkpoint, const std::string& path);

} // namespace caftrain
