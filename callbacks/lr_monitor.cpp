#include "callbacks/lr_monitor.hpp"

#include <torch/torch.h>

#include "core/error.hpp"
#include "train/trainer.hpp"

namespace caftrain {

namespace {

std::string optimizer_name(const torch::optim::Optimizer& opt) {
  namespace o = torch::optim;
  if (dynamic_cast<const o::AdamW*>(&opt))
    return "AdamW";
  if (dynamic_cast<const o::Adam*>(&opt))
    return "Adam";
  if (dynamic_cast<const o::SGD*>(&opt))
    return "SGD";
  if (dynamic_cast<const o::RMSprop*>(&opt))
    return "RMSprop";
  if (dynamic_cast<const o::Adagrad*>(&opt))
    return "Adagrad";
  if (dynamic_cast<const o::LBFGS*>(&opt))
    return "LBFGS";
  return "Optimizer";
}

std::optional<double> momentum_of(const torch::optim::OptimizerOptions& options) {
  namespace o = torch::optim;
  if (auto* x = dynamic_cast<const o::SGDOptions*>(&options))
    return x->momentum();
  if (auto* x = dynamic_cast<const o::AdamOptions*>(&options))
    return std::get<0>(x->betas());
  if (auto* x = dynamic_cast<const o::AdamWOptions*>(&options))
    return std::get<0>(x->betas());
  if (auto* x = dynamic_cast<const o::RMSpropOptions*>(&options))
    return x->momentum();
  return std::nullopt;
}

} // namespace

LearningRateMonitor::LearningRateMonitor(LearningRateMonitorOptions options)
  : options_(std::move(options)) {
  if (options_.logging_interval != "step" && options_.logging_interval != "epoch")
    throw Error(Errc::invalid_config, "LearningRateMonitor logging_interval '" +
                                        options_.logging_interval +
                                        "' is unknown; use \"step\" or \"epoch\"");
}

std::string LearningRateMonitor::state_key() const {
  return "LearningRateMonitor";
}

Metrics LearningRateMonitor::learning_rates(const Trainer& trainer, bool with_momentum) {
  Metrics result;
  std::map<std::string, int> seen;
  auto& optimizers = trainer.optimizers();
  std::map<std::string, int> count;
  for (auto& opt : optimizers)
    ++count[optimizer_name(*opt)];
  for (auto& opt : optimizers) {
    auto base = optimizer_name(*opt);
    auto name = "lr-" + base;
    if (count[base] > 1)
      name += "-" + std::to_string(seen[base]++);
    auto& groups = opt->param_groups();
    for (size_t g = 0; g < groups.size(); ++g) {
      auto key = groups.size() > 1 ? name + "/pg" + std::to_string(g + 1) : name;
      result[key] = groups[g].options().get_lr();
      if (with_momentum)
        if (auto m = momentum_of(groups[g].options()))
          result[key.substr(0, 0) + "momentum" + key.substr(2)] = *m;
    }
  }
  return result;
}

void LearningRateMonitor::record(Trainer& trainer) {
  last_ = learning_rates(trainer, options_.log_momentum);
  if (!trainer.is_global_zero())
    return;
  for (auto& lg : trainer.loggers())
    lg->log_metrics(last_, trainer.global_step());
}

void LearningRateMonitor::on_train_batch_start(Trainer& trainer, LightningModule&, const Batch&,
                                               int64_t) {
  if (options_.logging_interval != "step")
    return;
  // At the first batch of an accumulation window that ends on a logging step.
  auto k = trainer.options().accumulate_grad_batches;
  if (trainer.batch_idx() % k != 0)
    return;
  if ((trainer.global_step() + 1) % trainer.options().log_every_n_steps == 0 ||
      trainer.global_step() == 0)
    record(trainer);
}

void LearningRateMonitor::on_train_epoch_start(Trainer& trainer, LightningModule&) {
  if (options_.logging_interval == "epoch")
    record(trainer);
}

} // namespace caftrain
