#include "train/precision.hpp"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "core/error.hpp"
#include "strategies/strategy.hpp"

namespace caftrain {

namespace {

/// Initial loss scale of "16-mixed" (GradScaler's init_scale).
constexpr double kInitialScale = 65536.0;

} // namespace

Precision::Precision(const std::string& name, c10::Device device) : name_(name), device_(device) {
  if (name == "32-true" || name == "32") {
    name_ = "32-true";
  } else if (name == "bf16-mixed" || name == "bf16") {
    name_ = "bf16-mixed";
    dtype_ = at::kBFloat16;
  } else if (name == "16-mixed" || name == "16") {
    if (!device.is_cuda())
      throw Error(Errc::unavailable,
                  "precision '16-mixed' needs a GPU (float16 autocast is CUDA-only in libtorch); "
                  "on CPU use precision = \"bf16-mixed\" or \"32-true\"");
    name_ = "16-mixed";
    dtype_ = at::kHalf;
    scaling_ = true;
    scale_ = kInitialScale;
  } else {
    throw Error(Errc::invalid_config, "unknown precision '" + name +
                                        "'; use \"32-true\", \"bf16-mixed\" or \"16-mixed\"");
  }
}

Precision::Autocast::Autocast(const Precision& precision) {
  if (!precision.mixed())
    return;
  active_ = true;
  cuda_ = precision.device_.is_cuda();
  if (cuda_) {
    prev_enabled_ = at::autocast::is_enabled();
    prev_dtype_ = at::autocast::get_autocast_gpu_dtype();
    at::autocast::set_autocast_gpu_dtype(precision.dtype_);
    at::autocast::set_enabled(true);
  } else {
    prev_enabled_ = at::autocast::is_cpu_enabled();
    prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_autocast_cpu_dtype(precision.dtype_);
    at::autocast::set_cpu_enabled(true);
  }
  at::autocast::increment_nesting();
}

Precision::Autocast::~Autocast() {
  if (!active_)
    return;
  if (at::autocast::decrement_nesting() == 0)
    at::autocast::clear_cache();
  if (cuda_) {
    at::autocast::set_enabled(prev_enabled_);
    at::autocast::set_autocast_gpu_dtype(prev_dtype_);
  } else {
    at::autocast::set_cpu_enabled(prev_enabled_);
    at::autocast::set_autocast_cpu_dtype(prev_dtype_);
  }
}

at::Tensor Precision::scale(const at::Tensor& loss) const {
  auto l = loss.scalar_type() == at::kFloat ? loss : loss.to(at::kFloat);
  return scaling_ ? l * scale_ : l;
}

bool Precision::unscale(const std::vector<at::Tensor>& grads, Strategy& strategy) {
  if (!scaling_)
    return true;
  torch::NoGradGuard no_grad;
  bool finite = true;
  for (auto& g : grads) {
    if (!g.defined())
      continue;
    g.mul_(1.0 / scale_);
    if (finite && !torch::isfinite(g).all().item<bool>())
      finite = false;
  }
  // Every rank must skip or take the step together.
  finite = strategy.reduce(finite ? 0.0 : 1.0, ReduceOp::max) == 0.0;
  if (!finite) {
    scale_ /= 2;
    good_steps_ = 0;
  } else if (++good_steps_ >= kGrowthInterval) {
    scale_ *= 2;
    good_steps_ = 0;
  }
  return finite;
}

} // namespace caftrain
