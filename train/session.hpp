// The worker-side session of a TorchTrainer run: report, get_checkpoint, get_context.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "core/config.hpp"
#include "environment/worker_context.hpp"

namespace caftrain {

namespace train {

/// Optional arguments of `train::report` (Ray's `train.report` keywords).
struct ReportArgs {
  /// Name of the checkpoint's directory in the run directory (a plain name, e.g.
  /// "epoch_3"); "" (default) names it checkpoint_<report index, 6 digits>. A name that is
  /// taken fails the run with `Error(invalid_config)`; the existing checkpoint stays.
  std::string checkpoint_dir_name = "";
};

} // namespace train

/// What a training thread can ask of the run it belongs to. The actor layer implements
/// it; `train::report` and friends reach it through the thread's current worker.
class Session : public WorkerRuntime {
 public:
  /// Reports `metrics` (and optionally this rank's checkpoint directory); returns once the
  /// report is complete on every rank and its checkpoint is persisted.
  virtual void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint,
                      const train::ReportArgs& args) = 0;

  /// Writes `files` (this rank's part of a checkpoint snapshot, possibly none) into a
  /// staging directory of the run and reports them with `metrics`. With `wait` false the
  /// serialization, the write and the report run on a background thread, one at a time
  /// and in order, and training goes on (the report still counts only once the checkpoint
  /// is durable); a failure of it surfaces at the next report or when train_func returns.
  virtual void report_snapshot(const Metrics& metrics, CheckpointFiles files, bool wait) = 0;

  /// Waits for background reports; rethrows the failure of one.
  virtual void flush() = 0;

  /// The checkpoint of this attempt's latest completed report that carried one, else the
  /// checkpoint the attempt started from, if any.
  virtual std::optional<Checkpoint> latest_checkpoint() const = 0;

  /// The run's train_loop_config.
  virtual const Config& config() const = 0;
};

namespace train {

/// Reports metrics, and optionally a checkpoint directory this rank wrote, to the run
/// (Ray's `train.report`). A synchronisation point: every rank reports the same number
/// of times; the call returns once all ranks reported and the checkpoint is persisted
/// (under `args.checkpoint_dir_name` when given). Throws `Error(cancelled)` or
/// `Error(worker_failed)` when the run stops meanwhile. Outside a TorchTrainer run (the
/// train function called directly) it does nothing but warn, once per process.
void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint = std::nullopt,
            const ReportArgs& args = {});

/// The run's latest persisted checkpoint as this worker knows it (Ray's
/// `train.get_checkpoint`): the one the last report of this attempt persisted, else the
/// one the attempt started from (after a failure, or when the run was resumed), else
/// nothing. Nothing outside a run.
std::optional<Checkpoint> get_checkpoint();

/// This worker's ranks, sizes, device and run (Ray's `train.get_context`); outside a run,
/// rank 0 of a world of 1 on "cpu", with no run name or directory.
const WorkerContext& get_context();

/// True inside a TorchTrainer worker.
bool in_session() noexcept;

/// The current session; throws `Error(invalid_config)` outside a worker (the functions
/// above work outside one too).
Session& session();

} // namespace train
} // namespace caftrain
