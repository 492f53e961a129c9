// A searcher wrapper that caps how many of its trials run at once.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>

#include "tune/searcher.hpp"

namespace caftrain::tune {

/// Ray's `ConcurrencyLimiter(searcher, max_concurrent)`: `suggest` answers `wait` while
/// `max_concurrent` of its suggested trials are live, and forwards results and
/// completions of those trials only (others were not suggested by it).
class ConcurrencyLimiter : public Searcher {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Wraps `searcher`; throws `Error(invalid_config)` when it is null or
  /// `max_concurrent` < 1.
  ConcurrencyLimiter(std::unique_ptr<Searcher> searcher, int64_t max_concurrent);

  // -- properties -------------------------------------------------------------------

  /// Trials suggested and not yet complete.
  const std::set<TrialId>& live_trials() const noexcept {
    return live_;
  }

  /// The wrapped searcher.
  Searcher& searcher() noexcept {
    return *searcher_;
  }

  // -- Searcher ---------------------------------------------------------------------

  /// Forwards to the wrapped searcher.
  bool set_search_properties(const std::string& metric, const std::string& mode,
                             const ParamSpace& space) override;

  /// `wait` at the limit, else the wrapped searcher's answer (a `ready` one counts as live).
  Suggestion suggest(const TrialId& trial_id) override;

  /// Forwards results of live trials.
  void on_trial_result(const TrialId& trial_id, const Metrics& result) override;

  /// Forwards and frees the trial's slot; ignores trials it did not suggest.
  void on_trial_complete(const TrialId& trial_id, const Metrics& result, bool error) override;

 private:
  std::unique_ptr<Searcher> searcher_;
  int64_t max_concurrent_;
  std::set<TrialId> live_;
};

} // namespace caftrain::tune
