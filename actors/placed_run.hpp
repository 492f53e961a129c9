// A TorchTrainer run on bundles its caller placed: how a Tuner runs each trial.
#pragma once

#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "actors/resource_pool.hpp"
#include "actors/run_config.hpp"

namespace caftrain {

/// The trainer actor of a run made by `spawn_placed_run`, with its name and directory.
struct PlacedRun {
  caf::actor actor;
  std::string name;
  std::string dir;
};

/// Makes a run as the TorchTrainer constructor does (checks the options, prepares or
/// resumes `<storage_path>/<name>`, writes run.json; the same errors) and spawns its
/// trainer actor, not started yet. The run trains on `placement`, which the caller got
/// from the system's pool (`local_pool`) for `options.scaling.worker_bundles()` and
/// releases once the run has ended (its `done_atom`); each worker uses its bundle's CPUs
/// as intra-op threads unless `resources_per_worker.cpus` says otherwise. A
/// `resume_from_checkpoint` given here wins over the run's own latest checkpoint (when it
/// is resumed by name) until the run checkpoints anew: how a PBT exploit restarts a trial
/// from its donor's checkpoint. The caller
/// joins the run's threads after the end with `join_worker_threads(name, ...)`. With
/// worker processes (`worker_mode` "process"), `job` is the caller's number among the
/// program's process-mode jobs (`detail::next_job`): what the worker processes run up to.
PlacedRun spawn_placed_run(caf::actor_system& system, TrainFunc train_func,
                           TorchTrainerOptions options, Placement placement, int64_t job = -1);

} // namespace caftrain
