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

/// What a training thread can ask of the run it belongs to. The actor layer implements
/// it; `train::report` and friends reach it through the thread's current worker.
class Session : public WorkerRuntime {
 public:
  /// Reports `metrics` (and optionally this rank's checkpoint directory); returns once the
  /// report is complete on every rank and its checkpoint is persisted.
  virtual void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint) = 0;

  /// Writes `files` (name -> bytes: this rank's part of a checkpoint, possibly none) into
  /// a staging directory of the run and reports them with `metrics`. With `wait` false
  /// the write and the report run on a background thread, one at a time and in order, and
  /// training goes on (the report still counts only once the checkpoint is durable); a
  /// failure of it surfaces at the next report or when train_func returns.
  virtual void report_snapshot(const Metrics& metrics, std::map<std::string, std::vector<char>> files,
                               bool wait) = 0;

  /// Waits for background reports; rethrows the failure of one.
  virtual void flush() = 0;

  /// The checkpoint this attempt started from, if any.
  virtual std::optional<Checkpoint> latest_checkpoint() const = 0;

  /// The run's train_loop_config.
  virtual const Config& config() const = 0;
};

namespace train {

/// Reports metrics, and optionally a checkpoint directory this rank wrote, to the run
/// (Ray's `train.report`). A synchronisation point: every rank reports the same number
/// of times; the call returns once all ranks reported and the checkpoint is persisted.
/// Throws `Error(invalid_config)` outside a TorchTrainer worker, and `Error(cancelled)` or
/// `Error(worker_failed)` when the run stops meanwhile.
void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint = std::nullopt);

/// The latest persisted checkpoint the run restarted from (after a failure, or when the
/// run was restored), or nothing on a fresh start (Ray's `train.get_checkpoint`).
std::optional<Checkpoint> get_checkpoint();

/// This worker's ranks, sizes, device and run (Ray's `train.get_context`).
const WorkerContext& get_context();

/// True inside a TorchTrainer worker.
bool in_session() noexcept;

/// The current session; throws `Error(invalid_config)` outside a worker.
Session& session();

} // namespace train
} // namespace caftrain
