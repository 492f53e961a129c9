// FlatShard: parameters flattened into one buffer and sharded evenly over the ranks.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "environment/communicator.hpp"

namespace torch::optim {
class Optimizer;
}

namespace caftrain {

/// Where one parameter lives in a flat buffer.
struct FlatEntry {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;
  int64_t numel = 0;
};

/// A group of parameters of one dtype flattened into one buffer of `padded` elements
/// (their total rounded up to a multiple of the world size), sharded evenly: rank r owns
/// elements [r * shard_size, (r + 1) * shard_size). The parameters become views of the
/// full buffer; the rank's shard is a leaf tensor (the optimizer's parameter) with its own
/// gradient: a separate tensor when the full buffer comes and goes (FSDP), or an alias of
/// the rank's chunk of the full buffer when that stays resident (ZeRO), so that it costs
/// no memory. ZeroStrategy's buckets and FSDPStrategy's units are FlatShards.
class FlatShard {
 public:
  /// Flattens `params` (name, parameter) in the given order, copying their current values.
  /// `alias_shard`: the shard is a view of the full buffer, which must then never be freed.
  FlatShard(std::string id, std::vector<std::pair<std::string, at::Tensor>> params, int rank,
            int world, bool alias_shard = false);

  // -- layout -----------------------------------------------------------------------

  const std::string& id() const noexcept {
    return id_;
  }
  const std::vector<FlatEntry>& entries() const noexcept {
    return entries_;
  }
  const std::vector<at::Tensor>& params() const noexcept {
    return params_;
  }
  int64_t numel() const noexcept {
    return numel_;
  }
  int64_t padded() const noexcept {
    return padded_;
  }
  int64_t shard_size() const noexcept {
    return shard_size_;
  }
  int rank() const noexcept {
    return rank_;
  }
  int world() const noexcept {
    return world_;
  }

  // -- buffers ----------------------------------------------------------------------

  /// The full flat buffer; the parameters are views of it. Its storage is empty while
  /// `gathered()` is false (FSDP frees it at rest).
  const at::Tensor& full() const noexcept {
    return full_;
  }

  /// This rank's master shard: the parameter its optimizer steps.
  const at::Tensor& shard() const noexcept {
    return shard_;
  }

  /// The gradient of the shard (allocated on first use; zeros).
  at::Tensor& shard_grad();

  bool gathered() const noexcept {
    return gathered_;
  }

  /// True while the freed full buffer holds NaN (see `poison`).
  bool poisoned() const noexcept {
    return poisoned_;
  }

  /// Bytes of the full buffer and of the shard.
  int64_t full_bytes() const noexcept;
  /// Bytes of the shard; 0 when it aliases the full buffer (it holds nothing of its own).
  int64_t shard_bytes() const noexcept;
  /// Bytes of one shard, aliased or not (the size of its gradient, of a reduce-scatter's
  /// output).
  int64_t shard_size_bytes() const noexcept;

  // -- operations ---------------------------------------------------------------------

  /// Copies the rank's chunk of the full buffer into the shard (after the full buffer
  /// received new values, e.g. loaded weights).
  void shard_from_full();

  /// Frees the full buffer's storage (the parameter views stay, without data).
  void free_full();

  /// Gives a freed full buffer memory filled with NaN, still not gathered: a read of a
  /// parameter that is not there sees NaN instead of crashing on a buffer without data.
  /// The next gather reuses the memory; `free_full` releases it.
  void poison();

  /// Allocates the full buffer's storage again and starts gathering every rank's shard
  /// into it; the returned work (null when done at once: one rank) must complete before
  /// the parameters are read.
  std::shared_ptr<Work> gather(Communicator* comm);

  /// Allocates without gathering (the caller fills it).
  void allocate_full();

 private:
  std::string id_;
  int rank_;
  int world_;
  std::vector<FlatEntry> entries_;
  std::vector<at::Tensor> params_;
  int64_t numel_ = 0;
  int64_t padded_ = 0;
  int64_t shard_size_ = 0;
  at::Tensor full_;
  at::Tensor shard_;
  bool gathered_ = true;
  bool poisoned_ = false;
  bool alias_shard_ = false;
};

/// Checks `optimizer` can step a flat shard (an element-wise optimizer: Adam, AdamW, SGD,
/// RMSprop, Adagrad); throws `Error(invalid_config)` naming it otherwise.
void require_elementwise(const torch::optim::Optimizer& optimizer, const std::string& strategy);

} // namespace caftrain

namespace caftrain {

/// Element-wise state of `param` in `optimizer` by name ("exp_avg", "exp_avg_sq",
/// "momentum_buffer", ...) plus "step" (a 0-dim int64 tensor, when the optimizer counts
/// steps); empty when the parameter has no state yet. Throws `Error(invalid_config)` for
/// an optimizer that `require_elementwise` refuses.
std::map<std::string, at::Tensor> optimizer_state_of(const torch::optim::Optimizer& optimizer,
                                                     const at::Tensor& param);

/// Installs state of the form `optimizer_state_of` returns for `param`.
void set_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                         const std::map<std::string, at::Tensor>& state);

} // namespace caftrain
