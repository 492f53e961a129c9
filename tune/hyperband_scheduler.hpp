// Synchronous HyperBand, Ray Tune's HyperBandScheduler.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "tune/trial_scheduler.hpp"

namespace caftrain::tune {

/// Options of `HyperBandScheduler`; defaults are Ray's.
struct HyperBandOptions {
  /// Result attribute that measures progress; must increase. Default "training_iteration".
  std::string time_attr = "training_iteration";
  /// Metric to compare; "" (default) takes the Tuner's.
  std::string metric = "";
  /// "min" or "max"; "" (default) takes the Tuner's.
  std::string mode = "";
  /// Longest a trial runs, in `time_attr` units. Default 81; must be > 0.
  double max_t = 81;
  /// eta: each halving keeps 1/eta of a bracket. Default 3; must be > 1.
  double reduction_factor = 3;
  /// Stop the last trials of a bracket when it is done (false: they run on). Default true.
  bool stop_last_trials = true;
};

/// HyperBand (Li et al. 2017) exactly as Ray's `HyperBandScheduler` runs it. With
/// s_max_1 = round(log(max_t) / log(eta)) + 1, a band holds s_max_1 brackets, filled in
/// the order trials are added, s = 0, 1, ...: bracket s takes n0 = ceil(s_max_1 / (s + 1)
/// * eta^s) trials, runs them to r0 = int(max_t * eta^-s) and halves s times. A trial that
/// reaches the bracket's milestone gets PAUSE until every live trial of its bracket has;
/// the last one to arrive triggers the halving: the bracket keeps ceil(n / eta) trials with
/// the best last scores, its milestone becomes int(min(r * eta, max_t - milestone)) (Ray's
/// arithmetic: the new milestone replaces, not adds to, the old one), the others are
/// stopped. The arriving trial gets CONTINUE or STOP, the other survivors a `resume`
/// command, the other losers a `stop` command. A bracket with no halvings left is done:
/// its paused trials get `stop` and the arriving one STOP (unless `stop_last_trials` is
/// false). Waiting trials start by bracket completion, least complete first.
class HyperBandScheduler : public TrialScheduler {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_config)` for max_t <= 0 or reduction_factor <= 1.
  explicit HyperBandScheduler(HyperBandOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// Brackets per band, s_max_1.
  int64_t brackets_per_band() const noexcept {
    return s_max_1_;
  }

  /// (band, s) of the bracket holding `trial`.
  std::pair<std::size_t, int64_t> bracket_of(const TrialId& trial) const;

  /// Trial capacity n0 and first milestone r0 of a bracket with index s.
  std::pair<int64_t, int64_t> bracket_size(int64_t s) const;

  /// The current milestone (Ray's `_cumul_r`) of the bracket holding `trial`.
  double milestone_of(const TrialId& trial) const;

  // -- TrialScheduler ---------------------------------------------------------------

  /// Puts the trial into the current bracket, opening the next bracket or band when full.
  void on_trial_add(const TrialId& trial, Config& config) override;

  /// CONTINUE below the milestone, else PAUSE, or the halving's verdict (class comment).
  Decision on_trial_result(const TrialId& trial, const Metrics& result,
                           const ResultContext& context) override;

  /// Drops the trial from its bracket; may complete a halving (commands follow).
  void on_trial_complete(const TrialId& trial, const Metrics& result) override;

  /// As `on_trial_complete`.
  void on_trial_error(const TrialId& trial) override;

  /// As `on_trial_complete`.
  void on_trial_remove(const TrialId& trial) override;

  /// The first PENDING trial of the least complete bracket, band by band; never a PAUSED
  /// one (those resume only by `resume` commands).
  std::optional<TrialId> choose_trial_to_run(const std::vector<TrialInfo>& startable) override;

 private:
  struct Bracket {
    std::vector<TrialId> live; // in the order added
    std::map<TrialId, std::optional<Metrics>> results;
    int64_t n;
    double r;
    double cumul_r;
    int64_t halves;
    double total_work;
    double completed_progress = 0;

    bool filled() const;
    bool cur_iter_done(const std::string& time_attr) const;
    bool finished(bool stop_last_trials, const std::string& time_attr) const;
    bool continue_trial(const TrialId& trial, bool stop_last_trials,
                        const std::string& time_attr) const;
    double completion_percentage(bool stop_last_trials, const std::string& time_attr) const;
    void cleanup(const TrialId& trial);
  };

  Bracket& bracket(const TrialId& trial);
  Decision process_bracket(Bracket& b, const TrialId* reporter);
  void stop_paused(const TrialId& trial, Bracket& b);

  HyperBandOptions options_;
  int64_t s_max_1_;
  std::vector<Bracket> brackets_;
  std::vector<std::vector<std::optional<std::size_t>>> bands_;
  std::optional<std::size_t> current_;
  std::map<TrialId, std::pair<std::size_t, std::size_t>> trial_info_; // bracket, band
  std::set<TrialId> paused_;
};

} // namespace caftrain::tune
