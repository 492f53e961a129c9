#include "train/lightning_module.hpp"

#include <torch/torch.h>

#include "core/error.hpp"
#include "train/trainer.hpp"
#include "train/trainer_impl.hpp"

namespace caftrain {

LightningModule::LightningModule() = default;

LightningModule::LightningModule(const std::string& name) : torch::nn::Module(name) {
  // nop
}

LightningModule::~LightningModule() = default;

void LightningModule::validation_step(const Batch&, int64_t) {
  has_validation_step_ = false;
}

void LightningModule::test_step(const Batch&, int64_t) {
  has_test_step_ = false;
}

void LightningModule::log(const std::string& name, const at::Tensor& value, LogOptions options) {
  if (trainer_)
    trainer_->impl().collector.log(name, value, options);
}

void LightningModule::log(const std::string& name, double value, LogOptions options) {
  if (trainer_)
    log(name, torch::tensor(value, torch::kDouble), options);
}

void LightningModule::log_dict(const Metrics& values, LogOptions options) {
  for (auto& [name, value] : values)
    log(name, value, options);
}

Trainer& LightningModule::trainer() const {
  if (!trainer_)
    throw Error(Errc::bad_state, "this LightningModule is not attached to a Trainer; "
                                 "trainer() works inside fit, validate and test");
  return *trainer_;
}

int64_t LightningModule::current_epoch() const {
  return trainer_ ? trainer_->current_epoch() : 0;
}

int64_t LightningModule::global_step() const {
  return trainer_ ? trainer_->global_step() : 0;
}

torch::Device LightningModule::device() const {
  auto params = parameters();
  return params.empty() ? torch::Device(torch::kCPU) : params.front().device();
}

} // namespace caftrain
