#include "train/lr_scheduler.hpp"

#include <algorithm>
#include <cmath>

#include <torch/torch.h>

#include "core/error.hpp"

namespace caftrain {

namespace {

std::vector<double> current_lrs(torch::optim::Optimizer& optimizer) {
  std::vector<double> result;
  for (auto& group : optimizer.param_groups())
    result.push_back(group.options().get_lr());
  return result;
}

} // namespace

LRScheduler::LRScheduler(std::shared_ptr<torch::optim::Optimizer> optimizer)
  : optimizer_(std::move(optimizer)) {
  if (!optimizer_)
    throw Error(Errc::invalid_argument, "a learning-rate scheduler needs an optimizer, got null");
  base_lrs_ = current_lrs(*optimizer_);
}

LRScheduler::~LRScheduler() = default;

std::vector<double> LRScheduler::get_last_lr() const {
  return current_lrs(*optimizer_);
}

void LRScheduler::step() {
  ++last_epoch_;
  apply();
}

void LRScheduler::set_last_epoch(int64_t last_epoch) {
  last_epoch_ = last_epoch;
  apply();
}

void LRScheduler::bind(std::shared_ptr<torch::optim::Optimizer> optimizer) {
  if (!optimizer || optimizer->param_groups().size() != base_lrs_.size())
    throw Error(Errc::invalid_argument,
                "LRScheduler::bind: the new optimizer must have the same number of param groups");
  optimizer_ = std::move(optimizer);
  apply();
}

void LRScheduler::apply() {
  auto& groups = optimizer_->param_groups();
  for (size_t i = 0; i < groups.size() && i < base_lrs_.size(); ++i)
    groups[i].options().set_lr(lr_at(last_epoch_, base_lrs_[i]));
}

StepLR::StepLR(std::shared_ptr<torch::optim::Optimizer> optimizer, int64_t step_size, double gamma)
  : LRScheduler(std::move(optimizer)), step_size_(step_size), gamma_(gamma) {
  if (step_size_ < 1)
    throw Error(Errc::invalid_argument, "StepLR: step_size must be at least 1");
}

std::string StepLR::name() const {
  return "StepLR";
}

double StepLR::lr_at(int64_t step, double base_lr) const {
  return base_lr * std::pow(gamma_, static_cast<double>(step / step_size_));
}

MultiStepLR::MultiStepLR(std::shared_ptr<torch::optim::Optimizer> optimizer,
                         std::vector<int64_t> milestones, double gamma)
  : LRScheduler(std::move(optimizer)), milestones_(std::move(milestones)), gamma_(gamma) {
  std::sort(milestones_.begin(), milestones_.end());
}

std::string MultiStepLR::name() const {
  return "MultiStepLR";
}

double MultiStepLR::lr_at(int64_t step, double base_lr) const {
  auto passed = std::upper_bound(milestones_.begin(), milestones_.end(), step) - milestones_.begin();
  return base_lr * std::pow(gamma_, static_cast<double>(passed));
}

ExponentialLR::ExponentialLR(std::shared_ptr<torch::optim::Optimizer> optimizer, double gamma)
  : LRScheduler(std::move(optimizer)), gamma_(gamma) {
  // nop
}

std::string ExponentialLR::name() const {
  return "ExponentialLR";
}

double ExponentialLR::lr_at(int64_t step, double base_lr) const {
  return base_lr * std::pow(gamma_, static_cast<double>(step));
}

CosineAnnealingLR::CosineAnnealingLR(std::shared_ptr<torch::optim::Optimizer> optimizer,
                                     int64_t t_max, double eta_min)
  : LRScheduler(std::move(optimizer)), t_max_(t_max), eta_min_(eta_min) {
  if (t_max_ < 1)
    throw Error(Errc::invalid_argument, "CosineAnnealingLR: t_max must be at least 1");
}

std::string CosineAnnealingLR::name() const {
  return "CosineAnnealingLR";
}

double CosineAnnealingLR::lr_at(int64_t step, double base_lr) const {
  const double pi = 3.14159265358979323846;
  return eta_min_ + (base_lr - eta_min_) * (1 + std::cos(pi * static_cast<double>(step) /
                                                         static_cast<double>(t_max_))) / 2;
}

LambdaLR::LambdaLR(std::shared_ptr<torch::optim::Optimizer> optimizer,
                   std::function<double(int64_t)> factor)
  : LRScheduler(std::move(optimizer)), factor_(std::move(factor)) {
  if (!factor_)
    throw Error(Errc::invalid_argument, "LambdaLR needs a factor function");
}

std::string LambdaLR::name() const {
  return "LambdaLR";
}

double LambdaLR::lr_at(int64_t step, double base_lr) const {
  return base_lr * factor_(step);
}

} // namespace caftrain
