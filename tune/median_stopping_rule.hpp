// The median stopping rule of Google Vizier, Ray Tune's MedianStoppingRule.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tune/trial_scheduler.hpp"

namespace caftrain::tune {

/// Options of `MedianStoppingRule`; defaults are Ray's.
struct MedianStoppingRuleOptions {
  /// Result attribute that measures progress. Default "time_total_s".
  std::string time_attr = "time_total_s";
  /// Metric to compare; "" (default) takes the Tuner's.
  std::string metric = "";
  /// "min" or "max"; "" (default) takes the Tuner's.
  std::string mode = "";
  /// No trial stops before this; running means start here. Default 60.
  double grace_period = 60.0;
  /// Other trials needed at a time before the median is trusted. Default 3.
  int64_t min_samples_required = 3;
  /// Without enough samples, a trial yields (PAUSE) to waiting trials at most once per
  /// this much time. Default 0.
  double min_time_slice = 0;
  /// STOP a trial below the median (true, default) or PAUSE it (false): a paused trial
  /// resumes FIFO when resources free up and is never judged again.
  bool hard_stop = true;
};

/// Ray's `MedianStoppingRule`: at a result at time t >= grace_period, the trial's best
/// score so far is compared with the median, over the other trials whose latest result
/// is at t or later, of their running means of the metric over results in
/// [grace_period, t]. Strictly worse than the median is STOP (or PAUSE without
/// `hard_stop`); equal or better is CONTINUE. With fewer than `min_samples_required` such
/// trials it is CONTINUE, or PAUSE when trials wait and `min_time_slice` has passed since
/// the trial last yielded. Results lacking time_attr or the metric are CONTINUE.
class MedianStoppingRule : public TrialScheduler {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_config)` for min_samples_required < 1.
  explicit MedianStoppingRule(MedianStoppingRuleOptions options = {});

  // -- TrialScheduler ---------------------------------------------------------------

  /// Throws `Error(invalid_config)` without metric/mode.
  void on_trial_add(const TrialId& trial, Config& config) override;

  /// See the class comment.
  Decision on_trial_result(const TrialId& trial, const Metrics& result,
                           const ResultContext& context) override;

  /// Records the final result.
  void on_trial_complete(const TrialId& trial, const Metrics& result) override;

 private:
  double running_mean(const TrialId& trial, double time) const;
  double best_result(const TrialId& trial) const;

  MedianStoppingRuleOptions options_;
  std::set<TrialId> stopped_;
  std::map<TrialId, double> last_pause_;
  std::map<TrialId, std::vector<Metrics>> results_;
};

} // namespace caftrain::tune
