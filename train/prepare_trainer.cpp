#include "train/prepare_trainer.hpp"

#include "core/error.hpp"
#include "train/session.hpp"

namespace caftrain {

namespace {

[[noreturn]] void refuse(const std::string& what) {
  throw Error(Errc::invalid_config, "prepare_trainer: " + what);
}

} // namespace

Trainer prepare_trainer(Trainer trainer) {
  auto& ctx = train::get_context();
  auto& o = trainer.options();
  const ClusterEnvironment* env = nullptr;
  for (auto& plugin : o.plugins)
    if (!env)
      env = plugin.get();
  if (!env || !env->managed_by_actors())
    refuse(std::string(env ? "the cluster environment is " + env->name() + "; "
                           : "no cluster environment plugin is given; ") +
           "add `.plugins = {caftrain::ActorEnvironment()}` to the Trainer options");
  auto& strategy = o.strategy;
  if (ctx.world_size > 1) {
    bool distributed = strategy.instance() ? strategy.instance()->is_distributed()
                                           : strategy.name() != "single_device";
    if (!distributed)
      refuse("strategy '" + strategy.name() + "' trains on one device but the run has " +
             std::to_string(ctx.world_size) +
             " workers; use DDPStrategy(), ZeroStrategy() or FSDPStrategy()");
  }
  if (o.devices != "auto" && o.devices != "1" && o.devices != "-1")
    refuse("devices = \"" + o.devices + "\": each worker drives one device; use \"auto\" and "
                                       "set ScalingConfig.num_workers");
  if (!train::in_session())
    return trainer; // training alone: the Trainer picks its device from the accelerator
  bool gpu_worker = ctx.device.rfind("cuda", 0) == 0;
  if ((o.accelerator == "gpu" || o.accelerator == "cuda") && !gpu_worker)
    refuse("accelerator = \"" + o.accelerator +
           "\" but the run's workers have no GPU; set ScalingConfig.use_gpu = true or use "
           "accelerator = \"auto\"");
  if (o.precision == "16-mixed" && !gpu_worker)
    refuse("precision = \"16-mixed\" needs GPU workers; use \"bf16-mixed\" on CPU");
  return trainer;
}

} // namespace caftrain
