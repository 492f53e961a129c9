#include "strategies/ddp_strategy.hpp"

#include <set>
#include <sstream>

#include <torch/torch.h>

#include "core/error.hpp"
#include "environment/cluster_environment.hpp"
#include "strategies/gradient_reducer.hpp"

namespace caftrain {

namespace {

constexpr double kMiB = 1024.0 * 1024.0;

std::string shape_string(c10::ArrayRef<int64_t> sizes) {
  std::ostringstream os;
  os << sizes;
  return os.str();
}

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
  std::vector<at::Tensor> params;
  std::vector<std::string> names;
  for (auto& item : module.named_parameters()) {
    if (!item.value().requires_grad())
      continue;
    params.push_back(item.value());
    names.push_back(item.key());
  }
  // Buckets of contiguous gradients, each averaged with one all-reduce.
  auto buckets = contiguous_buckets(params, plan_buckets(params, options_.first_bucket_cap_mb * kMiB,
                                                         options_.bucket_cap_mb * kMiB));
  GradientReducer::Policy policy;
  policy.label = "DDP";
  policy.persistent = true;
  policy.find_unused = options_.find_unused_parameters;
  auto comm = communicator_;
  reducer_ = std::make_unique<GradientReducer>(
    std::move(params), std::move(names), std::move(buckets), policy, communicator_, sync_enabled_,
    [comm](size_t, at::Tensor& buffer) { return comm->allreduce(buffer, ReduceOp::avg); });
}

void DDPStrategy::teardown() {
  reducer_.reset(); // removes the hooks
  Strategy::teardown();
}

void DDPStrategy::before_training_step() {
  if (reducer_ && options_.broadcast_buffers && !module_->buffers().empty())
    broadcast_module_state(*module_, *communicator_, false, true);
}

void DDPStrategy::finish_gradient_sync() {
  if (reducer_ && sync_enabled_)
    reducer_->finish();
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
  auto& params = reducer_->params();
  for (size_t k = 0; k < params.size(); ++k)
    if (mine.count(params[k].unsafeGetTensorImpl()))
      reducer_->view(k).zero_();
}

MemoryStats DDPStrategy::memory_stats() const {
  auto stats = Strategy::memory_stats();
  if (reducer_)
    stats.gradient_bytes = reducer_->buffer_bytes();
  return stats;
}

size_t DDPStrategy::num_buckets() const {
  return reducer_ ? reducer_->num_buckets() : 0;
}

std::vector<std::vector<size_t>> DDPStrategy::bucket_assignment() const {
  std::vector<std::vector<size_t>> result;
  if (reducer_)
    for (size_t b = 0; b < reducer_->num_buckets(); ++b)
      result.push_back(reducer_->bucket(b).members);
  return result;
}

} // namespace caftrain
