// The interface of Tune's search algorithms (Ray's `tune.search.Searcher`).
#pragma once

#include <cstdint>
#include <string>

#include "core/config.hpp"
#include "tune/fwd.hpp"

namespace caftrain::tune {

/// What `Searcher::suggest` answers: a config for the trial, nothing yet, or nothing ever.
struct Suggestion {
  /// Whether `config` holds a suggestion.
  enum class Status : uint8_t {
    /// `config` is the trial's config: start it.
    ready,
    /// Nothing now (Ray's `None`), e.g. a concurrency limit: ask again after a trial ends.
    wait,
    /// The searcher is exhausted (Ray's `Searcher.FINISHED`): create no more trials.
    finished,
  };

  /// Whether `config` holds a suggestion. Default `wait`.
  Status status = Status::wait;
  /// The suggested config (flat keys, see `ParamSpace`) when `status` is `ready`.
  Config config = {};
};

/// A search algorithm (Ray's `Searcher`): suggests a config per trial id and learns from
/// the results. The runner's protocol, one trial at a time in the runner's own thread:
///   1. before the first trial, `set_search_properties(metric, mode, param_space)` with the
///      Tuner's values; when it returns false the searcher already had a different metric,
///      mode or space and the Tuner must refuse to start (Ray raises the same);
///   2. while fewer than `num_samples` trials exist (searchers other than
///      `BasicVariantGenerator` never finish by themselves) and resources allow, make a new
///      trial id and call `suggest(id)`: `ready` starts a trial with that config, `wait`
///      means try again after the next `on_trial_complete`, `finished` ends trial creation;
///   3. every reported result goes to `on_trial_result(id, metrics)`;
///   4. when a trial ends, `on_trial_complete(id, last_metrics, error)` exactly once:
///      error=true for a trial that failed for good, false when it finished or a scheduler
///      stopped it.
/// Searchers are not thread-safe; the runner (an actor) owns one.
class Searcher {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Destroys the searcher.
  virtual ~Searcher();

  // -- protocol ---------------------------------------------------------------------

  /// Hands the Tuner's metric, mode ("min"/"max") and param space to a searcher built
  /// without them; empty arguments change nothing. Returns false on a conflict: the
  /// searcher has another metric or mode, or has a space and `space` is not empty.
  virtual bool set_search_properties(const std::string& metric, const std::string& mode,
                                     const ParamSpace& space) = 0;

  /// The config for a new trial `trial_id`, or `wait`/`finished` (see `Suggestion`).
  virtual Suggestion suggest(const TrialId& trial_id) = 0;

  /// An intermediate result of a live trial. Default: ignored.
  virtual void on_trial_result(const TrialId& trial_id, const Metrics& result);

  /// The trial ended: `result` is its last reported metrics (empty if none), `error` true
  /// when it failed.
  virtual void on_trial_complete(const TrialId& trial_id, const Metrics& result,
                                 bool error) = 0;
};

} // namespace caftrain::tune
