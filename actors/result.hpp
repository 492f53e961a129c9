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

  bool ok() const noexcept {
    return !error.has_value();
  }
};

/// A snapshot of a run for `status` queries.
struct RunStatus {
  /// "pending", "running", "restarting", "finished", "failed" or "cancelled".
  std::string state = "pending";
  int64_t attempt = 0;
  int64_t failures = 0;
  /// Completed reports.
  int64_t reports = 0;
  /// Rank 0's metrics of the last report.
  Metrics latest;
  std::string path;
};

} // namespace caftrain
