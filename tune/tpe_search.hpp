// Model-based search: the Tree-structured Parzen Estimator, as Optuna's default sampler.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "tune/param_space.hpp"
#include "tune/parzen_estimator.hpp"
#include "tune/rng.hpp"
#include "tune/searcher.hpp"

namespace caftrain::tune {

/// Optuna's `default_gamma`: the number of good trials among `n`, min(ceil(0.1 n), 25).
int64_t default_gamma(int64_t n);

/// Optuna's `default_weights`: `n` ones below 25 observations; beyond, the 25 most
/// recent weigh 1 and the older ones ramp linearly from 1/n up to 1.
std::vector<double> default_weights(int64_t n);

/// Options of `TPESearch`; defaults are those of Optuna's `TPESampler`.
struct TPESearchOptions {
  /// Reported metric to optimise; "" (default) takes the Tuner's.
  std::string metric = "";
  /// "min" or "max"; "" (default) takes the Tuner's.
  std::string mode = "";
  /// Completed trials sampled at random before the model is used. Default 10.
  int64_t n_startup_trials = 10;
  /// Candidates drawn from l(x) per dimension; the one with the largest l(x)/g(x) wins.
  /// Default 24.
  int64_t n_ei_candidates = 24;
  /// Number of good trials among n completed ones. Default `default_gamma`.
  std::function<int64_t(int64_t)> gamma = default_gamma;
  /// Kernel weights of n observations, oldest first. Default `default_weights`.
  std::function<std::vector<double>(int64_t)> weights = default_weights;
  /// Prior and sigma handling of the estimators (Optuna's defaults).
  ParzenOptions parzen = {};
  /// Seed of the sampler. Default 0.
  uint64_t seed = 0;
};

/// TPE (Bergstra et al. 2011) with the semantics of Optuna's default `TPESampler`
/// (univariate): until `n_startup_trials` trials have completed, configs are sampled from
/// the space itself; then, per dimension independently, completed trials are sorted by
/// their score and split into the best `gamma(n)` ("below") and the rest ("above"), a
/// Parzen estimator with a prior is fitted to each (l and g), `n_ei_candidates` values are
/// drawn from l and the one maximising log l(x) - log g(x) is chosen. Handles float, log,
/// integer, quantized and categorical dimensions; `sample_from` values are resolved after
/// the searched ones and constants pass through. Failed trials and trials without the
/// metric are not observations (Optuna's FAIL state); running trials are ignored.
class TPESearch : public Searcher {
 public:
  // -- constructors -----------------------------------------------------------------

  /// A search over `space` (or the Tuner's, via `set_search_properties`, when empty).
  /// Throws `Error(invalid_config)` for dimensions TPE cannot model (grid_search,
  /// randn) and bad options.
  explicit TPESearch(ParamSpace space = {}, TPESearchOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// Trials that completed with the metric (the observations).
  std::size_t num_observations() const noexcept {
    return observations_.size();
  }

  // -- Searcher ---------------------------------------------------------------------

  /// Adopts the Tuner's metric, mode and space where the options left them empty.
  bool set_search_properties(const std::string& metric, const std::string& mode,
                             const ParamSpace& space) override;

  /// A random config during startup, then TPE's choice. Throws `Error(invalid_config)`
  /// when metric or mode is still unset.
  Suggestion suggest(const TrialId& trial_id) override;

  /// Records the trial's final `metric` as an observation unless it failed.
  void on_trial_complete(const TrialId& trial_id, const Metrics& result, bool error) override;

 private:
  struct Observation {
    int64_t number;
    double loss;
    std::map<std::string, double> values;
  };

  void build_dimensions();
  double sample_dimension(const std::string& key, const ParzenDimension& dim);

  ParamSpace space_;
  TPESearchOptions options_;
  Rng rng_;
  std::map<std::string, ParzenDimension> dims_;
  std::map<TrialId, std::pair<int64_t, Config>> live_;
  std::vector<Observation> observations_;
  int64_t next_number_ = 0;
};

} // namespace caftrain::tune
