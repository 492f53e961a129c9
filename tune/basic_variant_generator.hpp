// Random and grid search: Ray Tune's default search algorithm.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tune/param_space.hpp"
#include "tune/rng.hpp"
#include "tune/searcher.hpp"

namespace caftrain::tune {

/// Options of `BasicVariantGenerator`.
struct BasicVariantGeneratorOptions {
  /// Trials per grid point (Ray's `num_samples`); -1 repeats the grid forever (the Tuner's
  /// `time_budget_s` or stopper ends the experiment). Default 1; 0 or < -1 is an error.
  int64_t num_samples = 1;
  /// Seed of the generator that samples the random dimensions (Ray's `random_state`).
  /// Default 0.
  uint64_t seed = 0;
};

/// Ray's `BasicVariantGenerator`: the grid axes (`grid_search`) are crossed, the first
/// axis in key order varying fastest; the whole grid is repeated `num_samples` times, and
/// every trial samples the random dimensions anew. Trial k gets grid point
/// `k % grid_size` of repetition `k / grid_size`; after `num_samples * grid_size` trials
/// `suggest` answers `finished`. Without grid axes it is random search.
class BasicVariantGenerator : public Searcher {
 public:
  // -- constructors -----------------------------------------------------------------

  /// A generator over `space`; an empty space is taken from the Tuner's param space via
  /// `set_search_properties`. Throws `Error(invalid_config)` for a bad `num_samples`.
  explicit BasicVariantGenerator(ParamSpace space = {}, BasicVariantGeneratorOptions options = {});

  // -- properties -------------------------------------------------------------------

  /// Number of grid points (1 without grid axes).
  int64_t grid_size() const;

  /// Trials it will suggest in all: `num_samples * grid_size()`, or -1 for unlimited.
  int64_t total_trials() const;

  // -- Searcher ---------------------------------------------------------------------

  /// Adopts `space` when built without one; metric and mode are not used.
  bool set_search_properties(const std::string& metric, const std::string& mode,
                             const ParamSpace& space) override;

  /// The next variant, or `finished` after `total_trials()`.
  Suggestion suggest(const TrialId& trial_id) override;

  /// Nothing to learn.
  void on_trial_complete(const TrialId& trial_id, const Metrics& result, bool error) override;

 private:
  ParamSpace space_;
  BasicVariantGeneratorOptions options_;
  Rng rng_;
  int64_t next_ = 0;
};

} // namespace caftrain::tune
