// Every atom and message type of caftrain's actors, declared once; `init` registers them.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <caf/atom.hpp>
#include <caf/meta/type_name.hpp>

#include "actors/result.hpp"
#include "checkpoint/checkpoint.hpp"

namespace caf {
class actor_system_config;
}

namespace caftrain {

// -- atoms --------------------------------------------------------------------------------

/// (fit_atom) -> Result: starts the run if needed and answers when it ends.
using fit_atom = caf::atom_constant<caf::atom("fit")>;
/// (start_atom): starts the run without waiting for it.
using start_atom = caf::atom_constant<caf::atom("start")>;
/// (subscribe_atom, actor): the actor receives every ReportRecord, then (done_atom, Result).
using subscribe_atom = caf::atom_constant<caf::atom("subscribe")>;
/// (unsubscribe_atom, actor): stops sending to the actor.
using unsubscribe_atom = caf::atom_constant<caf::atom("unsubscr")>;
/// (status_atom) -> RunStatus.
using status_atom = caf::atom_constant<caf::atom("status")>;
/// (cancel_atom): stops the run; it ends with Result.error (cancelled).
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
/// (done_atom, Result): sent to subscribers when the run ends.
using done_atom = caf::atom_constant<caf::atom("done")>;
/// (report_atom, WorkerReport) -> (ack_atom, Checkpoint): a rank's report; answered when
/// complete, with the checkpoint it persisted (an invalid one when it carried none).
using report_atom = caf::atom_constant<caf::atom("report")>;
/// Acknowledges a report.
using ack_atom = caf::atom_constant<caf::atom("ack")>;
/// (worker_exit_atom, WorkerExit): a worker's training thread ended.
using worker_exit_atom = caf::atom_constant<caf::atom("wexit")>;
/// (report_timeout_atom, attempt, index): internal timer of a report round.
using report_timeout_atom = caf::atom_constant<caf::atom("rtimeout")>;
/// (grace_atom, attempt): internal timer of a stopping attempt.
using grace_atom = caf::atom_constant<caf::atom("grace")>;
/// (tick_atom): a worker actor's periodic look at its thread's heartbeat.
using tick_atom = caf::atom_constant<caf::atom("tick")>;
/// (stalled_atom, rank, attempt, seconds): a worker's thread shows no progress.
using stalled_atom = caf::atom_constant<caf::atom("stalled")>;
/// (persist_atom, PersistRequest) -> Checkpoint: commits a checkpoint (persister actor).
using persist_atom = caf::atom_constant<caf::atom("persist")>;

// -- message types --------------------------------------------------------------------------

/// A rank's report to the trainer actor.
struct WorkerReport {
  int64_t rank = 0;
  int64_t attempt = 0;
  /// 0-based index of the report within the run (continues after a restore).
  int64_t index = 0;
  Metrics metrics;
  /// Directory of this rank's checkpoint files, or "".
  std::string checkpoint_dir;
  /// Name of the checkpoint's directory in the run directory; "" (default) names it
  /// checkpoint_<index>.
  std::string checkpoint_dir_name;
};

/// The end of a worker's training thread.
struct WorkerExit {
  int64_t rank = 0;
  int64_t attempt = 0;
  /// Set when train_func threw.
  bool failed = false;
  RunError error;
};

/// Asks the persister to commit the files of `sources` as checkpoint `final_path`.
struct PersistRequest {
  std::string final_path;
  std::vector<std::string> sources;
  CheckpointMetadata metadata;
};

// -- inspect ----------------------------------------------------------------------------------

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, FileDigest& x) {
  return f(caf::meta::type_name("FileDigest"), x.size, x.crc32);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, CheckpointMetadata& x) {
  return f(caf::meta::type_name("CheckpointMetadata"), x.format_version, x.run, x.attempt,
           x.report_index, x.epoch, x.global_step, x.metrics, x.world_size, x.strategy,
           x.created_at, x.files);
}

/// A checkpoint travels as its path and metadata.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, Checkpoint& x) {
  return f(caf::meta::type_name("Checkpoint"), x.path_, x.metadata_, x.committed_);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RunError& x) {
  return f(caf::meta::type_name("RunError"), x.code, x.message, x.rank, x.attempt);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ReportRecord& x) {
  return f(caf::meta::type_name("ReportRecord"), x.run, x.index, x.attempt, x.metrics,
           x.all_metrics, x.checkpoint_path, x.timestamp);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RunStatus& x) {
  return f(caf::meta::type_name("RunStatus"), x.state, x.states, x.waiting_reason, x.attempt,
           x.failures, x.reports, x.latest, x.path);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, WorkerReport& x) {
  return f(caf::meta::type_name("WorkerReport"), x.rank, x.attempt, x.index, x.metrics,
           x.checkpoint_dir, x.checkpoint_dir_name);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, WorkerExit& x) {
  return f(caf::meta::type_name("WorkerExit"), x.rank, x.attempt, x.failed, x.error);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PersistRequest& x) {
  return f(caf::meta::type_name("PersistRequest"), x.final_path, x.sources, x.metadata);
}

/// std::optional of one of our types: a presence flag and the value.
template <class Inspector, class T>
typename std::enable_if<Inspector::reads_state, typename Inspector::result_type>::type
inspect(Inspector& f, std::optional<T>& x) {
  bool present = x.has_value();
  T value = present ? *x : T{};
  return f(present, value);
}

template <class Inspector, class T>
typename std::enable_if<Inspector::writes_state, typename Inspector::result_type>::type
inspect(Inspector& f, std::optional<T>& x) {
  bool present = false;
  T value{};
  auto result = f(present, value);
  if (present)
    x = std::move(value);
  else
    x.reset();
  return result;
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, Result& x) {
  return f(caf::meta::type_name("Result"), x.metrics, x.metrics_history, x.checkpoint,
           x.best_checkpoints, x.path, x.error, x.attempts);
}

// -- registration ---------------------------------------------------------------------------

/// Registers caftrain's message types, error category and options with `cfg`; call it
/// before constructing the actor_system, in every process of a run.
void init(caf::actor_system_config& cfg);

/// A caf::error of caftrain's category.
caf::error make_caf_error(Errc code, const std::string& message);

/// The Errc and message of a caf::error (of any category).
RunError to_run_error(const caf::error& err, int64_t rank = -1, int64_t attempt = 0);

} // namespace caftrain
