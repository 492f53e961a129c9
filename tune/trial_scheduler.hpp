// The interface of Tune's trial schedulers (Ray's `tune.schedulers.TrialScheduler`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "tune/fwd.hpp"

namespace caftrain::tune {

/// A trial's state in the runner (Ray's `Trial.PENDING`, ...).
enum class TrialStatus : uint8_t {
  /// Created or resumed, waiting for resources.
  PENDING,
  /// Its trial function runs.
  RUNNING,
  /// Stopped with its state kept; resumes from its latest checkpoint when started again.
  PAUSED,
  /// Ended: finished, or stopped by a scheduler.
  TERMINATED,
  /// Failed for good (retries spent).
  ERROR,
};

/// A trial the runner could start now (it fits the free resources), for
/// `TrialScheduler::choose_trial_to_run`.
struct TrialInfo {
  /// The trial.
  TrialId id;
  /// PENDING or PAUSED.
  TrialStatus status = TrialStatus::PENDING;
};

/// What the runner knows at a result, beyond the metrics (Ray's schedulers read it from
/// the `TuneController` they are handed).
struct ResultContext {
  /// Live trials other than this one that wait to run (PENDING or PAUSED). Default 0.
  std::size_t waiting_trials = 0;
  /// The trial's latest reported checkpoint (its directory), "" when it has none yet.
  std::string checkpoint = "";
};

/// Something a scheduler asks of the runner about a trial other than the one whose event
/// it is handling, or beyond a decision (taken with `TrialScheduler::take_commands`).
struct TrialCommand {
  /// What to do.
  enum class Kind : uint8_t {
    /// Stop a PAUSED (or PENDING) trial for good.
    stop,
    /// Make a PAUSED trial PENDING again: it resumes from its latest checkpoint when
    /// `choose_trial_to_run` picks it.
    resume,
    /// PBT's exploit: the (paused) trial restarts from `checkpoint`, the latest checkpoint
    /// of `donor`, with `config` as its new config; it becomes PENDING.
    exploit,
  };

  /// What to do.
  Kind kind = Kind::stop;
  /// The trial it concerns.
  TrialId trial = {};
  /// `exploit`: the trial whose checkpoint is cloned.
  TrialId donor = {};
  /// `exploit`: the donor's checkpoint to restore.
  std::string checkpoint = {};
  /// `exploit`: the trial's new config (the donor's, explored).
  Config config = {};
};

/// A trial scheduler (Ray's `TrialScheduler`): decides per result whether a trial goes on,
/// yields its resources, or ends, and which waiting trial runs next. The runner's protocol,
/// all calls from the runner's thread:
///   - `set_search_properties(metric, mode)` once before the first trial with the Tuner's
///     values (false: the scheduler has different ones, refuse to start);
///   - `on_trial_add(id, config)` when a trial is created, before it runs; the scheduler
///     may fill in config keys (PBT samples mutated keys the space lacks), so the runner
///     uses the config as it is afterwards;
///   - `on_trial_result(id, metrics, context)` for every report, the metrics including the
///     time attribute the scheduler uses ("training_iteration": reports so far,
///     "time_total_s": seconds), then acts on the decision:
///       CONTINUE: nothing; PAUSE: stop the trial's workers at once, keep its latest
///       checkpoint, mark it PAUSED; STOP: end it at once (every worker), mark it
///       TERMINATED, then call `on_trial_complete(id, last_metrics)` and the searcher's
///       `on_trial_complete`;
///   - after every call, `take_commands()` and act on each in order: `stop` ends a paused
///     or pending trial (then `on_trial_remove(id)` and the searcher's completion);
///     `resume` makes a paused trial PENDING; `exploit` makes it PENDING with the new
///     config, restored from the donor's checkpoint (copy it: the donor goes on);
///   - `on_trial_complete(id, last_metrics)` when a trial function returns;
///     `on_trial_error(id)` when it failed for good; `on_trial_remove(id)` when the runner
///     ends a trial that is not running; each at most once per trial, unknown or already
///     removed trials are ignored;
///   - whenever resources free up, `choose_trial_to_run(startable)` with the PENDING and
///     PAUSED trials that fit, in creation order; it answers one to start (or nothing).
/// Schedulers are not thread-safe; the runner owns one.
class TrialScheduler {
 public:
  /// What happens to a trial after a result (Ray's `TrialScheduler.CONTINUE`, ...).
  enum class Decision : uint8_t {
    /// Keep training.
    CONTINUE,
    /// Release its resources, keep its state: it may resume later.
    PAUSE,
    /// End it.
    STOP,
  };

  // -- constructors -----------------------------------------------------------------

  /// Destroys the scheduler.
  virtual ~TrialScheduler();

  // -- protocol ---------------------------------------------------------------------

  /// Takes the Tuner's metric and mode where the scheduler has none (Ray: false when the
  /// scheduler already has one and another is passed; the Tuner then refuses to start).
  virtual bool set_search_properties(const std::string& metric, const std::string& mode);

  /// A new trial with its config (which the scheduler may complete).
  virtual void on_trial_add(const TrialId& trial, Config& config);

  /// A reported result; see the class comment for how the runner acts on the decision.
  virtual Decision on_trial_result(const TrialId& trial, const Metrics& result,
                                   const ResultContext& context) = 0;

  /// The trial finished (its function returned, or it was stopped while running).
  virtual void on_trial_complete(const TrialId& trial, const Metrics& result);

  /// The trial failed for good.
  virtual void on_trial_error(const TrialId& trial);

  /// The runner ended a trial that was not running.
  virtual void on_trial_remove(const TrialId& trial);

  /// Which of `startable` (PENDING or PAUSED trials that fit, in creation order) to start
  /// now. Default (Ray's FIFOScheduler): the first PENDING, else the first PAUSED.
  virtual std::optional<TrialId> choose_trial_to_run(const std::vector<TrialInfo>& startable);

  /// The commands issued since the last call, in order; the runner must act on each.
  std::vector<TrialCommand> take_commands();

  // -- properties -------------------------------------------------------------------

  /// The metric decisions follow.
  const std::string& metric() const noexcept {
    return metric_;
  }

  /// "min" or "max".
  const std::string& mode() const noexcept {
    return mode_;
  }

 protected:
  /// A scheduler with the given metric and mode (either may be "", filled in later by
  /// `set_search_properties`); `name` is the class name for error messages.
  TrialScheduler(std::string name, std::string metric, std::string mode);

  /// Queues a command for the runner.
  void command(TrialCommand cmd);

  /// Throws `Error(invalid_config)` unless metric and mode are set (Ray checks at
  /// `on_trial_add`).
  void require_metric() const;

  /// +1 for "max", -1 for "min".
  double metric_op() const;

  /// `result[key]`; throws `Error(invalid_argument)` naming the key, the trial and the
  /// scheduler when the result lacks it.
  double attr(const Metrics& result, const std::string& key, const TrialId& trial) const;

  /// The class name, for messages.
  std::string name_;
  /// See `metric()`.
  std::string metric_;
  /// See `mode()`.
  std::string mode_;

 private:
  std::vector<TrialCommand> commands_;
};

} // namespace caftrain::tune
