// Optimizer archives: libtorch's saved optimizers read by param group and parameter index
// (not by tensor address), so that their state and hyperparameters move between
// strategies: unsharded into shards, shards into one process.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "checkpoint/file_source.hpp"

namespace torch::optim {
class Optimizer;
class OptimizerOptions;
class OptimizerParamState;
} // namespace torch::optim

namespace caftrain {

/// One optimizer's hyperparameters and element-wise state, by param group and parameter
/// index in the order configure_optimizers built the groups.
struct SavedOptimizer {
  /// One param group.
  struct Group {
    /// The group's options (lr, weight_decay, betas, momentum, ...), of the optimizer's
    /// own options type; null when the checkpoint did not record them.
    std::shared_ptr<torch::optim::OptimizerOptions> options;
    /// Per parameter of the group, in order: state key -> tensor of the parameter's shape
    /// ("exp_avg", "momentum_buffer", ...; "step" is a 0-dim int64 tensor), as
    /// `optimizer_state_of` gives it. Empty when the parameter had no state yet.
    std::vector<std::map<std::string, at::Tensor>> state;
  };
  std::vector<Group> groups;
};

/// Every optimizer's state and options in libtorch's archive (`Optimizer::save`), nested
/// as "optimizer_<i>" beside "count": the `optimizer.pt` of an unsharded checkpoint.
std::vector<char> optimizers_bytes(const std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers);

class TensorCopies;

/// The bytes `optimizers_bytes` gives now, as a source that serializes later, on any
/// thread, while the optimizers step on: their state tensors are copied now (into
/// `copies`), their options and param groups too. An optimizer that is not Adam, AdamW,
/// SGD, RMSprop or Adagrad (LBFGS, a type of one's own) is serialized now instead.
FileSource optimizers_source(const std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers,
                             TensorCopies& copies);

/// Every optimizer's param-group options only, in the same layout (no state): the
/// `optimizer_options.pt` of a sharded checkpoint, whose state lives in the shards.
std::vector<char> optimizer_options_bytes(const std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers);

/// Reads bytes written by `optimizers_bytes` or `optimizer_options_bytes` as optimizers of
/// the types of `like` (what configure_optimizers returned, one per saved optimizer):
/// each parameter's state is looked up through its group's list of saved tensor
/// addresses, which is how libtorch itself maps state back. Only element-wise optimizers
/// (Adam, AdamW, SGD, RMSprop, Adagrad) have their state read; any libtorch optimizer has
/// its options read. Throws `Error(state_mismatch)` naming `origin` when the count of
/// optimizers, of groups or of parameters per group differs, or the types do not match.
std::vector<SavedOptimizer> read_saved_optimizers(
  const std::vector<char>& bytes, const std::vector<std::shared_ptr<torch::optim::Optimizer>>& like,
  const std::string& origin);

/// Sets the options of each param group of `optimizer` to `saved`'s (groups without saved
/// options keep theirs). libtorch's `Optimizer::load` restores state only; this restores
/// lr, weight_decay and every other hyperparameter. Throws `Error(state_mismatch)` naming
/// `origin` when the number of groups differs.
void restore_options(torch::optim::Optimizer& optimizer, const SavedOptimizer& saved,
                     const std::string& origin);

/// The tensors of one parameter's element-wise optimizer state (Adam, AdamW, SGD, RMSprop,
/// Adagrad), by name, plus "step" (a 0-dim int64 tensor) for the optimizers that count
/// steps. Empty for other state types.
std::map<std::string, at::Tensor> state_tensors(const torch::optim::OptimizerParamState& state);

} // namespace caftrain
