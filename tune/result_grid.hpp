// ResultGrid: what a Tuner's experiment tells its caller (Ray's `tune.ResultGrid`).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "actors/result.hpp"
#include "core/config.hpp"
#include "tune/fwd.hpp"

namespace caftrain::tune {

/// One trial's outcome: its run's `Result` (metrics, history, checkpoints, error) plus
/// what Tune adds, so that `grid.get_best_result().config` reads as in Ray.
struct TrialResult : Result {
  /// The trial's id (Ray's `trial_id`), also the name of its run directory.
  TrialId trial_id;
  /// The trial's config (flat keys, as its train function received it).
  Config config;
  /// "TERMINATED", "ERROR", "PAUSED" or "PENDING" (a trial the experiment never ran,
  /// e.g. after `time_budget_s`), as Ray's trial status.
  std::string status = "PENDING";
};

/// The trials of an experiment in creation order, with Ray's queries over them.
class ResultGrid {
 public:
  /// What iterating yields (also what CAF's type traits look for in a range).
  using value_type = TrialResult;

  // -- constructors -----------------------------------------------------------------

  ResultGrid() = default;

  /// A grid over `results`; `metric` and `mode` are the TuneConfig's (defaults of
  /// `get_best_result`, may be empty).
  ResultGrid(std::string experiment_path, std::vector<TrialResult> results, std::string metric,
             std::string mode, std::optional<RunError> error = std::nullopt);

  // -- queries ------------------------------------------------------------------------

  /// The trial whose `metric` is best (Ray's `get_best_result`): `mode` "min" or "max";
  /// `scope` "last" (the last report, default), "avg" (mean of every report), "last-5-avg",
  /// "last-10-avg" (mean of the last 5 or 10) or "all" (best report of the trial). Trials
  /// whose value is NaN or infinite are skipped (`filter_nan_and_inf`). An empty metric or
  /// mode takes the TuneConfig's. Throws `Error(invalid_argument)` when neither names
  /// one, for an unknown mode or scope, and when no trial reported the metric (listing the
  /// metrics they did report).
  const TrialResult& get_best_result(std::string metric = "", std::string mode = "",
                                     const std::string& scope = "last",
                                     bool filter_nan_and_inf = true) const;

  /// The errors of the trials that failed for good, in trial order (Ray's `errors`).
  std::vector<RunError> errors() const;

  /// Trials that failed for good (Ray's `num_errors`).
  std::size_t num_errors() const;

  /// Trials that ended without an error (Ray's `num_terminated`).
  std::size_t num_terminated() const;

  /// The table of Ray's `get_dataframe()` as CSV text: one row per trial with its id,
  /// status, iterations, each config key as `config/<key>`, and for every reported metric
  /// its last value, `min/<metric>` and `max/<metric>` over the history; empty cells where
  /// a trial lacks one. Also written to `<experiment>/results.csv` at the end.
  std::string to_csv() const;

  // -- properties -----------------------------------------------------------------------

  /// Number of trials.
  std::size_t size() const noexcept {
    return results_.size();
  }

  bool empty() const noexcept {
    return results_.empty();
  }

  /// Trial `i` (creation order).
  const TrialResult& operator[](std::size_t i) const;

  std::vector<TrialResult>::const_iterator begin() const noexcept {
    return results_.begin();
  }

  std::vector<TrialResult>::const_iterator end() const noexcept {
    return results_.end();
  }

  /// The experiment directory (Ray's `experiment_path`).
  const std::string& experiment_path() const noexcept {
    return experiment_path_;
  }

  /// Set when the experiment itself failed (its trials could never be placed, a bad
  /// option) or was cancelled; trial failures are in each trial's `error`.
  const std::optional<RunError>& error() const noexcept {
    return error_;
  }

  /// The TuneConfig's metric and mode.
  const std::string& metric() const noexcept {
    return metric_;
  }

  const std::string& mode() const noexcept {
    return mode_;
  }

  /// For message inspection.
  template <class Inspector>
  friend typename Inspector::result_type inspect(Inspector& f, ResultGrid& x);

 private:
  std::string experiment_path_;
  std::vector<TrialResult> results_;
  std::string metric_;
  std::string mode_;
  std::optional<RunError> error_;
};

/// The value of `metric` for `trial` under `scope` (see `get_best_result`), or nothing
/// when the trial never reported it.
std::optional<double> scoped_metric(const TrialResult& trial, const std::string& metric,
                                    const std::string& mode, const std::string& scope);

} // namespace caftrain::tune
