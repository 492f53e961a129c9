#include "strategies/strategy.hpp"

#include <cstring>
#include <utility>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "checkpoint/optimizer_archive.hpp"
#include "core/error.hpp"
#include "environment/cluster_environment.hpp"
#include "strategies/flat_shard.hpp"

namespace caftrain {

ParameterScope::ParameterScope(std::function<void()> release) noexcept : release_(std::move(release)) {}

ParameterScope::ParameterScope(ParameterScope&& other) noexcept
  : release_(std::exchange(other.release_, nullptr)) {}

ParameterScope& ParameterScope::operator=(ParameterScope&& other) noexcept {
  if (this != &other) {
    release();
    release_ = std::exchange(other.release_, nullptr);
  }
  return *this;
}

ParameterScope::~ParameterScope() {
  release();
}

void ParameterScope::release() noexcept {
  if (auto fn = std::exchange(release_, nullptr)) {
    try {
      fn();
    } catch (const std::exception& e) {
      spdlog::error("caftrain: ending a summon_full_params scope failed: {}", e.what());
    }
  }
}

Strategy::~Strategy() = default;

ParameterScope Strategy::summon_full_params(bool writeback) {
  if (writeback || !module_)
    return {}; // the parameters are whole here: what the scope writes stays
  // Without writeback what the scope writes is discarded: a copy to put back.
  std::vector<std::pair<at::Tensor, at::Tensor>> saved;
  for (auto& p : module_->parameters())
    saved.emplace_back(p, p.detach().clone());
  return ParameterScope([saved = std::move(saved)] {
    torch::NoGradGuard no_grad;
    for (auto& [p, copy] : saved)
      p.detach().copy_(copy);
  });
}

void Strategy::setup(torch::nn::Module& module, std::shared_ptr<ClusterEnvironment> environment,
                     c10::Device device) {
  if (!environment)
    environment = std::make_shared<LightningEnvironment>();
  module_ = &module;
  environment_ = std::move(environment);
  communicator_ = environment_->communicator();
  device_ = device;
  if (is_distributed() && environment_->world_size() > 1 && !communicator_)
    throw Error(Errc::invalid_config,
                "strategy '" + name() + "' runs on " + std::to_string(environment_->world_size()) +
                  " ranks but environment '" + environment_->name() +
                  "' has no communicator; use ActorEnvironment inside a TorchTrainer worker "
                  "or a StaticEnvironment with a communicator");
  module.to(device);
}

void Strategy::setup_optimizers(std::vector<std::shared_ptr<torch::optim::Optimizer>>& optimizers) {
  require_setup("setup_optimizers");
  bool trainable = false;
  for (auto& p : module_->parameters())
    trainable = trainable || p.requires_grad();
  if (!trainable)
    throw Error(Errc::invalid_config,
                "strategy '" + name() + "': the module has no trainable parameters (none, or all "
                                        "with requires_grad false), so fit has nothing to train; "
                                        "register parameters in the module, or call validate or "
                                        "test instead");
  optimizers_ = optimizers;
}

void Strategy::teardown() {
  // The optimizers stay known: a checkpoint saved after fit (Trainer::save_checkpoint)
  // still records their state and options. The next setup replaces them.
}

void Strategy::require_setup(const char* what) const {
  if (!module_)
    throw Error(Errc::bad_state,
                std::string("Strategy::") + what + " called before setup(); the Trainer sets "
                                                   "its strategy up in fit/validate/test");
}

torch::nn::Module& Strategy::module() const {
  require_setup("module");
  return *module_;
}

void Strategy::backward(const at::Tensor& loss) {
  loss.backward();
}

double Strategy::clip_grad_norm(double max_norm, double norm_type) {
  require_setup("clip_grad_norm");
  return torch::nn::utils::clip_grad_norm_(module_->parameters(), max_norm, norm_type);
}

void Strategy::clip_grad_value(double clip_value) {
  require_setup("clip_grad_value");
  torch::nn::utils::clip_grad_value_(module_->parameters(), clip_value);
}

void Strategy::optimizer_step(torch::optim::Optimizer& optimizer) {
  optimizer.step();
}

void Strategy::zero_grad(torch::optim::Optimizer& optimizer) {
  optimizer.zero_grad();
}

int64_t Strategy::world_size() const {
  return environment_ ? environment_->world_size() : 1;
}

int64_t Strategy::global_rank() const {
  return environment_ ? environment_->global_rank() : 0;
}

double Strategy::reduce(double value, ReduceOp op) {
  if (!communicator_ || communicator_->size() == 1)
    return value;
  auto t = torch::tensor({value}, torch::kDouble);
  communicator_->allreduce(t, op)->wait();
  return t.item<double>();
}

void Strategy::barrier() {
  if (communicator_ && communicator_->size() > 1)
    communicator_->barrier()->wait();
}

std::string Strategy::broadcast(const std::string& value) {
  if (!communicator_ || communicator_->size() == 1)
    return value;
  auto size = torch::tensor({static_cast<int64_t>(value.size())}, torch::kLong);
  communicator_->broadcast(size, 0)->wait();
  auto bytes = torch::empty({size.item<int64_t>()}, torch::kUInt8);
  if (communicator_->rank() == 0)
    std::memcpy(bytes.data_ptr(), value.data(), value.size());
  if (bytes.numel() > 0)
    communicator_->broadcast(bytes, 0)->wait();
  return std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
}

StateDict Strategy::model_state_dict() {
  require_setup("model_state_dict");
  return state_dict(*module_);
}

void Strategy::load_model_state_dict(const StateDict& state, bool strict) {
  require_setup("load_model_state_dict");
  load_state_dict(*module_, state, {strict});
}

std::map<std::string, FileSource> Strategy::shard_files(TensorCopies&) {
  throw Error(Errc::invalid_config, "strategy '" + name() + "' writes unsharded checkpoints");
}

void Strategy::load_sharded(const Checkpoint&) {
  throw Error(Errc::invalid_config, "strategy '" + name() + "' loads unsharded checkpoints");
}

void Strategy::load_optimizer_state(const std::vector<SavedOptimizer>& saved) {
  require_setup("load_optimizer_state");
  if (saved.size() != optimizers_.size())
    throw Error(Errc::state_mismatch, "strategy '" + name() + "': the checkpoint has " +
                                        std::to_string(saved.size()) + " optimizers but "
                                        "configure_optimizers returned " +
                                        std::to_string(optimizers_.size()));
  for (size_t i = 0; i < saved.size(); ++i) {
    auto& groups = optimizers_[i]->param_groups();
    if (saved[i].groups.size() != groups.size())
      throw Error(Errc::state_mismatch, "optimizer " + std::to_string(i) + " has " +
                                          std::to_string(saved[i].groups.size()) +
                                          " param groups in the checkpoint but " +
                                          std::to_string(groups.size()) + " here");
    for (size_t g = 0; g < groups.size(); ++g) {
      auto& params = groups[g].params();
      auto& state = saved[i].groups[g].state;
      if (state.size() != params.size())
        throw Error(Errc::state_mismatch,
                    "param group " + std::to_string(g) + " of optimizer " + std::to_string(i) +
                      " has " + std::to_string(state.size()) + " parameters in the checkpoint but " +
                      std::to_string(params.size()) + " here; build the groups as the run that "
                      "saved it did");
      for (size_t k = 0; k < params.size(); ++k)
        set_optimizer_state(*optimizers_[i], params[k], state[k]);
    }
  }
}

std::vector<at::Tensor> Strategy::gradients() {
  require_setup("gradients");
  std::vector<at::Tensor> result;
  for (auto& p : module_->parameters())
    if (p.grad().defined())
      result.push_back(p.grad());
  return result;
}

MemoryStats Strategy::memory_stats() const {
  MemoryStats stats;
  if (!module_)
    return stats;
  for (auto& p : module_->parameters()) {
    stats.parameter_bytes += static_cast<int64_t>(p.nbytes());
    if (p.grad().defined())
      stats.gradient_bytes += static_cast<int64_t>(p.grad().nbytes());
  }
  for (auto& opt : optimizers_)
    stats.optimizer_state_bytes += optimizer_state_bytes(*opt);
  return stats;
}

int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  int64_t total = 0;
  for (auto& item : optimizer.state())
    for (auto& [key, t] : state_tensors(*item.second))
      if (key != "step") // a counter, not state that grows with the model
        total += static_cast<int64_t>(t.nbytes());
  return total;
}

std::string SingleDeviceStrategy::name() const {
  return "single_device";
}

} // namespace caftrain
