#include "strategies/gradient_reducer.hpp"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include "core/error.hpp"
#include "strategies/block_cache.hpp"

namespace caftrain {

namespace {

/// Calls back into the reducer after a parameter's gradient has been accumulated.
class ReadyHook : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(GradientReducer* owner, size_t index) : owner_(owner), index_(index) {
    // nop
  }

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    owner_->on_gradient(index_);
    return outputs;
  }

 private:
  GradientReducer* owner_;
  size_t index_;
};

int64_t bytes_of(const GradientReducer::Bucket& b) {
  return b.size * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(b.options.dtype())));
}

} // namespace

std::vector<std::vector<size_t>> plan_buckets(const std::vector<at::Tensor>& params,
                                              double first_cap_bytes, double cap_bytes) {
  std::vector<std::vector<size_t>> buckets;
  double bytes = 0;
  c10::ScalarType type = c10::ScalarType::Undefined;
  for (size_t k = params.size(); k-- > 0;) {
    auto& p = params[k];
    double cap = buckets.size() <= 1 ? first_cap_bytes : cap_bytes;
    auto size = static_cast<double>(p.numel() * p.element_size());
    if (buckets.empty() || p.scalar_type() != type || (bytes > 0 && bytes + size > cap)) {
      buckets.emplace_back();
      bytes = 0;
      type = p.scalar_type();
    }
    buckets.back().push_back(k);
    bytes += size;
  }
  return buckets;
}

std::vector<GradientReducer::Bucket> contiguous_buckets(
  const std::vector<at::Tensor>& params, const std::vector<std::vector<size_t>>& groups) {
  std::vector<GradientReducer::Bucket> buckets;
  for (auto& group : groups) {
    GradientReducer::Bucket bucket;
    bucket.members = group;
    for (auto k : group) {
      bucket.offsets.push_back(bucket.size);
      bucket.size += params[k].numel();
    }
    bucket.options = params[group.front()].options();
    buckets.push_back(std::move(bucket));
  }
  return buckets;
}

GradientReducer::GradientReducer(std::vector<at::Tensor> params, std::vector<std::string> names,
                                 std::vector<Bucket> buckets, Policy policy,
                                 std::shared_ptr<Communicator> comm, const bool& sync,
                                 Launch launch, Fold fold, Transient transient)
  : params_(std::move(params)),
    names_(std::move(names)),
    buckets_(std::move(buckets)),
    policy_(std::move(policy)),
    comm_(std::move(comm)),
    sync_(sync),
    launch_(std::move(launch)),
    fold_(std::move(fold)),
    transient_(std::move(transient)) {
  auto n = params_.size();
  slots_.resize(n);
  views_.resize(n);
  ready_.assign(n, false);
  used_.assign(n, false);
  buffers_.resize(buckets_.size());
  works_.resize(buckets_.size());
  pending_.resize(buckets_.size());
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    auto& bucket = buckets_[b];
    if (policy_.persistent)
      buffers_[b] = torch::zeros({bucket.size}, bucket.options.requires_grad(false));
    for (size_t m = 0; m < bucket.members.size(); ++m) {
      auto k = bucket.members[m];
      slots_.at(k) = {b, bucket.offsets[m]};
      if (!policy_.persistent)
        continue;
      auto& p = params_[k];
      auto view = buffers_[b].narrow(0, bucket.offsets[m], p.numel()).view(p.sizes());
      if (p.grad().defined())
        view.copy_(p.grad());
      p.mutable_grad() = view; // gradients accumulate straight into the bucket
      views_[k] = view;
    }
  }
  for (size_t k = 0; k < n; ++k) {
    auto acc = torch::autograd::impl::grad_accumulator(params_[k]);
    hook_keys_.push_back(acc->add_post_hook(std::make_unique<ReadyHook>(this, k)));
    accumulators_.push_back(std::move(acc));
  }
  reset_step();
}

GradientReducer::~GradientReducer() {
  for (size_t k = 0; k < accumulators_.size(); ++k)
    accumulators_[k]->del_post_hook(hook_keys_[k]);
}

int64_t GradientReducer::buffer_bytes() const {
  int64_t total = 0;
  for (auto& buffer : buffers_)
    if (buffer.defined())
      total += static_cast<int64_t>(buffer.nbytes());
  return total;
}

void GradientReducer::on_gradient(size_t index) {
  std::lock_guard<std::mutex> guard(mtx_);
  used_[index] = true;
  if (sync_) {
    mark(index);
    return;
  }
  // Inside an accumulation window (no_sync): nothing is communicated until its last
  // micro-batch. Persistent gradients accumulate in the parameters' .grad (views of the
  // buckets); transient ones in a full bucket buffer kept for the window, as PyTorch
  // FSDP's no_sync keeps unsharded gradients.
  if (policy_.persistent)
    return;
  auto& p = params_[index];
  if (!p.grad().defined())
    return;
  torch::NoGradGuard no_grad;
  accumulate(index, p.grad());
  p.mutable_grad().reset();
}

void GradientReducer::accumulate(size_t index, const at::Tensor& grad) {
  auto [b, offset] = slots_[index];
  auto& buffer = buffers_[b];
  if (!buffer.defined()) {
    buffer = block_cache::empty(buckets_[b].size, buckets_[b].options).zero_();
    if (transient_)
      transient_(bytes_of(buckets_[b]));
  }
  if (grad.defined()) // else the entry counts as zeros
    buffer.narrow(0, offset, params_[index].numel()).add_(grad.reshape({-1}));
}

void GradientReducer::mark(size_t index) {
  if (ready_[index])
    throw Error(Errc::invalid_argument,
                policy_.label + ": parameter '" + names_[index] +
                  "' received its gradient twice in one backward pass; " + policy_.label +
                  " reduces each parameter once per step");
  auto& p = params_[index];
  torch::NoGradGuard no_grad;
  if (policy_.persistent) {
    // If someone replaced .grad (e.g. reset it), fold it back into the bucket's view.
    auto& view = views_[index];
    auto grad = p.grad();
    if (grad.defined() && grad.data_ptr() != view.data_ptr()) {
      view.copy_(grad);
      p.mutable_grad() = view;
    }
  } else {
    // The buffer may already hold this window's earlier micro-batches (no_sync).
    accumulate(index, p.grad());
    p.mutable_grad().reset(); // the full gradient lives only until its bucket is folded
  }
  ready_[index] = true;
  step_active_ = true;
  if (--pending_[slots_[index].bucket] == 0)
    launch_ready();
}

void GradientReducer::launch_ready() {
  while (next_launch_ < buckets_.size() && pending_[next_launch_] == 0) {
    auto b = next_launch_++;
    // Transient buffers: fold the buckets `in_flight` places back before this one
    // launches, so that only a few buckets' full gradients exist at once.
    if (!policy_.persistent)
      while (next_fold_ + policy_.in_flight <= b)
        fold(next_fold_++);
    works_[b] = launch_(b, buffers_[b]);
  }
}

void GradientReducer::fold(size_t b) {
  auto work = std::move(works_[b]); // waited for once, even when it fails
  works_[b] = nullptr;
  if (work)
    work->wait();
  if (fold_)
    fold_(b, buffers_[b]);
  if (!policy_.persistent && buffers_[b].defined()) {
    buffers_[b] = at::Tensor();
    if (transient_)
      transient_(-bytes_of(buckets_[b]));
  }
}

void GradientReducer::finish() {
  std::unique_lock<std::mutex> guard(mtx_);
  if (!step_active_)
    return; // no backward since the last finish
  std::vector<size_t> missing;
  for (size_t k = 0; k < params_.size(); ++k)
    if (!ready_[k])
      missing.push_back(k);
  if (!missing.empty() && !policy_.find_unused) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 5; ++i)
      list += (i ? ", " : "") + names_[missing[i]];
    reset_step();
    throw Error(Errc::invalid_argument,
                policy_.label + ": parameter(s) " + list + " received no gradient in this step (" +
                  std::to_string(missing.size()) +
                  " in all); make every parameter contribute to the loss or use "
                  "DDPStrategy({.find_unused_parameters = true})");
  }
  std::exception_ptr failure;
  try {
    for (auto k : missing)
      mark(k); // counts as zeros
  } catch (...) {
    failure = std::current_exception();
  }
  // Which parameters got a gradient on some rank: one small all-reduce after every
  // bucket's (the same order on every rank), as PyTorch DDP's find_unused_parameters.
  std::shared_ptr<Work> usage_work;
  at::Tensor usage;
  if (policy_.find_unused && !params_.empty() && !failure) {
    std::vector<float> local(params_.size());
    for (size_t k = 0; k < params_.size(); ++k)
      local[k] = used_[k] ? 1.0f : 0.0f;
    usage = torch::tensor(local, torch::kFloat);
    if (comm_ && comm_->size() > 1) {
      usage = usage.to(params_.front().device());
      usage_work = comm_->allreduce(usage, ReduceOp::sum);
    }
  }
  guard.unlock();
  for (size_t b = next_fold_; b < buckets_.size() && !failure; ++b) {
    try {
      fold(b);
    } catch (...) {
      failure = std::current_exception();
    }
  }
  // Every launched collective is waited for, failed or not, before the buffers go.
  for (auto& work : works_) {
    try {
      if (work)
        work->wait();
    } catch (...) {
      if (!failure)
        failure = std::current_exception();
    }
  }
  try {
    if (usage_work)
      usage_work->wait();
  } catch (...) {
    if (!failure)
      failure = std::current_exception();
  }
  guard.lock();
  unused_.clear();
  if (usage.defined() && !failure) {
    // A parameter no rank used keeps no gradient, so that optimizers (and their weight
    // decay) skip it; its bucket slot, reduced as zeros, is left behind until it is used.
    auto global = usage.cpu();
    auto* used = global.data_ptr<float>();
    for (size_t k = 0; k < params_.size(); ++k)
      if (used[k] == 0.0f) {
        unused_.push_back(k);
        if (policy_.persistent)
          params_[k].mutable_grad().reset();
      }
  }
  reset_step();
  guard.unlock();
  if (failure)
    std::rethrow_exception(failure);
}

void GradientReducer::reset_step() {
  for (size_t b = 0; b < buckets_.size(); ++b) {
    pending_[b] = buckets_[b].members.size();
    works_[b] = nullptr;
    if (!policy_.persistent && buffers_[b].defined()) { // a failed step's leftovers
      buffers_[b] = at::Tensor();
      if (transient_)
        transient_(-bytes_of(buckets_[b]));
    }
  }
  std::fill(ready_.begin(), ready_.end(), false);
  std::fill(used_.begin(), used_.end(), false);
  next_launch_ = 0;
  next_fold_ = 0;
  step_active_ = false;
}

} // namespace caftrain
