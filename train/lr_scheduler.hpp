// Learning-rate schedulers with checkpointable state.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace torch::optim {
class Optimizer;
}

namespace caftrain {

/// Base of caftrain's learning-rate schedulers. Unlike libtorch's `LRScheduler`, each
/// learning rate is a closed-form function of the step count and the base rates, so the
/// whole state is one counter (checkpointed with the Trainer), and the scheduler can be
/// re-bound to the optimizer a sharding strategy builds over its shard.
class LRScheduler {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Schedules `optimizer`'s param groups, from their current learning rates.
  explicit LRScheduler(std::shared_ptr<torch::optim::Optimizer> optimizer);

  virtual ~LRScheduler();

  // -- properties -------------------------------------------------------------------

  /// Scheduler name as Lightning's LearningRateMonitor shows it, e.g. "StepLR".
  virtual std::string name() const = 0;

  /// Number of `step()` calls so far (PyTorch's `last_epoch`).
  int64_t last_epoch() const noexcept {
    return last_epoch_;
  }

  /// The learning rates set by the last step (PyTorch's `get_last_lr()`).
  std::vector<double> get_last_lr() const;

  const std::vector<double>& base_lrs() const noexcept {
    return base_lrs_;
  }

  const std::shared_ptr<torch::optim::Optimizer>& optimizer() const noexcept {
    return optimizer_;
  }

  // -- modifiers --------------------------------------------------------------------

  /// Advances one step (an epoch or a batch, as the Trainer's interval says) and sets
  /// the optimizer's learning rates.
  void step();

  /// Restores the step count (from a checkpoint) and sets the matching rates.
  void set_last_epoch(int64_t last_epoch);

  /// Points the scheduler at `optimizer` (same param groups, e.g. over a shard).
  void bind(std::shared_ptr<torch::optim::Optimizer> optimizer);

 protected:
  /// The learning rate of a group with base rate `base_lr` after `step` steps.
  virtual double lr_at(int64_t step, double base_lr) const = 0;

 private:
  void apply();

  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  std::vector<double> base_lrs_;
  int64_t last_epoch_ = 0;
};

/// Multiplies the rate by gamma every step_size steps.
class StepLR : public LRScheduler {
 public:
  StepLR(std::shared_ptr<torch::optim::Optimizer> optimizer, int64_t step_size, double gamma = 0.1);
  std::string name() const override;

 protected:
  double lr_at(int64_t step, double base_lr) const override;

 private:
  int64_t step_size_;
  double gamma_;
};

/// Multiplies the rate by gamma at each milestone.
class MultiStepLR : public LRScheduler {
 public:
  MultiStepLR(std::shared_ptr<torch::optim::Optimizer> optimizer, std::vector<int64_t> milestones,
              double gamma = 0.1);
  std::string name() const override;

 protected:
  double lr_at(int64_t step, double base_lr) const override;

 private:
  std::vector<int64_t> milestones_;
  double gamma_;
};

/// Multiplies the rate by gamma every step.
class ExponentialLR : public LRScheduler {
 public:
  ExponentialLR(std::shared_ptr<torch::optim::Optimizer> optimizer, double gamma);
  std::string name() const override;

 protected:
  double lr_at(int64_t step, double base_lr) const override;

 private:
  double gamma_;
};

/// Cosine annealing from the base rate to eta_min over t_max steps (closed form).
class CosineAnnealingLR : public LRScheduler {
 public:
  CosineAnnealingLR(std::shared_ptr<torch::optim::Optimizer> optimizer, int64_t t_max,
                    double eta_min = 0.0);
  std::string name() const override;

 protected:
  double lr_at(int64_t step, double base_lr) const override;

 private:
  int64_t t_max_;
  double eta_min_;
};

/// The base rate times a user function of the step.
class LambdaLR : public LRScheduler {
 public:
  LambdaLR(std::shared_ptr<torch::optim::Optimizer> optimizer, std::function<double(int64_t)> factor);
  std::string name() const override;

 protected:
  double lr_at(int64_t step, double base_lr) const override;

 private:
  std::function<double(int64_t)> factor_;
};

} // namespace caftrain
