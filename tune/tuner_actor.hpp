// The tuner actor: runs an experiment's trials through the resource pool, feeds their
// reports to the searcher and the scheduler, and acts on their decisions.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/messages.hpp"
#include "actors/resource_pool.hpp"
#include "tune/result_grid.hpp"
#include "tune/trial_scheduler.hpp"
#include "tune/tuner.hpp"

namespace caftrain::tune {

class EventFileWriter;

// -- messages -----------------------------------------------------------------------------
//
// From callers, as to a trainer actor (actors/messages.hpp): (fit_atom) -> ResultGrid,
// (start_atom), (subscribe_atom, actor), (unsubscribe_atom, actor), (status_atom) ->
// ExperimentStatus, (cancel_atom): stops every running trial and ends the experiment with
// `ResultGrid::error` (cancelled). Subscribers receive every `TrialReport`, then
// (done_atom, ResultGrid).

/// (stop_trial_atom, trial id) -> bool: ends the trial at once (every worker), status
/// TERMINATED, as a scheduler's STOP. False for an unknown or ended trial.
using stop_trial_atom = caf::atom_constant<caf::atom("tstop")>;
/// (pause_trial_atom, trial id) -> bool: stops a running trial's workers, keeps its
/// latest checkpoint, status PAUSED; it runs again only after resume_trial_atom.
using pause_trial_atom = caf::atom_constant<caf::atom("tpause")>;
/// (resume_trial_atom, trial id) -> bool: makes a trial paused by pause_trial_atom (or a
/// scheduler) PENDING again; it continues from its latest checkpoint when placed.
using resume_trial_atom = caf::atom_constant<caf::atom("tresume")>;
/// (budget_atom): internal timer of `time_budget_s`.
using budget_atom = caf::atom_constant<caf::atom("tbudget")>;
/// (table_atom): internal timer of the trial table.
using table_atom = caf::atom_constant<caf::atom("ttable")>;

/// One result of one trial, as the searcher and scheduler saw it.
struct TrialReport {
  /// The experiment's name.
  std::string experiment;
  TrialId trial;
  Config config;
  /// The trial's metrics plus training_iteration, time_total_s and time_this_iter_s.
  Metrics metrics;
  /// The report's persisted checkpoint, or "".
  std::string checkpoint;
  /// The scheduler's decision: "CONTINUE", "PAUSE" or "STOP".
  std::string decision;
};

/// Where one trial stands.
struct TrialSnapshot {
  TrialId id;
  /// "PENDING", "RUNNING", "PAUSED", "TERMINATED" or "ERROR".
  std::string status;
  Config config;
  /// The last result (with training_iteration and the time attributes).
  Metrics last;
  /// Its latest checkpoint, or "".
  std::string checkpoint;
  /// Its run directory.
  std::string dir;
  /// The error of a trial that failed, or "".
  std::string error;
};

/// Where an experiment stands (`status_atom`).
struct ExperimentStatus {
  std::string name;
  std::string path;
  /// "pending" (not started), "running" or "finished".
  std::string state = "pending";
  /// Why no further trial starts now (the pool's reason), or "".
  std::string waiting_reason;
  /// Every trial in creation order.
  std::vector<TrialSnapshot> trials;
};

// -- inspect ------------------------------------------------------------------------------

/// A config value travels as its kind and the one field it uses.
struct ConfigEntry {
  std::string key;
  uint8_t kind = 0; // 0 bool, 1 int64_t, 2 double, 3 string
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string s;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ConfigEntry& x) {
  return f(caf::meta::type_name("ConfigEntry"), x.key, x.kind, x.b, x.i, x.d, x.s);
}

std::vector<ConfigEntry> to_entries(const Config& config);
Config from_entries(const std::vector<ConfigEntry>& entries);

} // namespace caftrain::tune

namespace caftrain {

/// A Config travels as its entries.
template <class Inspector>
typename std::enable_if<Inspector::reads_state, typename Inspector::result_type>::type
inspect(Inspector& f, Config& x) {
  auto entries = tune::to_entries(x);
  return f(caf::meta::type_name("Config"), entries);
}

template <class Inspector>
typename std::enable_if<Inspector::writes_state, typename Inspector::result_type>::type
inspect(Inspector& f, Config& x) {
  std::vector<tune::ConfigEntry> entries;
  auto result = f(caf::meta::type_name("Config"), entries);
  x = tune::from_entries(entries);
  return result;
}

} // namespace caftrain

namespace caftrain::tune {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, TrialReport& x) {
  return f(caf::meta::type_name("TrialReport"), x.experiment, x.trial, x.config, x.metrics,
           x.checkpoint, x.decision);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, TrialSnapshot& x) {
  return f(caf::meta::type_name("TrialSnapshot"), x.id, x.status, x.config, x.last,
           x.checkpoint, x.dir, x.error);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ExperimentStatus& x) {
  return f(caf::meta::type_name("ExperimentStatus"), x.name, x.path, x.state,
           x.waiting_reason, x.trials);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, TrialResult& x) {
  return f(caf::meta::type_name("TrialResult"), x.metrics, x.metrics_history, x.checkpoint,
           x.best_checkpoints, x.path, x.error, x.attempts, x.trial_id, x.config, x.status);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ResultGrid& x) {
  return f(caf::meta::type_name("ResultGrid"), x.experiment_path_, x.results_, x.metric_,
           x.mode_, x.error_);
}

/// Registers Tune's message types (called by caftrain::init).
void add_message_types(caf::actor_system_config& cfg);

// -- the actor ----------------------------------------------------------------------------

/// What a tuner actor runs.
/// A trial of an interrupted experiment, as its experiment_state.json recorded it.
struct RestoredTrial {
  TrialId id;
  Config config;
  /// "TERMINATED" and "ERROR" trials are kept as they ended; the others run again.
  std::string status;
  Metrics last;
  std::string checkpoint;
  std::string error;
};

struct TunerSpec {
  TrainFunc trainable;
  TunerOptions options;
  /// Resolved experiment name and directory.
  std::string name;
  std::string dir;
  /// `Tuner::restore`: the trials the experiment had, in creation order.
  std::vector<RestoredTrial> restored;
  /// The Tuner's number among the program's process-mode jobs when its trials run worker
  /// processes (ScalingConfig.worker_mode "process"; see actors/worker_process.hpp), else
  /// -1. Every trial's worker processes run the program up to this Tuner.
  int64_t job = -1;
};

/// The trials recorded in `<dir>/experiment_state.json`. Throws `Error(invalid_config)`
/// naming the path when it holds no experiment, `Error(corrupt_checkpoint)` when the file
/// cannot be read.
std::vector<RestoredTrial> read_experiment_state(const std::string& dir, std::string* name = nullptr);

/// State of a tuner actor (one per experiment).
struct TunerState {
  static inline const char* name = "caftrain.tuner";

  /// Why a trial's run is being stopped.
  enum class Stop : uint8_t {
    /// Not stopped by the tuner: it ends by itself.
    none,
    /// End it: TERMINATED (a scheduler's STOP, stop_trial_atom, the time budget, cancel).
    terminate,
    /// Pause it: PAUSED, resumable from its latest checkpoint.
    pause,
  };

  /// One trial.
  struct Trial {
    TrialId id;
    Config config;
    TrialStatus status = TrialStatus::PENDING;
    std::string dir;
    /// The trial's run while its workers live (also while it is being stopped).
    caf::actor run;
    std::optional<Placement> placement;
    Stop stop = Stop::none;
    /// Paused by a message: only resume_trial_atom makes it PENDING again.
    bool held = false;
    /// PBT's exploit, applied once the run has stopped: the new config and the copy of
    /// the donor's checkpoint the trial restarts from.
    std::optional<std::pair<Config, std::string>> exploit;
    /// The checkpoint the next run starts from instead of the trial's own latest.
    std::string restore_from;
    Metrics last;
    std::string checkpoint;
    /// Seconds trained in earlier runs of the trial (before pauses).
    double time_before = 0;
    std::chrono::steady_clock::time_point run_started;
    double last_report_s = 0;
    std::optional<Result> result;
    std::optional<RunError> error;
    /// The trial's TensorBoard event file (opened at its first result).
    std::shared_ptr<EventFileWriter> events;
  };

  std::shared_ptr<TunerSpec> spec;
  std::shared_ptr<Searcher> searcher;
  std::shared_ptr<TrialScheduler> scheduler;
  std::map<TrialId, Trial> trials;
  std::vector<TrialId> order;
  /// Trial of each live run actor.
  std::map<caf::actor_addr, TrialId> runs;
  /// Random part of the trial ids (Ray's "a1b2c" of "a1b2c_00003").
  std::string id_prefix;
  // -- resources --
  caf::actor pool;
  bool requesting = false;
  std::string waiting_reason;
  // -- progress --
  bool started = false;
  bool searcher_finished = false;
  bool searcher_waiting = false;
  /// No new trial starts: the time budget is spent or the experiment was cancelled.
  bool ending = false;
  /// The scheduler chose nothing to start: wait for the next event before asking again.
  bool stalled = false;
  int64_t exploits = 0;
  std::chrono::steady_clock::time_point started_at;
  std::optional<RunError> error;
  std::optional<ResultGrid> result;
  // -- callers --
  std::vector<caf::actor> subscribers;
  std::vector<caf::response_promise> fit_promises;
  /// The trial table's lines printed last (a terminal redraws them in place).
  int table_lines = 0;
  bool tty = false;
};

/// Spawns nothing until started (start_atom or fit_atom); see the messages above.
caf::behavior tuner_actor(caf::stateful_actor<TunerState>* self, std::shared_ptr<TunerSpec> spec);

} // namespace caftrain::tune
