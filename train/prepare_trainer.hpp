// prepare_trainer: checks that a Trainer fits the TorchTrainer worker it runs in.
#pragma once

#include "train/trainer.hpp"

namespace caftrain {

/// Ray's `prepare_trainer`: validates, inside a TorchTrainer worker, that `trainer` is
/// set up for the run: an `ActorEnvironment` among its plugins, a strategy that can
/// synchronise the run's workers, one device per worker, and an accelerator that matches
/// `ScalingConfig.use_gpu`. Throws `Error(invalid_config)` naming the problem and the fix;
/// returns the trainer unchanged otherwise. Outside a run (train_func called directly)
/// it checks the plugin and `devices` only: the trainer then trains alone.
Trainer prepare_trainer(Trainer trainer);

} // namespace caftrain
