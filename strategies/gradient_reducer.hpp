// GradientReducer: the one gradient-reduction mechanism under DDP, ZeRO and FSDP.
// Internal to the strategies (not part of caftrain.hpp).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "environment/communicator.hpp"
#include "strategies/block_cache.hpp"

namespace torch::autograd {
struct Node;
}

namespace caftrain {

/// Groups parameters into buckets in the order backward produces their gradients
/// (reverse registration order): a new bucket at `cap_bytes` (`first_cap_bytes` for the
/// first, so that communication starts early in backward) or at a change of dtype.
/// Returns each bucket's indices into `params`. c10d's bucket plan, shared by DDP's
/// buckets and ZeRO's flats.
std::vector<std::vector<size_t>> plan_buckets(const std::vector<at::Tensor>& params,
                                              double first_cap_bytes, double cap_bytes);

/// Turns the gradients backward produces into reduced gradients, bucket by bucket, while
/// backward goes on. What DDP, ZeRO and FSDP share:
///
/// - a hook on each parameter's gradient accumulator marks the parameter ready;
/// - a bucket whose parameters are all ready is launched, strictly in bucket order, so
///   that every rank issues its collectives in the same order (readiness order may differ
///   between ranks);
/// - `finish` completes a step: parameters without gradient are an error naming them or
///   count as zeros, every bucket's reduction is waited for and folded, and (with
///   `find_unused`) the ranks agree on which parameters some rank used, so that a
///   parameter no rank used keeps no gradient (optimizers and weight decay skip it, as
///   with PyTorch DDP's find_unused_parameters);
/// - inside an accumulation window (gradient sync off, `no_sync`) nothing is
///   communicated.
///
/// The strategies differ only in policy: what a launch does with a bucket's flat buffer
/// (all-reduce, reduce-scatter into a shard), what its fold does with the result, and
/// whether the buffers persist between steps (the parameters' `.grad` are views of them)
/// or exist only from a bucket's first gradient until its fold (the full gradients of a
/// whole model never exist at once: ZeRO-2, FSDP).
class GradientReducer {
 public:
  /// Where a bucket's parameters live in its flat buffer.
  struct Bucket {
    std::vector<size_t> members;  // parameter indices
    std::vector<int64_t> offsets; // element offset of each member
    int64_t size = 0;             // elements of the buffer, padding included
    at::TensorOptions options;
  };

  struct Policy {
    /// The strategy's name, in errors.
    std::string label;
    /// Buffers live between steps and the parameters' `.grad` are views of them
    /// (gradients accumulate straight into the buckets); else a buffer is allocated at its
    /// bucket's first gradient, takes the `.grad` (which is released) and goes at its fold.
    bool persistent = true;
    /// A parameter without gradient in a step is reduced as zeros and the ranks agree on
    /// the unused ones; else it is an error naming it.
    bool find_unused = false;
    /// Transient buffers: buckets in flight at once. Before a bucket launches, the buckets
    /// this many places before it are folded, so that their buffers go.
    size_t in_flight = 2;
  };

  /// Starts reducing bucket `b` (its flat `buffer`); returns the work to wait for (null:
  /// done).
  using Launch = std::function<std::shared_ptr<Work>(size_t b, at::Tensor& buffer)>;
  /// Bucket `b`'s reduction completed: move its result where the optimizer reads it.
  using Fold = std::function<void(size_t b, at::Tensor& buffer)>;
  /// Bytes of transient buffers allocated (positive) or released (negative).
  using Transient = std::function<void(int64_t bytes)>;

  /// Installs the hooks on `params` (leaf tensors that require grad). `sync` is the
  /// owner's gradient-sync flag (off inside an accumulation window); it must outlive the
  /// reducer. `comm` may be null (one rank: usage is local).
  GradientReducer(std::vector<at::Tensor> params, std::vector<std::string> names,
                  std::vector<Bucket> buckets, Policy policy, std::shared_ptr<Communicator> comm,
                  const bool& sync, Launch launch, Fold fold = {}, Transient transient = {});
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  /// Called by the hook of parameter `index` after its gradient was accumulated.
  void on_gradient(size_t index);

  /// Completes the reduction of the gradients since the last `finish` (nothing when no
  /// backward ran). Throws the first failure of a collective, or `invalid_argument`
  /// naming parameters without gradient when unused parameters are not allowed; the
  /// reducer is ready for the next step either way.
  void finish();

  /// Parameters no rank used in the last finished window (with `find_unused`).
  const std::vector<size_t>& unused() const noexcept {
    return unused_;
  }

  const std::vector<at::Tensor>& params() const noexcept {
    return params_;
  }

  size_t num_buckets() const noexcept {
    return buckets_.size();
  }
  const Bucket& bucket(size_t b) const {
    return buckets_.at(b);
  }

  /// Bucket `b`'s flat buffer (persistent: always; transient: while in flight).
  at::Tensor& buffer(size_t b) {
    return buffers_.at(b);
  }

  /// Persistent buffers: parameter `index`'s view of its bucket (its gradient).
  const at::Tensor& view(size_t index) const {
    return views_.at(index);
  }

  /// Bytes of the buffers that exist now (persistent ones always).
  int64_t buffer_bytes() const;

 private:
  void mark(size_t index); // mtx_ held
  void launch_ready();     // mtx_ held
  void fold(size_t b);
  void accumulate(size_t index, const at::Tensor& grad);
  void reset_step();

  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<Bucket> buckets_;
  Policy policy_;
  std::shared_ptr<Communicator> comm_;
  const bool& sync_;
  Launch launch_;
  Fold fold_;
  Transient transient_;

  struct Slot {
    size_t bucket = 0;
    int64_t offset = 0;
  };
  std::vector<Slot> slots_;
  std::vector<at::Tensor> views_;   // per parameter (persistent)
  std::vector<at::Tensor> buffers_; // per bucket
  std::vector<std::shared_ptr<Work>> works_;
  std::vector<size_t> pending_; // per bucket: parameters not ready yet
  std::vector<bool> ready_;
  /// Per parameter: a gradient arrived since the last finish (no_sync micro-batches too).
  std::vector<bool> used_;
  std::vector<size_t> unused_;
  size_t next_launch_ = 0;
  size_t next_fold_ = 0; // buckets before it are folded (transient)
  bool step_active_ = false;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  std::vector<uintptr_t> hook_keys_;
  std::mutex mtx_;
  /// Large blocks freed during the fit (transient buffers, FSDP's gathered units) are
  /// kept for reuse while the reducer lives.
  block_cache::User cache_user_;
};

/// Reducer buckets of the parameter index groups `groups` (e.g. `plan_buckets`'), each
/// laid out contiguously in its group's order, without padding (DDP's buckets).
std::vector<GradientReducer::Bucket> contiguous_buckets(
  const std::vector<at::Tensor>& params, const std::vector<std::vector<size_t>>& groups);

} // namespace caftrain
