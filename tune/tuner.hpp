// Tuner: runs a hyperparameter search as trials through the resource pool (Ray's
// `tune.Tuner`).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>

#include "actors/run_config.hpp"
#include "tune/param_space.hpp"
#include "tune/result_grid.hpp"

namespace caftrain::tune {

struct RestoredTrial;

/// How an experiment searches (Ray's `tune.TuneConfig`).
struct TuneConfig {
  /// The metric trials are compared by (handed to the searcher and the scheduler, and the
  /// default of `ResultGrid::get_best_result`). Default "" (then both must have one).
  std::string metric = "";
  /// "min" or "max". Default "".
  std::string mode = "";
  /// Trials to run (Ray's `num_samples`): with the default searcher, repetitions of the
  /// grid (each grid point this many times); with another searcher, trials in all.
  /// -1: until `time_budget_s` ends the experiment or the searcher is exhausted.
  /// Default 1.
  int64_t num_samples = 1;
  /// At most this many trials run at once; 0 (default): as many as the resource pool fits.
  int64_t max_concurrent_trials = 0;
  /// Ends the experiment after this many seconds: running trials are stopped (their
  /// status stays TERMINATED with what they reported), none is started after. 0
  /// (default): no limit.
  double time_budget_s = 0;
  /// The search algorithm; default a `BasicVariantGenerator` (random and grid search)
  /// over the param space, seeded with `seed`.
  std::shared_ptr<Searcher> search_alg = nullptr;
  /// The trial scheduler; default a `FIFOScheduler` (every trial runs to its end).
  std::shared_ptr<TrialScheduler> scheduler = nullptr;
  /// Seed of the default searcher. Default 0.
  uint64_t seed = 0;
};

/// Everything a Tuner needs besides its trainable (Ray's Tuner arguments).
struct TunerOptions {
  /// The search space (Ray's `param_space`); a trial's train function receives its
  /// sampled values as its `Config` (nested spaces as "a/b" keys).
  ParamSpace param_space = {};
  /// How to search.
  TuneConfig tune_config = {};
  /// The experiment (Ray's `RunConfig`): `name` and `storage_path` place the experiment
  /// directory `<storage_path>/<name>` (default "Tuner_<time>" under
  /// "~/caftrain_results"), which holds one run directory per trial; `failure`,
  /// `checkpoint`, `stop`, `callbacks` and the timeouts apply to every trial's run.
  RunConfig run_config = {};
  /// What each trial runs on (Ray's `tune.with_resources` / `resources_per_trial`): its
  /// train function runs on `num_workers` ranks (a distributed trial when more than one,
  /// joined by `torch_config`'s backend), each holding its bundle of the pool (default
  /// 1 CPU, as Ray's trials); the pool never runs more trials at once than fit.
  ScalingConfig scaling = {};
  /// The process group of a distributed trial.
  TorchConfig torch_config = {};
  /// Printing of the trial table (Ray's `verbose`): 0 silent, 1 (default) the table of
  /// trials every `report_interval_s` and at the end (plain lines, one per trial event,
  /// when stdout is not a terminal).
  int verbose = 1;
  /// Seconds between two trial tables. Default 5 (Ray's CLIReporter).
  double report_interval_s = 5;
};

/// Ray's Tuner: samples configs from the param space through the search algorithm, runs
/// each as a trial (a TorchTrainer run of `trainable` with that config, on resources of
/// the process's resource pool shared with every other Tuner and TorchTrainer), lets the
/// scheduler continue, pause or stop trials on every report, and answers a `ResultGrid`.
///
/// A trial reports with `train::report` (or `TuneReportCallback` /
/// `TuneReportCheckpointCallback` in a `Trainer`); Tune adds `training_iteration` (reports
/// so far), `time_total_s` and `time_this_iter_s` to each result. A trial that fails is
/// retried per `run_config.failure` from its latest checkpoint; one that keeps failing is
/// recorded with its error (status ERROR) and the experiment goes on.
///
/// `fit()` blocks. A service calls `start()` and talks to the tuner actor by messages
/// (tune/tuner_actor.hpp): subscribe to receive every `TrialReport` and the final
/// `(done_atom, ResultGrid)`, ask `status_atom` for an `ExperimentStatus`, stop, pause or
/// resume single trials, cancel the experiment.
class Tuner {
 public:
  // -- constructors -----------------------------------------------------------------

  /// Checks the options; throws `Error(invalid_config)` naming a bad one before anything
  /// starts (an empty trainable, a bad num_samples, a metric or mode that conflicts with
  /// the searcher's or scheduler's, ScalingConfig errors as TorchTrainer's).
  Tuner(caf::actor_system& system, TrainFunc trainable, TunerOptions options = {});

  /// Continues the interrupted experiment in `path` (Ray's `Tuner.restore`): its trials
  /// come back with their ids and configs; TERMINATED and ERROR trials keep their results
  /// and are not run again; the others (running, pending or paused when the experiment
  /// stopped: a cancel, a crash) run again, each from its latest checkpoint. `options`
  /// are the experiment's as first given (the trainable, param space, tune config,
  /// scaling); their run_config name and storage path are replaced by the path's. The
  /// searcher is brought to where it stood by suggesting once per restored trial and
  /// learning the ended ones' results; the scheduler starts afresh with the restored
  /// trials (searchers and schedulers keep no state on disk). Throws
  /// `Error(invalid_config)` when `path` holds no experiment (see `can_restore`).
  static Tuner restore(caf::actor_system& system, const std::string& path, TrainFunc trainable,
                       TunerOptions options = {});

  /// True when `path` holds an experiment (its experiment_state.json).
  static bool can_restore(const std::string& path);

  ~Tuner();
  Tuner(Tuner&&) noexcept;
  Tuner& operator=(Tuner&&) noexcept;

  // -- running ----------------------------------------------------------------------

  /// Runs the experiment to its end and returns its results (calling it again returns
  /// the same grid).
  ResultGrid fit();

  /// Starts the experiment without waiting; returns the tuner actor.
  caf::actor start();

  /// The tuner actor (spawned by the constructor, started by `start` or `fit`).
  const caf::actor& actor() const noexcept;

  // -- properties -------------------------------------------------------------------

  /// The experiment directory.
  const std::string& path() const;

  /// The resolved experiment name.
  const std::string& name() const;

 private:
  Tuner(caf::actor_system& system, TrainFunc trainable, TunerOptions options,
        std::vector<RestoredTrial> restored);

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

} // namespace caftrain::tune
