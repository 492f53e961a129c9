// TorchTrainer: runs a train function on N workers; the blocking façade over the trainer actor.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "actors/result.hpp"
#include "actors/run_config.hpp"

namespace caftrain {

struct RunSpec;

/// Ray's TorchTrainer: runs `train_func` on `scaling.num_workers` workers (threads of this
/// process, each with its own rank, device and intra-op thread count), joined by a gloo
/// communicator, supervised by a trainer actor that collects reports, persists
/// checkpoints and restarts the group after failures.
///
/// `fit()` blocks until the run ends. An actor-based service calls `start()` instead and
/// talks to the returned trainer actor by messages (see actors/messages.hpp): subscribe
/// to receive every `ReportRecord` and the final `(done_atom, Result)`, ask `status_atom`,
/// send `cancel_atom`.
class TorchTrainer {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Checks the options and the machine; throws `Error(invalid_config)` or
  /// `Error(unavailable)` naming the problem before anything starts.
  ///
  /// When `<storage_path>/<name>` holds a run of that name already, the new trainer
  /// resumes it (Ray's behaviour) and says so in the log: the run's kept checkpoints and
  /// history are adopted, the first attempt starts from its latest checkpoint, attempts
  /// keep counting, and the options given here apply (a warning lists those that differ
  /// from the stored run.json, which then records the new ones). A directory there that
  /// holds no run (no run.json) is refused with `Error(invalid_config)`, one whose
  /// run.json is not valid with `Error(corrupt_checkpoint)`, each naming it.
  TorchTrainer(caf::actor_system& system, TrainFunc train_func, TorchTrainerOptions options = {});

  /// For a train function that takes no config.
  TorchTrainer(caf::actor_system& system, std::function<void()> train_func,
               TorchTrainerOptions options = {});

  ~TorchTrainer();
  TorchTrainer(TorchTrainer&&) noexcept;
  TorchTrainer& operator=(TorchTrainer&&) noexcept;

  /// Continues the run stored at `path` (a run directory of an earlier process) from its
  /// latest checkpoint; the options are those the run was started with, except `run`
  /// callbacks and timeouts given here. Throws `Error(invalid_config)` when
  /// `can_restore(path)` is false.
  static TorchTrainer restore(caf::actor_system& system, const std::string& path,
                              TrainFunc train_func, TorchTrainerOptions overrides = {});

  /// True when `path` holds a run that `restore` can continue.
  static bool can_restore(const std::string& path);

  // -- running ----------------------------------------------------------------------

  /// Runs to the end and returns the result (errors are in `Result::error`). The trainer
  /// actor ends with its run; calling fit again returns the same result, and fit after
  /// `start()` returns it even when the run ended meanwhile (read back with
  /// `Result::from_path`).
  Result fit();

  /// Starts the run without waiting; returns the trainer actor.
  caf::actor start();

  /// The trainer actor (spawned by the constructor, started by `start` or `fit`).
  const caf::actor& actor() const noexcept;

  // -- properties -------------------------------------------------------------------

  /// The run directory (`<storage_path>/<name>`).
  const std::string& path() const;

  /// The resolved run name.
  const std::string& name() const;

 private:
  TorchTrainer(caf::actor_system& system, std::shared_ptr<RunSpec> spec);

  caf::actor_system* system_;
  std::shared_ptr<RunSpec> spec_;
  caf::actor actor_;
  std::optional<Result> result_;
};

/// Checks `options` as the TorchTrainer constructor does (exposed for tests and tools).
/// With `this_machine` (default) CPU and GPU requests are checked against this machine;
/// a run placed on a cluster (see actors/cluster.hpp) leaves that to the cluster's pool.
void validate(const TorchTrainerOptions& options, bool this_machine = true);

/// The backend "auto" stands for with these options: "local" for CPU workers of this
/// process, "nccl" for GPU workers; any other choice is returned as given.
std::string resolve_backend(const TorchTrainerOptions& options);

} // namespace caftrain
