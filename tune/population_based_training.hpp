// Population Based Training, Ray Tune's PopulationBasedTraining (asynchronous).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "tune/mutation.hpp"
#include "tune/rng.hpp"
#include "tune/trial_scheduler.hpp"

namespace caftrain::tune {

/// Options of `PopulationBasedTraining`; defaults are Ray's.
struct PopulationBasedTrainingOptions {
  /// Result attribute that measures progress. Default "time_total_s".
  std::string time_attr = "time_total_s";
  /// Metric to compare; "" (default) takes the Tuner's.
  std::string metric = "";
  /// "min" or "max"; "" (default) takes the Tuner's.
  std::string mode = "";
  /// A trial is ranked (and may exploit) once per this much `time_attr`. Default 60; > 0.
  double perturbation_interval = 60.0;
  /// No perturbation before this much `time_attr`. Default 0.
  double burn_in_period = 0.0;
  /// The hyperparameters explore may change, by flat config key ("a/b" for nested).
  /// Keys a trial's config lacks are sampled from their mutation when it is added.
  std::map<std::string, Mutation> hyperparam_mutations = {};
  /// Share of the ranked population in the top and in the bottom quantile. Default 0.25;
  /// 0 to 0.5.
  double quantile_fraction = 0.25;
  /// Chance that explore resamples a value instead of perturbing it. Default 0.25; 0 to 1.
  double resample_probability = 0.25;
  /// Factors a perturbed number is multiplied by, one picked at random. Default {1.2, 0.8}.
  std::vector<double> perturbation_factors = {1.2, 0.8};
  /// Applied to every explored config after the mutations. Default none.
  std::function<Config(Config)> custom_explore_fn = nullptr;
  /// A result without time_attr or the metric is an error (true, default) or CONTINUE.
  bool require_attrs = true;
  /// Seed of the donor choice and explore draws (Ray uses Python's `random`). Default 0.
  uint64_t seed = 0;
};

/// Ray's `_explore`: a copy of `config` with every key of `mutations` changed. A list
/// entry: with `resample_probability`, or when the value is not in the list, a random
/// element; else the left or right neighbour (clamped at the ends). A domain or function:
/// with `resample_probability` a fresh sample, else the value times a random factor of
/// `perturbation_factors`; a value that was an integer stays one (truncated, as `int()`).
/// Throws `Error(invalid_config)` naming the key when the config lacks it or cannot be
/// multiplied.
Config explore(const Config& config, const std::map<std::string, Mutation>& mutations,
               double resample_probability, const std::vector<double>& perturbation_factors,
               Rng& rng);

/// PBT (Jaderberg et al. 2017) as Ray's asynchronous `PopulationBasedTraining`. When a
/// trial's `time_attr` has advanced `perturbation_interval` since its last perturbation,
/// its score is recorded and the live trials with a score are ranked; the top and bottom
/// quantiles hold ceil(n * quantile_fraction) trials each (at most n / 2; none when
/// n <= 1). A top trial records its latest checkpoint (`ResultContext::checkpoint`) as the
/// one others may clone; any other trial forgets its recorded checkpoint. A bottom trial
/// picks a random top trial as donor: if the donor recorded no checkpoint, nothing happens
/// (a trial that never checkpointed is not cloned from); otherwise the answer is PAUSE
/// with an `exploit` command naming the donor, its checkpoint and the explored donor
/// config, and the trial takes over the donor's perturbation time. Any other answer at a
/// perturbation is PAUSE when trials wait (time-sharing, as Ray) and CONTINUE otherwise;
/// between perturbations it is CONTINUE. Waiting trials start least-trained first.
class PopulationBasedTraining : public TrialScheduler {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Throws `Error(invalid_config)` naming a bad option and the fix.
  explicit PopulationBasedTraining(PopulationBasedTrainingOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// The config PBT holds for `trial` (changed by exploits).
  const Config& config_of(const TrialId& trial) const;

  /// Number of exploits so far.
  int64_t num_perturbations() const noexcept {
    return num_perturbations_;
  }

  // -- TrialScheduler ---------------------------------------------------------------

  /// Records the trial and samples the mutated keys its config lacks into it.
  void on_trial_add(const TrialId& trial, Config& config) override;

  /// See the class comment.
  Decision on_trial_result(const TrialId& trial, const Metrics& result,
                           const ResultContext& context) override;

  /// The trial leaves the population.
  void on_trial_complete(const TrialId& trial, const Metrics& result) override;

  /// The trial leaves the population.
  void on_trial_error(const TrialId& trial) override;

  /// The trial leaves the population.
  void on_trial_remove(const TrialId& trial) override;

  /// The startable trial with the least `time_attr` trained (first in order on ties).
  std::optional<TrialId> choose_trial_to_run(const std::vector<TrialInfo>& startable) override;

 private:
  struct State {
    Config config;
    std::optional<double> last_score;
    std::string last_checkpoint;
    double last_perturbation_time = 0;
    double last_train_time = 0;
    bool finished = false;
    int64_t order = 0;
  };

  State& state(const TrialId& trial);

  PopulationBasedTrainingOptions options_;
  Rng rng_;
  std::map<TrialId, State> states_;
  int64_t next_order_ = 0;
  int64_t num_perturbations_ = 0;
};

} // namespace caftrain::tune
