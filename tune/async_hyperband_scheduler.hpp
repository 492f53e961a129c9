// Asynchronous successive halving (ASHA), Ray Tune's AsyncHyperBandScheduler.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tune/rng.hpp"
#include "tune/trial_scheduler.hpp"

namespace caftrain::tune {

/// Options of `AsyncHyperBandScheduler`; defaults are Ray's.
struct AsyncHyperBandOptions {
  /// Result attribute that measures progress; must increase. Default "training_iteration".
  std::string time_attr = "training_iteration";
  /// Metric to compare; "" (default) takes the Tuner's.
  std::string metric = "";
  /// "min" or "max"; "" (default) takes the Tuner's.
  std::string mode = "";
  /// Trials stop when `time_attr` reaches it. Default 100; must be > 0.
  double max_t = 100;
  /// The first rung: no trial stops before this. Default 1; 0 < grace_period <= max_t.
  double grace_period = 1;
  /// Rungs are grace_period * reduction_factor^k; a trial goes on past a rung when it is
  /// in the top 1/reduction_factor there. Default 4; must be > 1.
  double reduction_factor = 4;
  /// Number of brackets, bracket s starting at grace_period * reduction_factor^s.
  /// Default 1; must be >= 1.
  int64_t brackets = 1;
  /// Stop trials at max_t (false lets them go on; rungs then decide once). Default true.
  bool stop_last_trials = true;
  /// Seed of the bracket assignment (Ray draws it with numpy). Default 0.
  uint64_t seed = 0;
};

/// ASHA (Li et al. 2018) exactly as Ray's `AsyncHyperBandScheduler` decides: bracket s
/// has rungs at grace_period * rf^(k+s), k < int(log(max_t / grace_period) / log(rf) - s
/// + 1); each trial joins a bracket drawn with probability softmax(number of rungs). At a
/// result, the highest rung the trial has reached and not yet recorded at compares its
/// score (metric * +1/-1 for max/min) with the cutoff, the (1 - 1/rf) quantile (linear
/// interpolation, NaN ignored, as `np.nanpercentile`) of the scores recorded there so
/// far: below it is STOP. The score is then recorded. Results at or past max_t are STOP
/// when `stop_last_trials`. Results lacking time_attr or the metric are CONTINUE.
class AsyncHyperBandScheduler : public TrialScheduler {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_config)` naming a bad option and the fix.
  explicit AsyncHyperBandScheduler(AsyncHyperBandOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// The milestones of bracket `b`, highest first.
  std::vector<double> milestones(std::size_t b) const;

  /// The bracket trial `trial` was assigned to.
  std::size_t bracket_of(const TrialId& trial) const;

  // -- TrialScheduler ---------------------------------------------------------------

  /// Assigns the trial to a bracket. Throws `Error(invalid_config)` without metric/mode.
  void on_trial_add(const TrialId& trial, Config& config) override;

  /// CONTINUE or STOP, see the class comment.
  Decision on_trial_result(const TrialId& trial, const Metrics& result,
                           const ResultContext& context) override;

  /// Records the final result at its rung (no decision) and forgets the trial.
  void on_trial_complete(const TrialId& trial, const Metrics& result) override;

  /// Forgets the trial.
  void on_trial_remove(const TrialId& trial) override;

 private:
  struct Rung {
    double milestone;
    std::map<TrialId, double> recorded;
  };

  struct Bracket {
    std::vector<Rung> rungs; // highest milestone first
  };

  Decision on_bracket_result(Bracket& b, const TrialId& trial, double cur_iter, double score);

  AsyncHyperBandOptions options_;
  Rng rng_;
  std::vector<Bracket> brackets_;
  std::map<TrialId, std::size_t> trial_info_;
};

/// Ray's alias.
using ASHAScheduler = AsyncHyperBandScheduler;

} // namespace caftrain::tune
