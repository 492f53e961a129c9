// Result, ReportRecord and RunStatus: what a TorchTrainer run tells its caller.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "core/config.hpp"
#include "core/error.hpp"

namespace caftrain {

/// Why a run (or an attempt) failed.
struct RunError {
  /// Kind of failure.
  Errc code = Errc::none;
  /// The message, naming the rank and what it threw.
  std::string message;
  /// The failing rank, or -1 when not one rank's fault.
  int64_t rank = -1;
  /// The attempt that failed.
  int64_t attempt = 0;

  /// An `Error` with the same code and message.
  Error to_error() const {
    return Error(code, message);
  }
};

/// One completed report of a run: rank 0's metrics plus every rank's.
struct ReportRecord {
  /// Run name.
  std::string run;
  /// 0-based index of the report over the run (Ray's training_iteration - 1).
  int64_t index = 0;
  /// Attempt that produced it.
  int64_t attempt = 0;
  /// Rank 0's metrics.
  Metrics metrics;
  /// Every rank's metrics, by rank.
  std::vector<Metrics> all_metrics;
  /// The persisted checkpoint of this report, or "".
  std::string checkpoint_path;
  /// Seconds since the epoch when it completed.
  double timestamp = 0;
};

/// The outcome of a run (Ray's Result).
struct Result {
  // -- reading a run from disk ---------------------------------------------------------

  /// The Result of the run stored in `path` (a run directory), as a later process sees
  /// it (Ray's `Result.from_path`): metrics and history (with attempts) from result.json
  /// or, for a run that never ended (its process died, or it still runs), from
  /// history.jsonl; the checkpoints on disk, best first by the run's CheckpointConfig;
  /// the error of a failed or cancelled run. A run that never ended has
  /// `error->code == Errc::bad_state` saying so. Throws `Error(invalid_config)` naming
  /// `path` when it is missing or holds no run, `Error(corrupt_checkpoint)` when its
  /// run.json is not valid.
  static Result from_path(const std::string& path);

  // -- queries ------------------------------------------------------------------------

  /// The kept checkpoint (of `best_checkpoints`) whose `metric` is best, `mode` "max" or
  /// "min" (Ray's `Result.get_best_checkpoint`); a NaN value is the worst, never best.
  /// Nothing when no checkpoint is kept, or when every kept one has NaN for `metric`.
  /// Throws `Error(invalid_argument)` for an unknown mode, and for a metric that no kept
  /// checkpoint carries, listing those that exist.
  std::optional<Checkpoint> get_best_checkpoint(const std::string& metric,
                                                const std::string& mode) const;

  // -- fields ---------------------------------------------------------------------------

  /// Rank 0's metrics of the last report.
  Metrics metrics;
  /// Every report in order (each index once; reports of a failed attempt after its
  /// last checkpoint are replaced by the attempt that redid them).
  std::vector<ReportRecord> metrics_history;
  /// The latest persisted checkpoint.
  std::optional<Checkpoint> checkpoint;
  /// The checkpoints kept by the CheckpointConfig, best first, with their metrics.
  std::vector<std::pair<Checkpoint, Metrics>> best_checkpoints;
  /// The run directory.
  std::string path;
  /// Set when the run failed (after max_failures) or was cancelled.
  std::optional<RunError> error;
  /// Attempts started (1 + restarts; a restored run counts those of the earlier process).
  int64_t attempts = 0;

  /// True when the run finished without an error.
  bool ok() const noexcept {
    return !error.has_value();
  }
};

/// A snapshot of a run for `status` queries and `RunCallback::on_state`.
struct RunStatus {
  /// Where the run stands (Ray Train's run states):
  ///  - "pending": not started yet (waiting for resources when `waiting_reason` says so);
  ///  - "running": an attempt trains;
  ///  - "stopping": the attempt's workers are being stopped (after a failure, a cancel or
  ///    the stop criteria), before the run decides what follows;
  ///  - "restarting": a failure will be retried; the next attempt starts ("running");
  ///  - "finished": ended without an error (train_func returned, or stop criteria);
  ///  - "errored": ended by a failure that is not retried (Result.error);
  ///  - "aborted": ended by a cancel.
  /// A failed attempt goes running -> stopping -> restarting -> running when retried and
  /// running -> stopping -> errored when not; "errored", "finished" and "aborted" are final.
  std::string state = "pending";
  /// Every state the run has been in, in order ("pending" first); the last is `state`.
  std::vector<std::string> states = {"pending"};
  /// While pending: why the resource pool cannot place the workers yet, naming what
  /// holds the resources; "" otherwise.
  std::string waiting_reason;
  /// The current attempt (0-based).
  int64_t attempt = 0;
  /// Failures so far.
  int64_t failures = 0;
  /// Completed reports.
  int64_t reports = 0;
  /// Rank 0's metrics of the last report.
  Metrics latest;
  /// The run directory.
  std::string path;
};

} // namespace caftrain
