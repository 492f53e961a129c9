#include "strategies/sharded_strategy.hpp"

#include <cmath>
#include <functional>
#include <map>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include "checkpoint/files.hpp"
#include "checkpoint/optimizer_archive.hpp"
#include "checkpoint/sharded.hpp"
#include "core/error.hpp"
#include "environment/cluster_environment.hpp"
#include "strategies/ddp_strategy.hpp"

namespace caftrain {

namespace {

/// Calls back into the strategy once a parameter's gradient has been accumulated.
class ShardHook : public torch::autograd::FunctionPostHook {
 public:
  ShardHook(ShardedStrategy* owner, size_t index) : owner_(owner), index_(index) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    owner_->mark_ready(index_);
    return outputs;
  }

 private:
  ShardedStrategy* owner_;
  size_t index_;
};

/// Per-parameter state (full shape) of a parameter by name; null when it has none.
using StateLookup = std::function<const std::map<std::string, at::Tensor>*(const std::string&)>;

/// Installs in `optimizer` the state of `flat`'s shard, cut from its parameters' full
/// state: each state tensor of the shard is the part of the flat layout this rank owns
/// (zeros in the padding), so each rank copies only its own elements.
void install_shard_state(torch::optim::Optimizer& optimizer, const FlatShard& flat,
                         const StateLookup& lookup) {
  torch::NoGradGuard no_grad;
  int64_t begin = flat.rank() * flat.shard_size();
  int64_t end = begin + flat.shard_size();
  std::map<std::string, at::Tensor> mine;
  for (auto& e : flat.entries()) {
    auto* state = lookup(e.name);
    if (!state)
      continue;
    int64_t lo = std::max(begin, e.offset);
    int64_t hi = std::min(end, e.offset + e.numel);
    for (auto& [key, t] : *state) {
      if (key == "step") {
        mine[key] = t;
        continue;
      }
      if (t.numel() != e.numel)
        throw Error(Errc::state_mismatch, "optimizer state '" + key + "' of parameter '" + e.name +
                                            "' has " + std::to_string(t.numel()) +
                                            " elements but the parameter has " +
                                            std::to_string(e.numel));
      auto& buffer = mine[key];
      if (!buffer.defined())
        buffer = torch::zeros({flat.shard_size()}, flat.shard().options().requires_grad(false));
      if (lo < hi)
        buffer.narrow(0, lo - begin, hi - lo).copy_(t.reshape({-1}).narrow(0, lo - e.offset, hi - lo));
    }
  }
  if (!mine.empty()) // else: saved before the first step, no optimizer state yet
    set_optimizer_state(optimizer, flat.shard(), mine);
}

} // namespace

ShardedStrategy::~ShardedStrategy() = default;

std::string ShardedStrategy::label() const {
  return name();
}

void ShardedStrategy::add_transient(int64_t bytes) {
  transient_ += bytes;
  peak_transient_ = std::max(peak_transient_, transient_);
}

void ShardedStrategy::setup(torch::nn::Module& module,
                            std::shared_ptr<ClusterEnvironment> environment, c10::Device device) {
  // Set up again (validate then fit, a second fit): the previous setup's hooks and flats
  // go; the module's parameters keep their values (FlatShard copies them anew).
  ShardedStrategy::teardown();
  flats_.clear();
  owners_.clear();
  group_names_.clear();
  params_.clear();
  slots_.clear();
  ready_.clear();
  pending_.clear();
  grad_buffers_.clear();
  grad_outputs_.clear();
  works_.clear();
  transient_ = 0;
  peak_transient_ = 0;
  Strategy::setup(module, std::move(environment), device);
  if (communicator_ && communicator_->size() > 1) {
    verify_same_parameters(module, *communicator_);
    broadcast_module_state(module, *communicator_);
  }
}

void ShardedStrategy::setup_optimizers(
  std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers) {
  Strategy::setup_optimizers(optimizers); // checks there is something to train
  std::map<c10::TensorImpl*, std::string> names;
  for (auto& item : module_->named_parameters())
    names[item.value().unsafeGetTensorImpl()] = item.key();
  int world = communicator_ ? communicator_->size() : 1;
  int rank = communicator_ ? communicator_->rank() : 0;
  if (replicate()) {
    world = 1;
    rank = 0;
  }
  std::map<c10::TensorImpl*, bool> covered;
  for (size_t oi = 0; oi < optimizers.size(); ++oi) {
    auto& opt = *optimizers[oi];
    require_elementwise(opt, label());
    std::vector<size_t> owned;
    std::vector<std::vector<std::string>> names_of_groups;
    auto& groups = opt.param_groups();
    for (size_t g = 0; g < groups.size(); ++g) {
      std::vector<std::pair<std::string, at::Tensor>> named;
      std::vector<std::string> order;
      for (auto& p : groups[g].params()) {
        auto it = names.find(p.unsafeGetTensorImpl());
        if (it == names.end())
          throw Error(Errc::invalid_config, label() + ": an optimizer holds a tensor that is not "
                                                      "a parameter of the module; optimize the "
                                                      "module's parameters");
        if (covered[p.unsafeGetTensorImpl()])
          throw Error(Errc::invalid_config, label() + ": parameter '" + it->second +
                                              "' is in two param groups or optimizers");
        covered[p.unsafeGetTensorImpl()] = true;
        named.emplace_back(it->second, p);
        order.push_back(it->second);
      }
      names_of_groups.push_back(std::move(order));
      // State the optimizer already holds for these parameters (Adagrad creates its
      // accumulators when it is built) moves into the shards; the full-size state goes.
      std::map<std::string, std::map<std::string, at::Tensor>> existing;
      for (auto& [name, p] : named) {
        auto state = optimizer_state_of(opt, p);
        if (!state.empty())
          existing[name] = std::move(state);
        opt.state().erase(c10::guts::to_string(p.unsafeGetTensorImpl()));
      }
      std::vector<at::Tensor> shards;
      size_t k = 0;
      for (auto& part : partition(named)) {
        auto id = "o" + std::to_string(oi) + ".g" + std::to_string(g) + ".f" + std::to_string(k++);
        flats_.push_back(std::make_unique<FlatShard>(id, part, rank, world, parameters_resident()));
        owned.push_back(flats_.size() - 1);
        shards.push_back(flats_.back()->shard());
        install_shard_state(opt, *flats_.back(), [&](const std::string& name) {
          auto it = existing.find(name);
          return it == existing.end() ? nullptr : &it->second;
        });
      }
      groups[g].params() = shards;
    }
    owners_.emplace_back(optimizers[oi].get(), owned);
    group_names_.push_back(std::move(names_of_groups));
  }
  for (auto& item : module_->named_parameters())
    if (item.value().requires_grad() && !covered[item.value().unsafeGetTensorImpl()])
      throw Error(Errc::invalid_config,
                  label() + ": parameter '" + item.key() +
                    "' is in no optimizer; freeze it (requires_grad false) or optimize it");
  // Global parameter index -> (flat, entry); gradient buffers; hooks.
  pending_.assign(flats_.size(), 0);
  grad_buffers_.assign(flats_.size(), at::Tensor());
  grad_outputs_.assign(flats_.size(), at::Tensor());
  works_.assign(flats_.size(), nullptr);
  torch::NoGradGuard no_grad;
  for (size_t f = 0; f < flats_.size(); ++f) {
    auto& flat = *flats_[f];
    if (persistent_gradients())
      grad_buffers_[f] = torch::zeros({flat.padded()}, flat.full().options());
    for (size_t e = 0; e < flat.params().size(); ++e) {
      auto& p = flat.params()[e];
      if (persistent_gradients()) {
        auto& entry = flat.entries()[e];
        p.mutable_grad() = grad_buffers_[f].narrow(0, entry.offset, entry.numel).view(entry.shape);
      }
      params_.push_back(p);
      slots_.push_back({f, e});
    }
  }
  ready_.assign(params_.size(), false);
  for (size_t i = 0; i < params_.size(); ++i) {
    auto acc = torch::autograd::impl::grad_accumulator(params_[i]);
    hook_keys_.push_back(acc->add_post_hook(std::make_unique<ShardHook>(this, i)));
    accumulators_.push_back(std::move(acc));
  }
  reset_step();
}

void ShardedStrategy::teardown() {
  for (size_t i = 0; i < accumulators_.size(); ++i)
    accumulators_[i]->del_post_hook(hook_keys_[i]);
  accumulators_.clear();
  hook_keys_.clear();
  Strategy::teardown();
}

void ShardedStrategy::before_training_step() {
  if (communicator_ && communicator_->size() > 1 && !module_->buffers().empty())
    broadcast_module_state(*module_, *communicator_, false, true);
}

void ShardedStrategy::reset_step() {
  for (size_t f = 0; f < flats_.size(); ++f)
    pending_[f] = flats_[f]->params().size();
  std::fill(ready_.begin(), ready_.end(), false);
  std::fill(works_.begin(), works_.end(), nullptr);
  next_launch_ = 0;
  next_fold_ = 0;
  step_active_ = false;
}

void ShardedStrategy::mark_ready(size_t index) {
  bool persistent = persistent_gradients();
  if (persistent && !sync_enabled_)
    return; // accumulating locally into the persistent flat gradient
  std::lock_guard<std::mutex> guard(mtx_);
  if (ready_[index])
    throw Error(Errc::invalid_argument, label() + ": a parameter received its gradient twice in "
                                                  "one backward pass");
  auto [f, e] = slots_[index];
  auto& flat = *flats_[f];
  auto& entry = flat.entries()[e];
  auto& p = params_[index];
  torch::NoGradGuard no_grad;
  if (persistent) {
    auto view = grad_buffers_[f].narrow(0, entry.offset, entry.numel).view(entry.shape);
    if (p.grad().defined() && p.grad().data_ptr() != view.data_ptr()) {
      view.copy_(p.grad());
      p.mutable_grad() = view;
    }
  } else {
    if (!grad_buffers_[f].defined()) {
      grad_buffers_[f] = torch::zeros({flat.padded()}, flat.full().options());
      add_transient(flat.full_bytes());
    }
    if (p.grad().defined())
      grad_buffers_[f].narrow(0, entry.offset, entry.numel).copy_(p.grad().reshape({-1}));
    p.mutable_grad().reset(); // the full gradient lives only until its flat is reduced
  }
  ready_[index] = true;
  step_active_ = true;
  if (--pending_[f] == 0)
    launch_ready();
}

void ShardedStrategy::launch_ready() {
  while (next_launch_ < flats_.size() && pending_[next_launch_] == 0) {
    auto f = next_launch_++;
    auto& flat = *flats_[f];
    if (!communicator_ || communicator_->size() == 1) {
      works_[f] = nullptr; // one rank: the buffer is already the average
    } else if (replicate()) {
      works_[f] = communicator_->allreduce(grad_buffers_[f], ReduceOp::avg);
    } else if (persistent_gradients()) {
      works_[f] = communicator_->reduce_scatter(grad_buffers_[f], flat.shard_grad(), ReduceOp::avg);
    } else {
      grad_outputs_[f] = torch::empty({flat.shard_size()}, flat.full().options());
      add_transient(flat.shard_size_bytes());
      works_[f] = communicator_->reduce_scatter(grad_buffers_[f], grad_outputs_[f], ReduceOp::avg);
    }
    // Transient full gradients: keep at most kInFlight flats' buffers alive, so that
    // the gradients of a whole model never exist at once (ZeRO-2's point).
    if (!persistent_gradients())
      while (next_fold_ + kInFlight < next_launch_)
        fold(next_fold_++);
  }
}

void ShardedStrategy::fold(size_t f) {
  if (works_[f])
    works_[f]->wait();
  works_[f] = nullptr;
  auto& flat = *flats_[f];
  bool single = !communicator_ || communicator_->size() == 1;
  torch::NoGradGuard no_grad;
  if (persistent_gradients()) {
    if (single || replicate())
      flat.shard_grad().copy_(grad_buffers_[f].narrow(0, flat.rank() * flat.shard_size(),
                                                      flat.shard_size()));
    return;
  }
  if (single || replicate())
    flat.shard_grad().add_(grad_buffers_[f].narrow(0, flat.rank() * flat.shard_size(), flat.shard_size()));
  else
    flat.shard_grad().add_(grad_outputs_[f]);
  transient_ -= flat.full_bytes();
  grad_buffers_[f] = at::Tensor();
  if (grad_outputs_[f].defined()) {
    transient_ -= flat.shard_size_bytes();
    grad_outputs_[f] = at::Tensor();
  }
}

void ShardedStrategy::backward(const at::Tensor& loss) {
  Strategy::backward(loss);
  // Without persistent full gradients every micro-batch is reduced into the shards (the
  // full gradients were freed as their flats went out); with them, only the last one of
  // an accumulation window, in finish_gradient_sync.
  if (!persistent_gradients())
    complete_reduction();
}

void ShardedStrategy::finish_gradient_sync() {
  if (persistent_gradients() && !sync_enabled_)
    return;
  complete_reduction();
}

void ShardedStrategy::complete_reduction() {
  std::unique_lock<std::mutex> guard(mtx_);
  if (!step_active_)
    return;
  // Parameters that got no gradient this step count as zero gradients.
  for (size_t i = 0; i < params_.size(); ++i)
    if (!ready_[i]) {
      guard.unlock();
      mark_ready(i);
      guard.lock();
    }
  guard.unlock();
  std::exception_ptr failure;
  for (size_t f = next_fold_; f < flats_.size(); ++f) {
    try {
      fold(f);
    } catch (...) {
      if (!failure)
        failure = std::current_exception();
    }
  }
  guard.lock();
  reset_step();
  guard.unlock();
  if (failure)
    std::rethrow_exception(failure);
}

double ShardedStrategy::clip_grad_norm(double max_norm, double norm_type) {
  torch::NoGradGuard no_grad;
  bool inf = std::isinf(norm_type);
  double local = 0;
  for (auto& flat : flats_) {
    auto g = flat->shard_grad();
    local = inf ? std::max(local, g.abs().max().item<double>())
                : local + g.abs().pow(norm_type).sum().item<double>();
  }
  bool distributed = communicator_ && communicator_->size() > 1 && !replicate();
  double total = distributed ? reduce(local, inf ? ReduceOp::max : ReduceOp::sum) : local;
  double norm = inf ? total : std::pow(total, 1.0 / norm_type);
  double coef = max_norm / (norm + 1e-6);
  if (coef < 1)
    for (auto& flat : flats_)
      flat->shard_grad().mul_(coef);
  return norm;
}

void ShardedStrategy::clip_grad_value(double clip_value) {
  torch::NoGradGuard no_grad;
  for (auto& flat : flats_)
    flat->shard_grad().clamp_(-clip_value, clip_value);
}

void ShardedStrategy::optimizer_step(torch::optim::Optimizer& optimizer) {
  optimizer.step();
  for (auto& [opt, owned] : owners_)
    if (opt == &optimizer)
      after_step(owned);
}

void ShardedStrategy::zero_grad(torch::optim::Optimizer& optimizer) {
  torch::NoGradGuard no_grad;
  for (auto& [opt, owned] : owners_) {
    if (opt != &optimizer)
      continue;
    for (auto f : owned) {
      flats_[f]->shard_grad().zero_();
      if (persistent_gradients())
        grad_buffers_[f].zero_();
    }
  }
}

std::vector<at::Tensor> ShardedStrategy::gradients() {
  std::vector<at::Tensor> result;
  for (auto& flat : flats_)
    result.push_back(flat->shard_grad());
  return result;
}

StateDict ShardedStrategy::model_state_dict() {
  require_setup("model_state_dict");
  for (size_t f = 0; f < flats_.size(); ++f)
    ensure_gathered(f);
  StateDict result;
  for (auto& item : state_dict(*module_))
    result.insert(item.key(), item.value().clone());
  return result;
}

void ShardedStrategy::load_model_state_dict(const StateDict& state, bool strict) {
  require_setup("load_model_state_dict");
  for (size_t f = 0; f < flats_.size(); ++f)
    ensure_gathered(f);
  load_state_dict(*module_, state, {strict});
  for (auto& flat : flats_)
    flat->shard_from_full();
}

std::map<std::string, std::vector<char>> ShardedStrategy::shard_files() {
  std::map<std::string, std::vector<char>> files;
  int rank = communicator_ ? communicator_->rank() : 0;
  if (replicate() && rank != 0)
    return files; // every rank holds the same: rank 0 writes it
  StateDict shard;
  for (auto& [opt, owned] : owners_) {
    for (auto f : owned) {
      auto& flat = *flats_[f];
      shard.insert(flat.id(), flat.shard().detach().cpu().clone());
      for (auto& [key, t] : optimizer_state_of(*opt, flat.shard()))
        shard.insert(flat.id() + "/" + key, t.detach().cpu().clone());
    }
  }
  files[shard_file(replicate() ? 0 : rank)] = serialize_state_dict(shard);
  if (rank == 0) {
    ShardLayout layout;
    layout.world_size = flats_.empty() ? 1 : flats_.front()->world();
    layout.strategy = name();
    for (auto& flat : flats_) {
      FlatLayout fl;
      fl.id = flat->id();
      fl.numel = flat->numel();
      fl.padded = flat->padded();
      fl.shard_size = flat->shard_size();
      for (auto& e : flat->entries())
        fl.entries.push_back({e.name, e.shape, e.offset, e.numel});
      layout.flats.push_back(std::move(fl));
    }
    auto text = to_json(layout);
    files[kLayoutFile] = std::vector<char>(text.begin(), text.end());
    StateDict buffers;
    for (auto& item : module_->named_buffers())
      buffers.insert(item.key(), item.value().detach());
    files[kBuffersFile] = serialize_state_dict(buffers);
    files[kOptimizerOptionsFile] = optimizer_options_bytes(optimizers_);
  }
  return files;
}

void ShardedStrategy::load_sharded(const Checkpoint& checkpoint) {
  auto state = consolidate(checkpoint); // any world size: put everything back together
  load_model_state_dict(state.model, true);
  for (auto& [opt, owned] : owners_)
    for (auto f : owned)
      install_shard_state(*opt, *flats_[f], [&](const std::string& name) {
        auto it = state.optimizer.find(name);
        return it == state.optimizer.end() ? nullptr : &it->second;
      });
  if (checkpoint.has_file(kOptimizerOptionsFile)) {
    auto path = checkpoint.file(kOptimizerOptionsFile);
    auto saved = read_saved_optimizers(read_file(path), optimizers_, path);
    for (size_t i = 0; i < saved.size(); ++i)
      restore_options(*optimizers_[i], saved[i], path);
  }
}

void ShardedStrategy::load_optimizer_state(const std::vector<SavedOptimizer>& saved) {
  require_setup("load_optimizer_state");
  if (saved.size() != owners_.size())
    throw Error(Errc::state_mismatch, label() + ": the checkpoint has " +
                                        std::to_string(saved.size()) + " optimizers but "
                                        "configure_optimizers returned " +
                                        std::to_string(owners_.size()));
  for (size_t i = 0; i < owners_.size(); ++i) {
    auto& names = group_names_[i];
    auto& groups = saved[i].groups;
    if (groups.size() != names.size())
      throw Error(Errc::state_mismatch, label() + ": optimizer " + std::to_string(i) + " has " +
                                          std::to_string(groups.size()) +
                                          " param groups in the checkpoint but " +
                                          std::to_string(names.size()) + " here");
    // The saved state is indexed like configure_optimizers' groups: name it, then cut it.
    std::map<std::string, const std::map<std::string, at::Tensor>*> by_name;
    for (size_t g = 0; g < names.size(); ++g) {
      if (groups[g].state.size() != names[g].size())
        throw Error(Errc::state_mismatch,
                    label() + ": param group " + std::to_string(g) + " of optimizer " +
                      std::to_string(i) + " has " + std::to_string(groups[g].state.size()) +
                      " parameters in the checkpoint but " + std::to_string(names[g].size()) +
                      " here; build the groups as the run that saved it did");
      for (size_t k = 0; k < names[g].size(); ++k)
        by_name[names[g][k]] = &groups[g].state[k];
    }
    auto& [opt, owned] = owners_[i];
    for (auto f : owned)
      install_shard_state(*opt, *flats_[f], [&](const std::string& name) {
        auto it = by_name.find(name);
        return it == by_name.end() || it->second->empty() ? nullptr : it->second;
      });
  }
}

MemoryStats ShardedStrategy::memory_stats() const {
  MemoryStats stats;
  for (size_t f = 0; f < flats_.size(); ++f) {
    auto& flat = *flats_[f];
    stats.parameter_bytes += flat.shard_bytes() + (flat.gathered() ? flat.full_bytes() : 0);
    if (flat.shard().grad().defined())
      stats.gradient_bytes += flat.shard_size_bytes();
    if (grad_buffers_[f].defined())
      stats.gradient_bytes += static_cast<int64_t>(grad_buffers_[f].nbytes());
  }
  for (auto& opt : optimizers_)
    stats.optimizer_state_bytes += optimizer_state_bytes(*opt);
  stats.peak_transient_bytes = peak_transient_;
  return stats;
}

} // namespace caftrain
