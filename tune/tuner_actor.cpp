#include "tune/tuner_actor.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <random>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/cluster.hpp"
#include "actors/placed_run.hpp"
#include "actors/pool_actor.hpp"
#include "actors/subscribers.hpp"
#include "actors/worker.hpp"
#include "checkpoint/files.hpp"
#include "core/error.hpp"
#include "core/metrics_json.hpp"
#include "tune/progress_reporter.hpp"
#include "tune/basic_variant_generator.hpp"
#include "tune/searcher.hpp"
#include "tune/tensorboard.hpp"

namespace caftrain::tune {

namespace fs = std::filesystem;
using nlohmann::json;
using Self = caf::stateful_actor<TunerState>*;
using Trial = TunerState::Trial;
using Decision = TrialScheduler::Decision;

// -- message types ------------------------------------------------------------------------

std::vector<ConfigEntry> to_entries(const Config& config) {
  std::vector<ConfigEntry> out;
  for (auto& [key, value] : config.values()) {
    ConfigEntry e;
    e.key = key;
    e.kind = static_cast<uint8_t>(value.index());
    std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bool>)
          e.b = x;
        else if constexpr (std::is_same_v<T, int64_t>)
          e.i = x;
        else if constexpr (std::is_same_v<T, double>)
          e.d = x;
        else
          e.s = x;
      },
      value);
    out.push_back(std::move(e));
  }
  return out;
}

Config from_entries(const std::vector<ConfigEntry>& entries) {
  Config out;
  for (auto& e : entries) {
    switch (e.kind) {
      case 0: out.set(e.key, e.b); break;
      case 1: out.set(e.key, e.i); break;
      case 2: out.set(e.key, e.d); break;
      default: out.set(e.key, e.s); break;
    }
  }
  return out;
}

void add_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<ConfigEntry>("caftrain::tune::ConfigEntry");
  cfg.add_message_type<Config>("caftrain::Config");
  cfg.add_message_type<TrialReport>("caftrain::tune::TrialReport");
  cfg.add_message_type<TrialSnapshot>("caftrain::tune::TrialSnapshot");
  cfg.add_message_type<ExperimentStatus>("caftrain::tune::ExperimentStatus");
  cfg.add_message_type<TrialResult>("caftrain::tune::TrialResult");
  cfg.add_message_type<ResultGrid>("caftrain::tune::ResultGrid");
}

namespace {

// -- views --------------------------------------------------------------------------------

const char* status_name(TrialStatus s) {
  switch (s) {
    case TrialStatus::PENDING: return "PENDING";
    case TrialStatus::RUNNING: return "RUNNING";
    case TrialStatus::PAUSED: return "PAUSED";
    case TrialStatus::TERMINATED: return "TERMINATED";
    case TrialStatus::ERROR: return "ERROR";
  }
  return "?";
}

const TuneConfig& tune_config(Self self) {
  return self->state.spec->options.tune_config;
}

bool live(const Trial& t) {
  return t.status == TrialStatus::PENDING || t.status == TrialStatus::RUNNING ||
         t.status == TrialStatus::PAUSED;
}

/// The run actor is alive: the trial holds resources.
bool busy(const Trial& t) {
  return static_cast<bool>(t.run);
}

TrialSnapshot snapshot(const Trial& t) {
  return TrialSnapshot{t.id, status_name(t.status), t.config, t.last, t.checkpoint, t.dir,
                       t.error ? t.error->message : std::string()};
}

ExperimentStatus status_of(Self self) {
  auto& st = self->state;
  ExperimentStatus out;
  out.name = st.spec->name;
  out.path = st.spec->dir;
  out.state = st.result ? "finished" : st.started ? "running" : "pending";
  out.waiting_reason = st.waiting_reason;
  for (auto& id : st.order)
    out.trials.push_back(snapshot(st.trials.at(id)));
  return out;
}

// -- output -------------------------------------------------------------------------------

void print_event(Self self, const std::string& event, const Trial& t) {
  auto& st = self->state;
  if (st.spec->options.verbose <= 0 || st.tty)
    return;
  std::cout << trial_event_line(event, snapshot(t), tune_config(self).metric) << std::endl;
}

void print_table(Self self, bool final_table) {
  auto& st = self->state;
  if (st.spec->options.verbose <= 0 || (!st.tty && !final_table))
    return;
  auto text = render_trial_table(status_of(self), tune_config(self).metric, tune_config(self).mode);
  if (st.tty && st.table_lines > 0)
    std::cout << "\x1b[" << st.table_lines << "F\x1b[J"; // redraw in place
  st.table_lines = static_cast<int>(std::count(text.begin(), text.end(), '\n'));
  std::cout << text << std::flush;
}

// -- the experiment's state file ----------------------------------------------------------

json config_to_json(const Config& c) {
  json out = json::object();
  for (auto& [k, v] : c.values())
    std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, double>)
          out[k] = number_to_json(x);
        else
          out[k] = x;
      },
      v);
  return out;
}

/// `<experiment>/experiment_state.json`: every trial with its status, config, last
/// result, checkpoint and error (rewritten atomically at each trial event).
void write_state(Self self) {
  auto& st = self->state;
  json trials = json::array();
  for (auto& id : st.order) {
    auto& t = st.trials.at(id);
    trials.push_back({{"trial_id", t.id},
                      {"status", status_name(t.status)},
                      {"config", config_to_json(t.config)},
                      {"last_result", metrics_to_json(t.last)},
                      {"checkpoint", t.checkpoint},
                      {"dir", t.dir},
                      {"error", t.error ? t.error->message : std::string()}});
  }
  json state = {{"format_version", 1},
                {"name", st.spec->name},
                {"metric", tune_config(self).metric},
                {"mode", tune_config(self).mode},
                {"state", st.result ? "finished" : "running"},
                {"error", st.error ? st.error->message : std::string()},
                {"error_code", st.error ? static_cast<int>(st.error->code) : 0},
                {"trials", trials}};
  try {
    write_file_atomic((fs::path(st.spec->dir) / "experiment_state.json").string(), state.dump(1));
  } catch (const std::exception& e) {
    spdlog::warn("caftrain: Tuner {}: cannot write its experiment state: {}", st.spec->name, e.what());
  }
}

// -- trials -------------------------------------------------------------------------------

void request_slot(Self self);
void maybe_finish(Self self);
void end_experiment(Self self, std::optional<RunError> error,
                    TunerState::Stop how = TunerState::Stop::terminate);
void act_on_commands(Self self);

bool can_create(Self self) {
  auto& st = self->state;
  auto n = tune_config(self).num_samples;
  // A BasicVariantGenerator (the default) ends by itself after num_samples repetitions of
  // the grid; other searchers make trials until the Tuner has num_samples.
  bool counted = dynamic_cast<BasicVariantGenerator*>(st.searcher.get()) == nullptr;
  return !st.ending && !st.searcher_finished && !st.searcher_waiting &&
         (!counted || n < 0 || static_cast<int64_t>(st.order.size()) < n);
}

/// PENDING and PAUSED trials that may start now, in creation order.
std::vector<TrialInfo> startable(Self self) {
  std::vector<TrialInfo> out;
  for (auto& id : self->state.order) {
    auto& t = self->state.trials.at(id);
    if ((t.status == TrialStatus::PENDING || t.status == TrialStatus::PAUSED) && !busy(t) && !t.held)
      out.push_back({t.id, t.status});
  }
  return out;
}

bool has_pending(Self self) {
  for (auto& info : startable(self))
    if (info.status == TrialStatus::PENDING)
      return true;
  return false;
}

int64_t running_count(Self self) {
  int64_t n = 0;
  for (auto& [id, t] : self->state.trials)
    n += busy(t) ? 1 : 0;
  return n;
}

/// Asks the searcher for a new trial; false when it has none now.
bool create_trial(Self self) {
  auto& st = self->state;
  char id[32];
  std::snprintf(id, sizeof(id), "%s_%05zu", st.id_prefix.c_str(), st.order.size());
  Suggestion s;
  try {
    s = st.searcher->suggest(id);
  } catch (const Error& e) {
    st.error = RunError{e.code(), std::string("the search algorithm failed: ") + e.what()};
    st.ending = true;
    return false;
  }
  if (s.status == Suggestion::Status::finished) {
    st.searcher_finished = true;
    return false;
  }
  if (s.status == Suggestion::Status::wait) {
    st.searcher_waiting = true;
    return false;
  }
  Trial t;
  t.id = id;
  t.config = std::move(s.config);
  t.dir = (fs::path(st.spec->dir) / t.id).string();
  try {
    st.scheduler->on_trial_add(t.id, t.config);
  } catch (const Error& e) {
    st.error = RunError{e.code(), std::string("the trial scheduler refused the trial: ") + e.what()};
    st.ending = true;
    return false;
  }
  st.order.push_back(t.id);
  auto& added = st.trials[t.id] = std::move(t);
  print_event(self, "created", added);
  return true;
}

/// The trial ends for good (TERMINATED or ERROR) and the searcher learns it; the
/// scheduler is told by the caller, which knows which of its calls applies.
void end_trial(Self self, Trial& t, TrialStatus status) {
  t.status = status;
  t.exploit.reset();
  self->state.searcher->on_trial_complete(t.id, t.last, status == TrialStatus::ERROR);
  print_event(self, status == TrialStatus::ERROR ? "errored" : "ended", t);
}

/// Stops the trial's run (every worker) at once; the trial keeps its placement until the
/// run has ended (its done message).
void stop_run(Self self, Trial& t, TunerState::Stop why) {
  if (!busy(t) || t.stop != TunerState::Stop::none) {
    if (busy(t) && why == TunerState::Stop::terminate)
      t.stop = why; // a pause that becomes a stop
    return;
  }
  t.stop = why;
  self->send(t.run, cancel_atom::value);
}

/// Copies the donor's checkpoint beside the experiment's trials, so that the donor's
/// retention cannot delete it before the trial has restored it.
std::string copy_checkpoint(Self self, const Trial& t, const std::string& source) {
  auto& st = self->state;
  auto target = fs::path(st.spec->dir) / ".exploit" / (t.id + "_" + std::to_string(++st.exploits));
  fs::create_directories(target.parent_path());
  fs::copy(source, target, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  return target.string();
}

void apply_exploit(Self self, Trial& t) {
  if (!t.exploit)
    return;
  t.config = t.exploit->first;
  t.restore_from = t.exploit->second;
  t.exploit.reset();
  t.status = TrialStatus::PENDING;
  print_event(self, "exploits", t);
}

void act_on_commands(Self self) {
  auto& st = self->state;
  for (auto& cmd : st.scheduler->take_commands()) {
    auto i = st.trials.find(cmd.trial);
    if (i == st.trials.end() || !live(i->second))
      continue;
    auto& t = i->second;
    switch (cmd.kind) {
      case TrialCommand::Kind::stop:
        if (busy(t))
          stop_run(self, t, TunerState::Stop::terminate);
        end_trial(self, t, TrialStatus::TERMINATED);
        st.scheduler->on_trial_remove(t.id);
        break;
      case TrialCommand::Kind::resume:
        // A trial still stopping stays out of `startable` until its run has ended.
        if (t.status == TrialStatus::PAUSED && !t.held)
          t.status = TrialStatus::PENDING;
        break;
      case TrialCommand::Kind::exploit:
        try {
          t.exploit = std::make_pair(cmd.config, copy_checkpoint(self, t, cmd.checkpoint));
        } catch (const std::exception& e) {
          spdlog::warn("caftrain: Tuner {}: trial {} cannot clone {}'s checkpoint '{}': {}; it "
                       "resumes its own",
                       st.spec->name, t.id, cmd.donor, cmd.checkpoint, e.what());
          if (!busy(t))
            t.status = TrialStatus::PENDING;
          break;
        }
        if (!busy(t))
          apply_exploit(self, t);
        break;
    }
  }
}

TorchTrainerOptions trial_options(Self self, const Trial& t) {
  auto& o = self->state.spec->options;
  TorchTrainerOptions out;
  out.train_loop_config = t.config;
  out.torch_config = o.torch_config;
  out.scaling = o.scaling;
  out.run = o.run_config;
  out.run.name = t.id;
  out.run.storage_path = self->state.spec->dir;
  out.resume_from_checkpoint = t.restore_from;
  return out;
}

void start_trial(Self self, Trial& t, Placement placement) {
  auto& st = self->state;
  PlacedRun run;
  try {
    run = spawn_placed_run(self->system(), st.spec->trainable, trial_options(self, t), placement, st.spec->job);
  } catch (const Error& e) {
    self->send(st.pool, pool_release_atom::value, placement.id);
    t.error = RunError{e.code(), e.what()};
    t.status = TrialStatus::ERROR;
    st.scheduler->on_trial_error(t.id);
    end_trial(self, t, TrialStatus::ERROR);
    return;
  }
  t.run = run.actor;
  t.dir = run.dir;
  t.placement = std::move(placement);
  t.stop = TunerState::Stop::none;
  t.status = TrialStatus::RUNNING;
  t.run_started = std::chrono::steady_clock::now();
  t.last_report_s = t.time_before;
  st.runs[t.run.address()] = t.id;
  self->monitor(t.run);
  self->send(t.run, subscribe_atom::value, caf::actor_cast<caf::actor>(self));
  self->send(t.run, start_atom::value);
  print_event(self, "started", t);
}

/// The pool granted one trial's bundles: start the trial the scheduler chooses.
void on_slot(Self self, Placement& placement) {
  auto& st = self->state;
  st.requesting = false;
  st.waiting_reason.clear();
  if (st.ending || st.result) {
    self->send(st.pool, pool_release_atom::value, placement.id);
    return maybe_finish(self);
  }
  if (!has_pending(self) && can_create(self))
    create_trial(self);
  if (st.ending) { // the searcher or the scheduler failed
    self->send(st.pool, pool_release_atom::value, placement.id);
    return end_experiment(self, std::nullopt);
  }
  std::optional<TrialId> pick;
  auto options = startable(self);
  if (!options.empty())
    pick = st.scheduler->choose_trial_to_run(options);
  act_on_commands(self);
  auto i = pick ? st.trials.find(*pick) : st.trials.end();
  if (i == st.trials.end() || busy(i->second) || !live(i->second) || i->second.status == TrialStatus::RUNNING) {
    self->send(st.pool, pool_release_atom::value, placement.id);
    st.stalled = true;
    write_state(self);
    return maybe_finish(self);
  }
  start_trial(self, i->second, std::move(placement));
  write_state(self);
  request_slot(self);
}

void request_slot(Self self) {
  auto& st = self->state;
  if (st.requesting || st.ending || st.result || st.stalled)
    return;
  if (startable(self).empty() && !can_create(self))
    return;
  auto limit = tune_config(self).max_concurrent_trials;
  if (limit > 0 && running_count(self) >= limit)
    return;
  auto& scaling = st.spec->options.scaling;
  PlacementRequest request{st.spec->name, scaling.worker_bundles(),
                           placement_strategy_from_string(scaling.placement_strategy)};
  st.requesting = true;
  self->request(st.pool, caf::infinite, pool_request_atom::value, std::move(request))
    .then([=](Placement& p) { on_slot(self, p); },
          [=](caf::error& err) {
            auto& st = self->state;
            st.requesting = false;
            st.error = to_run_error(err);
            st.error->message = "the trials can never be placed: " + st.error->message;
            st.ending = true;
            maybe_finish(self);
          });
  self->request(st.pool, caf::infinite, pool_reason_atom::value, st.spec->name)
    .then([=](std::string& why) {
      if (self->state.requesting)
        self->state.waiting_reason = why;
    },
    [](caf::error&) {
      // no reason to show; the placement itself still answers
    });
}

/// Something changed (a trial ended, a result came): trials may start again.
void wake(Self self) {
  self->state.stalled = false;
  self->state.searcher_waiting = false;
  request_slot(self);
}

void on_report(Self self, ReportRecord& rec) {
  auto& st = self->state;
  auto i = st.trials.find(rec.run);
  if (i == st.trials.end())
    return;
  auto& t = i->second;
  // Reports of a run being stopped (in flight when it was told) are not results any more.
  if (!busy(t) || self->current_sender() != caf::actor_cast<caf::strong_actor_ptr>(t.run) ||
      t.stop != TunerState::Stop::none || t.status != TrialStatus::RUNNING)
    return;
  auto now = std::chrono::steady_clock::now();
  double total = t.time_before + std::chrono::duration<double>(now - t.run_started).count();
  Metrics metrics = rec.metrics;
  metrics["training_iteration"] = static_cast<double>(rec.index + 1);
  metrics["time_total_s"] = total;
  metrics["time_this_iter_s"] = total - t.last_report_s;
  metrics["timestamp"] = rec.timestamp;
  t.last_report_s = total;
  t.last = metrics;
  // Every result also goes to the trial's TensorBoard event file (Ray Tune's default).
  try {
    if (!t.events)
      t.events = std::make_shared<EventFileWriter>(t.dir);
    t.events->add_scalars(rec.index + 1, rec.timestamp, metrics);
  } catch (const Error& e) {
    spdlog::warn("caftrain: Tuner {}: trial {}: {}", st.spec->name, t.id, e.what());
  }
  if (!rec.checkpoint_path.empty()) {
    t.checkpoint = rec.checkpoint_path;
    t.restore_from.clear(); // its own checkpoint is newer than an exploited donor's
  }
  Decision decision = Decision::CONTINUE;
  try {
    st.searcher->on_trial_result(t.id, metrics);
    ResultContext context;
    for (auto& info : startable(self))
      context.waiting_trials += info.id != t.id ? 1 : 0;
    context.checkpoint = t.checkpoint;
    decision = st.scheduler->on_trial_result(t.id, metrics, context);
  } catch (const Error& e) {
    // A result without the scheduler's metric: the trial is wrong, not the experiment.
    t.error = RunError{e.code(), e.what()};
    stop_run(self, t, TunerState::Stop::terminate);
    st.scheduler->on_trial_error(t.id);
    end_trial(self, t, TrialStatus::ERROR);
    write_state(self);
    return;
  }
  const char* names[] = {"CONTINUE", "PAUSE", "STOP"};
  TrialReport report{st.spec->name, t.id, t.config, metrics, t.checkpoint,
                     names[static_cast<int>(decision)]};
  for (auto& s : st.subscribers)
    self->send(s, report);
  print_event(self, "result", t);
  if (decision == Decision::STOP) {
    stop_run(self, t, TunerState::Stop::terminate);
    st.scheduler->on_trial_complete(t.id, t.last);
    end_trial(self, t, TrialStatus::TERMINATED);
  } else if (decision == Decision::PAUSE) {
    stop_run(self, t, TunerState::Stop::pause);
    t.status = TrialStatus::PAUSED;
    print_event(self, "paused", t);
  }
  act_on_commands(self);
  if (decision != Decision::CONTINUE)
    write_state(self);
  // The scheduler may choose differently now (HyperBand fills a bracket); the searcher
  // waits for a trial to end, not for a result.
  st.stalled = false;
  request_slot(self);
}

/// A trial's run ended (by itself, or because the tuner stopped it).
void on_run_done(Self self, const caf::actor_addr& source, std::optional<Result> result) {
  auto& st = self->state;
  auto r = st.runs.find(source);
  if (r == st.runs.end())
    return;
  auto& t = st.trials.at(r->second);
  st.runs.erase(r);
  self->demonitor(t.run);
  t.run = nullptr;
  if (t.placement) {
    self->send(st.pool, pool_release_atom::value, t.placement->id);
    t.placement.reset();
  }
  join_worker_threads(t.id, std::chrono::milliseconds(200));
  t.time_before += std::chrono::duration<double>(std::chrono::steady_clock::now() - t.run_started).count();
  if (!result) {
    result = Result{};
    result->path = t.dir;
    result->error = RunError{Errc::worker_failed, "the trial's trainer actor ended without a result"};
  }
  if (result->checkpoint)
    t.checkpoint = result->checkpoint->path();
  t.result = *result;
  bool cancelled = result->error && result->error->code == Errc::cancelled;
  auto stop = t.stop;
  t.stop = TunerState::Stop::none;
  if (!live(t)) {
    // Ended already (a scheduler's STOP): its resources are back, nothing else to do.
  } else if (!result->error) {
    // The trial function returned (also when a pause came too late to matter).
    st.scheduler->on_trial_complete(t.id, t.last);
    end_trial(self, t, TrialStatus::TERMINATED);
  } else if (cancelled && stop == TunerState::Stop::pause) {
    // PAUSED, unless a resume (the scheduler's or a message) came while it stopped.
    if (t.status != TrialStatus::PENDING)
      t.status = TrialStatus::PAUSED;
    apply_exploit(self, t);
  } else if (cancelled && (stop == TunerState::Stop::terminate || st.ending)) {
    st.scheduler->on_trial_complete(t.id, t.last);
    end_trial(self, t, TrialStatus::TERMINATED);
  } else {
    t.error = result->error;
    st.scheduler->on_trial_error(t.id);
    end_trial(self, t, TrialStatus::ERROR);
  }
  act_on_commands(self);
  write_state(self);
  wake(self);
  maybe_finish(self);
}

ResultGrid build_grid(Self self) {
  auto& st = self->state;
  std::vector<TrialResult> results;
  for (auto& id : st.order) {
    auto& t = st.trials.at(id);
    TrialResult r;
    if (t.result)
      static_cast<Result&>(r) = *t.result;
    r.path = t.dir;
    if (!t.last.empty())
      r.metrics = t.last;
    r.trial_id = t.id;
    r.config = t.config;
    r.status = status_name(t.status);
    if (t.status == TrialStatus::ERROR)
      r.error = t.error ? t.error : r.error;
    else if (t.status == TrialStatus::TERMINATED && r.error && r.error->code == Errc::cancelled)
      r.error.reset(); // stopped by the scheduler, the budget or a message: not a failure
    results.push_back(std::move(r));
  }
  return ResultGrid(st.spec->dir, std::move(results), tune_config(self).metric,
                    tune_config(self).mode, st.error);
}

void finish(Self self) {
  auto& st = self->state;
  auto grid = build_grid(self);
  st.result = grid;
  write_state(self);
  try {
    write_file_atomic((fs::path(st.spec->dir) / "results.csv").string(), grid.to_csv());
  } catch (const std::exception& e) {
    spdlog::warn("caftrain: Tuner {}: cannot write results.csv: {}", st.spec->name, e.what());
  }
  print_table(self, true);
  for (auto& p : st.fit_promises)
    p.deliver(grid);
  st.fit_promises.clear();
  for (auto& s : st.subscribers)
    self->send(s, done_atom::value, grid);
  self->quit();
}

void maybe_finish(Self self) {
  auto& st = self->state;
  if (st.result || !st.started)
    return;
  if (running_count(self) > 0)
    return;
  bool work_left = !startable(self).empty() || can_create(self);
  if (!st.ending && work_left && (st.requesting || !st.stalled))
    return;
  finish(self);
}

/// Ends the experiment early: running trials are stopped, TERMINATED by the time budget
/// (`how` terminate), PAUSED by a cancel (`how` pause: `Tuner::restore` runs them again).
void end_experiment(Self self, std::optional<RunError> error, TunerState::Stop how) {
  auto& st = self->state;
  if (st.result)
    return;
  st.ending = true;
  if (error && !st.error)
    st.error = error;
  for (auto& [id, t] : st.trials)
    if (busy(t)) {
      stop_run(self, t, how);
      if (how == TunerState::Stop::pause && t.status == TrialStatus::RUNNING)
        t.status = TrialStatus::PAUSED;
    }
  maybe_finish(self);
}

Config config_from_json(const json& j) {
  Config out;
  for (auto& [k, v] : j.items()) {
    if (v.is_boolean())
      out.set(k, v.get<bool>());
    else if (v.is_number_integer())
      out.set(k, v.get<int64_t>());
    else if (v.is_number())
      out.set(k, v.get<double>());
    else if (v.is_string())
      out.set(k, v.get<std::string>());
  }
  return out;
}

/// Brings back the trials of an interrupted experiment (Tuner::restore).
void restore_trials(Self self) {
  auto& st = self->state;
  auto& restored = st.spec->restored;
  if (restored.empty())
    return;
  auto& first = restored.front().id;
  st.id_prefix = first.substr(0, first.rfind('_'));
  for (auto& r : restored) {
    Trial t;
    t.id = r.id;
    t.config = r.config;
    t.dir = (fs::path(st.spec->dir) / t.id).string();
    t.last = r.last;
    t.checkpoint = r.checkpoint;
    if (auto i = r.last.find("time_total_s"); i != r.last.end())
      t.time_before = i->second;
    bool ended = r.status == "TERMINATED" || r.status == "ERROR";
    t.status = r.status == "ERROR" ? TrialStatus::ERROR
               : ended            ? TrialStatus::TERMINATED
                                  : TrialStatus::PENDING;
    if (ended) {
      try {
        t.result = Result::from_path(t.dir);
      } catch (const Error&) {
        // a trial that never got as far as a run directory: its recorded state is all
      }
      if (t.status == TrialStatus::ERROR)
        t.error = t.result && t.result->error ? *t.result->error
                                              : RunError{Errc::worker_failed, r.error};
    }
    // The searcher learns that the trial exists (its suggestion is the recorded config's
    // place in its sequence) and how an ended one ended; the scheduler gets the live ones.
    try {
      st.searcher->suggest(t.id);
      if (ended)
        st.searcher->on_trial_complete(t.id, t.last, t.status == TrialStatus::ERROR);
      else
        st.scheduler->on_trial_add(t.id, t.config);
    } catch (const Error& e) {
      spdlog::warn("caftrain: Tuner {}: restoring trial {}: {}", st.spec->name, t.id, e.what());
    }
    st.order.push_back(t.id);
    st.trials[t.id] = std::move(t);
  }
  spdlog::info("caftrain: Tuner {}: restored {} trials from '{}'", st.spec->name, restored.size(),
               st.spec->dir);
}

} // namespace

std::vector<RestoredTrial> read_experiment_state(const std::string& dir, std::string* name) {
  auto path = (fs::path(dir) / "experiment_state.json").string();
  std::error_code ec;
  if (!fs::exists(path, ec))
    throw Error(Errc::invalid_config, "'" + dir + "' holds no experiment (no experiment_state.json); "
                                      "give the directory of a Tuner's experiment");
  json state;
  try {
    auto bytes = read_file(path);
    state = json::parse(bytes.begin(), bytes.end());
    std::vector<RestoredTrial> out;
    for (auto& t : state.at("trials")) {
      RestoredTrial r;
      r.id = t.at("trial_id").get<std::string>();
      r.config = config_from_json(t.at("config"));
      r.status = t.at("status").get<std::string>();
      r.last = metrics_from_json(t.at("last_result"));
      r.checkpoint = t.value("checkpoint", "");
      r.error = t.value("error", "");
      out.push_back(std::move(r));
    }
    if (name)
      *name = state.at("name").get<std::string>();
    return out;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(Errc::corrupt_checkpoint, "the experiment state '" + path + "' is not valid: " + e.what());
  }
}

namespace {

void start(Self self) {
  auto& st = self->state;
  if (st.started)
    return;
  st.started = true;
  st.started_at = std::chrono::steady_clock::now();
  st.pool = system_pool(self->system()); // the cluster's, when the program connected to one
  st.tty = isatty(fileno(stdout)) != 0;
  auto budget = tune_config(self).time_budget_s;
  if (budget > 0)
    self->delayed_send(self, std::chrono::milliseconds(static_cast<int64_t>(budget * 1000)),
                       budget_atom::value);
  if (st.spec->options.verbose > 0 && st.tty)
    self->delayed_send(self, std::chrono::milliseconds(static_cast<int64_t>(
                               std::max(0.1, st.spec->options.report_interval_s) * 1000)),
                       table_atom::value);
  write_state(self);
  request_slot(self);
  maybe_finish(self);
}

/// The trial a control message names, if it is still live.
Trial* live_trial(Self self, const TrialId& id) {
  auto i = self->state.trials.find(id);
  return i == self->state.trials.end() || !live(i->second) ? nullptr : &i->second;
}

} // namespace

caf::behavior tuner_actor(caf::stateful_actor<TunerState>* self, std::shared_ptr<TunerSpec> spec) {
  auto& st = self->state;
  st.spec = std::move(spec);
  auto& tc = st.spec->options.tune_config;
  st.searcher = tc.search_alg;
  st.scheduler = tc.scheduler;
  char prefix[8];
  std::snprintf(prefix, sizeof(prefix), "%05x",
                static_cast<unsigned>(std::random_device{}() & 0xfffff));
  st.id_prefix = prefix;
  restore_trials(self);
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& st = self->state;
    if (st.runs.count(dm.source))
      return on_run_done(self, dm.source, std::nullopt);
    remove_subscriber(st.subscribers, dm.source);
  });
  return {
    // -- callers --
    [=](fit_atom) {
      auto rp = promise_result(self, self->state.result, self->state.fit_promises);
      start(self);
      return rp;
    },
    [=](start_atom) { start(self); },
    [=](subscribe_atom, caf::actor& subscriber) {
      add_subscriber(self, std::move(subscriber), self->state.result, self->state.subscribers);
    },
    [=](unsubscribe_atom, const caf::actor& subscriber) {
      remove_subscriber(self->state.subscribers, subscriber.address());
    },
    [=](status_atom) { return status_of(self); },
    [=](cancel_atom) {
      if (!self->state.started) {
        self->state.started = true;
        self->state.error = RunError{Errc::cancelled, "the experiment was cancelled"};
        return finish(self);
      }
      end_experiment(self, RunError{Errc::cancelled, "the experiment was cancelled"},
                     TunerState::Stop::pause);
    },
    [=](budget_atom) {
      spdlog::info("caftrain: Tuner {}: time_budget_s of {} s is spent; stopping its trials",
                   self->state.spec->name, tune_config(self).time_budget_s);
      end_experiment(self, std::nullopt);
    },
    [=](table_atom) {
      if (self->state.result)
        return;
      print_table(self, false);
      self->delayed_send(self, std::chrono::milliseconds(static_cast<int64_t>(
                                 std::max(0.1, self->state.spec->options.report_interval_s) * 1000)),
                         table_atom::value);
    },
    // -- trials --
    [=](stop_trial_atom, const TrialId& id) {
      auto t = live_trial(self, id);
      if (!t)
        return false;
      bool running = busy(*t) && t->status == TrialStatus::RUNNING;
      if (busy(*t))
        stop_run(self, *t, TunerState::Stop::terminate);
      if (running)
        self->state.scheduler->on_trial_complete(t->id, t->last);
      else
        self->state.scheduler->on_trial_remove(t->id);
      end_trial(self, *t, TrialStatus::TERMINATED);
      write_state(self);
      wake(self);
      maybe_finish(self);
      return true;
    },
    [=](pause_trial_atom, const TrialId& id) {
      auto t = live_trial(self, id);
      if (!t)
        return false;
      t->held = true;
      if (t->status == TrialStatus::RUNNING)
        stop_run(self, *t, TunerState::Stop::pause);
      t->status = TrialStatus::PAUSED;
      print_event(self, "paused", *t);
      write_state(self);
      return true;
    },
    [=](resume_trial_atom, const TrialId& id) {
      auto t = live_trial(self, id);
      if (!t || t->status != TrialStatus::PAUSED)
        return false;
      t->held = false;
      t->status = TrialStatus::PENDING; // starts once placed (after its run has ended)
      write_state(self);
      wake(self);
      return true;
    },
    // -- the trials' runs (we subscribe to each) --
    [=](ReportRecord& rec) { on_report(self, rec); },
    [=](done_atom, Result& r) {
      auto sender = caf::actor_cast<caf::actor_addr>(self->current_sender());
      on_run_done(self, sender, std::move(r));
    },
  };
}

} // namespace caftrain::tune
