#include "strategies/ddp_strategy.hpp"

#include <mutex>
#include <set>
#include <sstream>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include "core/error.hpp"
#include "environment/cluster_environment.hpp"

namespace caftrain {

namespace {

constexpr double kMiB = 1024.0 * 1024.0;

std::string shape_string(c10::ArrayRef<int64_t> sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

/// Calls back into the reducer after a parameter's gradient has been accumulated.
class ReadyHook : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(DDPStrategy* owner, size_t index) : owner_(owner), index_(index) {
    // nop
  }

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    owner_->mark_ready(index_);
    return outputs;
  }

 private:
  DDPStrategy* owner_;
  size_t index_;
};

} // namespace

// -- collective helpers -----------------------------------------------------------------

void verify_same_parameters(torch::nn::Module& module, Communicator& comm) {
  auto named = module.named_parameters();
  std::vector<int64_t> signature{static_cast<int64_t>(named.size())};
  for (auto& item : named) {
    signature.push_back(item.value().dim());
    for (auto d : item.value().sizes())
      signature.push_back(d);
  }
  auto size = comm.size();
  auto lengths = torch::empty({size}, torch::kLong);
  comm.allgather(torch::tensor({static_cast<int64_t>(signature.size())}, torch::kLong), lengths)
    ->wait();
  auto max_len = lengths.max().item<int64_t>();
  signature.resize(static_cast<size_t>(max_len), -1);
  auto all = torch::empty({size, max_len}, torch::kLong);
  comm.allgather(torch::tensor(signature, torch::kLong), all)->wait();
  auto reference = all[0];
  for (int r = 1; r < size; ++r) {
    if (torch::equal(all[r], reference))
      continue;
    // Walk both signatures to find the first parameter that differs.
    auto a = reference.data_ptr<int64_t>();
    auto b = all[r].data_ptr<int64_t>();
    if (a[0] != b[0])
      throw Error(Errc::rank_mismatch,
                  "DDP: rank " + std::to_string(r) + " has " + std::to_string(b[0]) +
                    " parameters but rank 0 has " + std::to_string(a[0]) +
                    "; every rank must build the same model");
    int64_t pos = 1;
    for (int64_t i = 0; i < a[0]; ++i) {
      auto dims = a[pos];
      bool same = dims == b[pos];
      for (int64_t d = 1; same && d <= dims; ++d)
        same = a[pos + d] == b[pos + d];
      if (!same) {
        std::vector<int64_t> sa(a + pos + 1, a + pos + 1 + dims);
        std::vector<int64_t> sb(b + pos + 1, b + pos + 1 + std::max<int64_t>(b[pos], 0));
        auto name = static_cast<size_t>(i) < named.size() ? named[static_cast<size_t>(i)].key() : "?";
        throw Error(Errc::rank_mismatch,
                    "DDP: parameter #" + std::to_string(i) + " ('" + name + "' here) has shape " +
                      shape_string(sb) + " on rank " + std::to_string(r) + " but " +
                      shape_string(sa) + " on rank 0; every rank must build the same model");
      }
      pos += dims + 1;
    }
  }
}

void broadcast_module_state(torch::nn::Module& module, Communicator& comm, bool parameters,
                            bool buffers) {
  std::vector<at::Tensor> tensors;
  if (parameters)
    for (auto& p : module.parameters())
      tensors.push_back(p);
  if (buffers)
    for (auto& b : module.buffers())
      tensors.push_back(b);
  if (tensors.empty() || comm.size() == 1)
    return;
  torch::NoGradGuard no_grad;
  // One broadcast per dtype: flatten, broadcast, copy back.
  std::map<c10::ScalarType, std::vector<at::Tensor>> by_type;
  for (auto& t : tensors)
    by_type[t.scalar_type()].push_back(t);
  for (auto& [type, group] : by_type) {
    std::vector<at::Tensor> flat;
    for (auto& t : group)
      flat.push_back(t.detach().reshape({-1}));
    auto buffer = torch::cat(flat);
    comm.broadcast(buffer, 0)->wait();
    int64_t offset = 0;
    for (auto& t : group) {
      t.detach().copy_(buffer.narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

// -- the reducer --------------------------------------------------------------------------

struct DDPStrategy::Reducer {
  struct Bucket {
    at::Tensor flat;
    std::vector<size_t> members;
    std::vector<int64_t> offsets;
    size_t pending = 0;
    bool launched = false;
    std::shared_ptr<Work> work;
  };

  std::shared_ptr<Communicator> comm;
  std::vector<at::Tensor> params;
  std::vector<std::string> names;
  std::vector<at::Tensor> views;
  std::vector<size_t> bucket_of;
  std::vector<bool> ready;
  /// Per parameter: a gradient arrived since the last synchronisation (no_sync
  /// micro-batches included); with find_unused_parameters, the ranks agree on it.
  std::vector<bool> used;
  std::vector<Bucket> buckets;
  size_t next_launch = 0;
  bool step_active = false;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<uintptr_t> hook_keys;
  std::mutex mtx;

  void reset_step() {
    for (auto& b : buckets) {
      b.pending = b.members.size();
      b.launched = false;
      b.work.reset();
    }
    std::fill(ready.begin(), ready.end(), false);
    std::fill(used.begin(), used.end(), false);
    next_launch = 0;
    step_active = false;
  }

  void launch_ready_buckets() {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      auto& b = buckets[next_launch];
      b.work = comm->allreduce(b.flat, ReduceOp::avg);
      b.launched = true;
      ++next_launch;
    }
  }

  void mark(size_t index) {
    if (ready[index])
      throw Error(Errc::invalid_argument,
                  "DDP: parameter '" + names[index] +
                    "' received its gradient twice in one backward pass; DDP reduces each "
                    "parameter once per step");
    // If someone replaced .grad (e.g. set it to None), fold it back into the bucket view.
    auto& p = params[index];
    auto grad = p.grad();
    if (grad.defined() && grad.data_ptr() != views[index].data_ptr()) {
      views[index].copy_(grad);
      p.mutable_grad() = views[index];
    }
    ready[index] = true;
    step_active = true;
    auto& b = buckets[bucket_of[index]];
    --b.pending;
    if (b.pending == 0)
      launch_ready_buckets();
  }
};

DDPStrategy::DDPStrategy(DDPOptions options) : options_(options) {
  if (options_.bucket_cap_mb <= 0 || options_.first_bucket_cap_mb <= 0)
    throw Error(Errc::invalid_config, "DDPStrategy: bucket caps must be positive");
}

DDPStrategy::DDPStrategy(const DDPStrategy& other) : Strategy(), options_(other.options_) {
  // A copy starts unconfigured: buckets and hooks belong to one setup.
}

DDPStrategy::~DDPStrategy() {
  teardown();
}

std::string DDPStrategy::name() const {
  return "ddp";
}

void DDPStrategy::setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
                        c10::Device device) {
  DDPStrategy::teardown(); // set up again (validate then fit): the first setup's hooks go
  Strategy::setup(module, std::move(environment), device);
  if (!communicator_ || communicator_->size() == 1)
    return; // one rank: nothing to synchronise
  verify_same_parameters(module, *communicator_);
  broadcast_module_state(module, *communicator_);
  auto r = std::make_unique<Reducer>();
  r->comm = communicator_;
  for (auto& item : module.named_parameters()) {
    if (!item.value().requires_grad())
      continue;
    r->params.push_back(item.value());
    r->names.push_back(item.key());
  }
  auto n = r->params.size();
  r->views.resize(n);
  r->bucket_of.resize(n);
  r->ready.assign(n, false);
  r->used.assign(n, false);
  // Reverse registration order; a new bucket when the cap is reached or the dtype changes.
  std::vector<std::vector<size_t>> groups;
  double bytes = 0;
  c10::ScalarType type = c10::ScalarType::Undefined;
  for (size_t k = n; k-- > 0;) {
    auto& p = r->params[k];
    double cap = (groups.size() <= 1 ? options_.first_bucket_cap_mb : options_.bucket_cap_mb) * kMiB;
    auto size = static_cast<double>(p.numel() * p.element_size());
    if (groups.empty() || p.scalar_type() != type || (bytes > 0 && bytes + size > cap)) {
      groups.emplace_back();
      bytes = 0;
      type = p.scalar_type();
    }
    groups.back().push_back(k);
    bytes += size;
  }
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < groups.size(); ++b) {
    Reducer::Bucket bucket;
    int64_t numel = 0;
    for (auto k : groups[b])
      numel += r->params[k].numel();
    bucket.flat = torch::zeros({numel}, r->params[groups[b].front()].options().requires_grad(false));
    int64_t offset = 0;
    for (auto k : groups[b]) {
      auto& p = r->params[k];
      auto view = bucket.flat.narrow(0, offset, p.numel()).view(p.sizes());
      if (p.grad().defined())
        view.copy_(p.grad());
      p.mutable_grad() = view; // gradients accumulate straight into the bucket
      r->views[k] = view;
      r->bucket_of[k] = b;
      bucket.members.push_back(k);
      bucket.offsets.push_back(offset);
      offset += p.numel();
    }
    r->buckets.push_back(std::move(bucket));
  }
  for (size_t k = 0; k < n; ++k) {
    auto acc = torch::autograd::impl::grad_accumulator(r->params[k]);
    r->hook_keys.push_back(acc->add_post_hook(std::make_unique<ReadyHook>(this, k)));
    r->accumulators.push_back(std::move(acc));
  }
  r->reset_step();
  reducer_ = std::move(r);
}

void DDPStrategy::teardown() {
  if (reducer_) {
    for (size_t k = 0; k < reducer_->accumulators.size(); ++k)
      reducer_->accumulators[k]->del_post_hook(reducer_->hook_keys[k]);
    reducer_.reset();
  }
  Strategy::teardown();
}

void DDPStrategy::mark_ready(size_t index) {
  if (!reducer_)
    return;
  std::lock_guard<std::mutex> guard(reducer_->mtx);
  reducer_->used[index] = true;
  if (sync_enabled_) // else accumulating locally (no_sync)
    reducer_->mark(index);
}

void DDPStrategy::before_training_step() {
  if (reducer_ && options_.broadcast_buffers && !module_->buffers().empty())
    broadcast_module_state(*module_, *communicator_, false, true);
}

void DDPStrategy::finish_gradient_sync() {
  if (!reducer_ || !sync_enabled_)
    return;
  auto& r = *reducer_;
  std::unique_lock<std::mutex> guard(r.mtx);
  if (!r.step_active)
    return; // no backward since the last step
  if (r.next_launch < r.buckets.size()) {
    std::vector<std::string> unused;
    for (size_t k = 0; k < r.params.size(); ++k)
      if (!r.ready[k])
        unused.push_back(r.names[k]);
    if (!options_.find_unused_parameters) {
      std::string list;
      for (size_t i = 0; i < unused.size() && i < 5; ++i)
        list += (i ? ", " : "") + unused[i];
      r.reset_step();
      throw Error(Errc::invalid_argument,
                  "DDP: parameter(s) " + list + " received no gradient in this step (" +
                    std::to_string(unused.size()) +
                    " in all); make every parameter contribute to the loss or use "
                    "DDPStrategy({.find_unused_parameters = true})");
    }
    for (size_t k = 0; k < r.params.size(); ++k)
      if (!r.ready[k])
        r.mark(k);
  }
  // Which parameters got a gradient on some rank: one small all-reduce after every
  // bucket's (the same order on every rank), as PyTorch DDP's find_unused_parameters.
  std::shared_ptr<Work> usage_work;
  at::Tensor usage;
  if (options_.find_unused_parameters && !r.params.empty()) {
    auto local = torch::zeros({static_cast<int64_t>(r.params.size())}, torch::kFloat);
    for (size_t k = 0; k < r.params.size(); ++k)
      local[static_cast<int64_t>(k)] = r.used[k] ? 1.0f : 0.0f;
    usage = local.to(r.params.front().device());
    usage_work = r.comm->allreduce(usage, ReduceOp::sum);
  }
  guard.unlock();
  std::exception_ptr failure;
  for (auto& b : r.buckets) {
    try {
      b.work->wait();
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
  if (usage.defined() && !failure) {
    // A parameter no rank used keeps no gradient, so that optimizers (and their weight
    // decay) skip it; its bucket slot, reduced as zeros, is left behind until it is used.
    auto global = usage.cpu();
    for (size_t k = 0; k < r.params.size(); ++k)
      if (global[static_cast<int64_t>(k)].item<float>() == 0.0f)
        r.params[k].mutable_grad().reset();
  }
  r.reset_step();
  if (failure)
    std::rethrow_exception(failure);
}

void DDPStrategy::zero_grad(torch::optim::Optimizer& optimizer) {
  if (!reducer_)
    return Strategy::zero_grad(optimizer);
  // Only this optimizer's parameters: with several optimizers (a GAN's generator and
  // discriminator), the next one still steps on its own gradients. Their gradients are
  // views of the buckets and stay so (zeroed in place).
  std::set<const c10::TensorImpl*> mine;
  for (auto& group : optimizer.param_groups())
    for (auto& p : group.params())
      mine.insert(p.unsafeGetTensorImpl());
  torch::NoGradGuard no_grad;
  auto& r = *reducer_;
  for (size_t k = 0; k < r.params.size(); ++k)
    if (mine.count(r.params[k].unsafeGetTensorImpl()))
      r.views[k].zero_();
}

MemoryStats DDPStrategy::memory_stats() const {
  auto stats = Strategy::memory_stats();
  if (reducer_) {
    stats.gradient_bytes = 0;
    for (auto& b : reducer_->buckets)
      stats.gradient_bytes += static_cast<int64_t>(b.flat.nbytes());
  }
  return stats;
}

size_t DDPStrategy::num_buckets() const {
  return reducer_ ? reducer_->buckets.size() : 0;
}

std::vector<std::vector<size_t>> DDPStrategy::bucket_assignment() const {
  std::vector<std::vector<size_t>> result;
  if (reducer_)
    for (auto& b : reducer_->buckets)
      result.push_back(b.members);
  return result;
}

} // namespace caftrain
