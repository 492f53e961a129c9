// Precision: the Trainer's `precision` option (autocast and loss scaling).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace torch::optim {
class Optimizer;
}

namespace caftrain {

class Strategy;

/// Lightning's precision plugin: "32-true" (plain float32), "bf16-mixed" (autocast to
/// bfloat16 on CPU or GPU, no loss scaling) and "16-mixed" (autocast to float16 on GPU
/// with dynamic loss scaling, like torch.cuda.amp.GradScaler).
class Precision {
 public:
  /// RAII: autocast enabled for the forward pass while alive (thread-local).
  class Autocast {
   public:
    Autocast(const Precision& precision);
    ~Autocast();
    Autocast(const Autocast&) = delete;
    Autocast& operator=(const Autocast&) = delete;

   private:
    bool active_ = false;
    bool cuda_ = false;
    bool prev_enabled_ = false;
    at::ScalarType prev_dtype_ = at::kFloat;
  };

  /// Checks `name` against the device; throws `Error(invalid_config)` for an unknown
  /// name, and `Error(unavailable)` for "16-mixed" without a GPU.
  Precision(const std::string& name, c10::Device device);

  const std::string& name() const noexcept {
    return name_;
  }

  bool mixed() const noexcept {
    return dtype_ != at::kFloat;
  }

  /// The loss to call backward on (scaled under "16-mixed").
  at::Tensor scale(const at::Tensor& loss) const;

  /// Before the optimizer step: unscales `grads` (the strategy's gradients) and says
  /// whether the step may proceed (false when an inf/NaN was found on any rank; the scale
  /// then shrinks).
  bool unscale(const std::vector<at::Tensor>& grads, Strategy& strategy);

  /// Current loss scale (1 unless "16-mixed").
  double loss_scale() const noexcept {
    return scale_;
  }

 private:
  /// Steps without overflow before the scale doubles (GradScaler's growth_interval).
  static constexpr int kGrowthInterval = 2000;

  std::string name_;
  c10::Device device_;
  at::ScalarType dtype_ = at::kFloat;
  bool scaling_ = false;
  double scale_ = 1.0;
  int good_steps_ = 0;
};

} // namespace caftrain
