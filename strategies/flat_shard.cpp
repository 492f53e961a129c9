#include "strategies/flat_shard.hpp"

#include <limits>

#include <torch/torch.h>

#include "checkpoint/optimizer_archive.hpp"
#include "core/error.hpp"
#include "strategies/block_cache.hpp"

namespace caftrain {

FlatShard::FlatShard(std::string id, std::vector<std::pair<std::string, at::Tensor>> params,
                     int rank, int world, bool alias_shard)
  : id_(std::move(id)), rank_(rank), world_(world), alias_shard_(alias_shard) {
  if (params.empty())
    throw Error(Errc::invalid_argument, "FlatShard '" + id_ + "' has no parameters");
  auto options = params.front().second.options().requires_grad(false);
  for (auto& [name, p] : params) {
    if (p.scalar_type() != options.dtype().toScalarType() || p.device() != options.device())
      throw Error(Errc::invalid_argument, "FlatShard '" + id_ + "': parameter '" + name +
                                            "' differs in dtype or device from the others");
    FlatEntry e;
    e.name = name;
    e.shape = p.sizes().vec();
    e.offset = numel_;
    e.numel = p.numel();
    numel_ += e.numel;
    entries_.push_back(std::move(e));
    params_.push_back(p);
  }
  padded_ = (numel_ + world_ - 1) / world_ * world_;
  shard_size_ = padded_ / world_;
  torch::NoGradGuard no_grad;
  full_ = torch::zeros({padded_}, options);
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& e = entries_[i];
    auto view = full_.narrow(0, e.offset, e.numel).view(e.shape);
    view.copy_(params_[i].detach());
    params_[i].set_data(view); // the parameter now lives in the flat buffer
  }
  auto chunk = full_.narrow(0, rank_ * shard_size_, shard_size_);
  shard_ = (alias_shard_ ? chunk.detach() : chunk.clone()).requires_grad_(true);
}

at::Tensor& FlatShard::shard_grad() {
  if (!shard_.grad().defined())
    shard_.mutable_grad() = torch::zeros_like(shard_.detach());
  return shard_.mutable_grad();
}

int64_t FlatShard::full_bytes() const noexcept {
  return padded_ * static_cast<int64_t>(full_.element_size());
}

int64_t FlatShard::shard_bytes() const noexcept {
  return alias_shard_ ? 0 : shard_size_bytes();
}

int64_t FlatShard::shard_size_bytes() const noexcept {
  return shard_size_ * static_cast<int64_t>(shard_.element_size());
}

void FlatShard::shard_from_full() {
  if (alias_shard_)
    return; // the shard is the rank's chunk of the full buffer
  torch::NoGradGuard no_grad;
  shard_.detach().copy_(full_.narrow(0, rank_ * shard_size_, shard_size_));
}

void FlatShard::free_full() {
  if (!gathered_ && !poisoned_)
    return;
  if (alias_shard_)
    throw Error(Errc::bad_state, "FlatShard '" + id_ + "': the full buffer holds the shard and "
                                                       "cannot be freed");
  auto* storage = full_.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(at::DataPtr(nullptr, full_.device()));
  storage->set_nbytes(0);
  gathered_ = false;
  poisoned_ = false;
}

void FlatShard::poison() {
  if (gathered_ || poisoned_)
    return;
  auto* storage = full_.storage().unsafeGetStorageImpl();
  auto bytes = static_cast<size_t>(full_bytes());
  storage->set_data_ptr_noswap(block_cache::allocate(bytes, full_.device()));
  storage->set_nbytes(bytes);
  torch::NoGradGuard no_grad;
  full_.detach().fill_(std::numeric_limits<double>::quiet_NaN());
  poisoned_ = true;
}

void FlatShard::allocate_full() {
  if (gathered_)
    return;
  if (!poisoned_) {
    auto* storage = full_.storage().unsafeGetStorageImpl();
    auto bytes = static_cast<size_t>(full_bytes());
    storage->set_data_ptr_noswap(block_cache::allocate(bytes, full_.device()));
    storage->set_nbytes(bytes);
  }
  poisoned_ = false;
  gathered_ = true;
}

std::shared_ptr<Work> FlatShard::gather(Communicator* comm) {
  allocate_full();
  torch::NoGradGuard no_grad;
  if (world_ == 1 || !comm) {
    if (!alias_shard_)
      full_.copy_(shard_.detach());
    return nullptr;
  }
  // An aliased shard is part of the output: gather from a copy (collectives do not take
  // overlapping input and output); the work keeps it alive.
  return comm->allgather(alias_shard_ ? shard_.detach().clone() : shard_.detach(), full_);
}

void require_elementwise(const torch::optim::Optimizer& optimizer, const std::string& strategy) {
  namespace o = torch::optim;
  if (dynamic_cast<const o::Adam*>(&optimizer) || dynamic_cast<const o::AdamW*>(&optimizer) ||
      dynamic_cast<const o::SGD*>(&optimizer) || dynamic_cast<const o::RMSprop*>(&optimizer) ||
      dynamic_cast<const o::Adagrad*>(&optimizer))
    return;
  throw Error(Errc::invalid_config,
              strategy + " steps each rank's shard of the flattened parameters, which needs an "
                         "element-wise optimizer (Adam, AdamW, SGD, RMSprop or Adagrad); use "
                         "DDPStrategy for this optimizer");
}

} // namespace caftrain

namespace caftrain {

namespace {

std::string key_of(const at::Tensor& param) {
  return c10::guts::to_string(param.unsafeGetTensorImpl());
}

} // namespace

std::map<std::string, at::Tensor> optimizer_state_of(const torch::optim::Optimizer& optimizer,
                                                     const at::Tensor& param) {
  require_elementwise(optimizer, "a sharded strategy");
  auto it = optimizer.state().find(key_of(param));
  if (it == optimizer.state().end())
    return {};
  return state_tensors(*it->second);
}

void set_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& param,
                         const std::map<std::string, at::Tensor>& state) {
  namespace o = torch::optim;
  require_elementwise(optimizer, "a sharded strategy");
  if (state.empty())
    return;
  auto get = [&](const char* name) {
    auto i = state.find(name);
    return i == state.end() ? at::Tensor() : i->second.to(param.device()).contiguous();
  };
  auto step = [&] {
    auto t = get("step");
    return t.defined() ? t.item<int64_t>() : int64_t{0};
  };
  std::unique_ptr<o::OptimizerParamState> result;
  if (dynamic_cast<o::AdamW*>(&optimizer)) {
    auto s = std::make_unique<o::AdamWParamState>();
    s->step(step());
    s->exp_avg(get("exp_avg"));
    s->exp_avg_sq(get("exp_avg_sq"));
    s->max_exp_avg_sq(get("max_exp_avg_sq"));
    result = std::move(s);
  } else if (dynamic_cast<o::Adam*>(&optimizer)) {
    auto s = std::make_unique<o::AdamParamState>();
    s->step(step());
    s->exp_avg(get("exp_avg"));
    s->exp_avg_sq(get("exp_avg_sq"));
    s->max_exp_avg_sq(get("max_exp_avg_sq"));
    result = std::move(s);
  } else if (dynamic_cast<o::SGD*>(&optimizer)) {
    auto s = std::make_unique<o::SGDParamState>();
    s->momentum_buffer(get("momentum_buffer"));
    result = std::move(s);
  } else if (dynamic_cast<o::RMSprop*>(&optimizer)) {
    auto s = std::make_unique<o::RMSpropParamState>();
    s->step(step());
    s->square_avg(get("square_avg"));
    s->momentum_buffer(get("momentum_buffer"));
    s->grad_avg(get("grad_avg"));
    result = std::move(s);
  } else if (dynamic_cast<o::Adagrad*>(&optimizer)) {
    auto s = std::make_unique<o::AdagradParamState>();
    s->step(step());
    s->sum(get("sum"));
    result = std::move(s);
  }
  optimizer.state()[key_of(param)] = std::move(result);
}

} // namespace caftrain
