// The worker actor: one rank of a run, training on a thread of its own.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/run_config.hpp"
#include "checkpoint/checkpoint.hpp"
#include "environment/worker_context.hpp"

namespace caftrain {

class ActorSession;
struct WorkerExit;

/// What one run shares with all its workers (stays in this process).
struct RunSpec {
  TrainFunc train_func;
  TorchTrainerOptions options;
  /// Resolved run name and directory.
  std::string name;
  std::string dir;
  /// Bundles placed by the caller (a Tuner's trial, placed through the same pool): the
  /// trainer actor starts on them instead of asking the pool, and leaves releasing them
  /// to the caller. Unset (default): the trainer asks the system's pool and releases.
  std::optional<Placement> placement;
  /// The run resumes (by name) from `options.resume_from_checkpoint` rather than from its
  /// own latest checkpoint, until it has checkpointed anew: a Tuner's PBT exploit, which
  /// restarts a trial from another trial's checkpoint. Default false: its own latest wins.
  bool prefer_initial_checkpoint = false;
  /// Which TorchTrainer of the program this run is: the n-th constructed with
  /// worker_mode "process" (see worker_process.hpp); a worker process started for the
  /// run runs its rank at the trainer of the same number. -1 for thread workers.
  int64_t job = -1;
};

/// What a worker actor needs to start its rank.
struct WorkerSpec {
  std::shared_ptr<const RunSpec> run;
  WorkerContext context;
  /// The trainer actor (reports, exit notices).
  caf::actor trainer;
  /// The run's rendezvous store (store_server.hpp), where gloo groups meet.
  caf::actor store;
  /// The run's file gate (trainer_actor.hpp): checkpoint files of a worker that does not
  /// see the run's storage travel through it (uploads, fetches).
  caf::actor files;
  /// The checkpoint the attempt starts from.
  std::optional<Checkpoint> checkpoint;
  /// Index the rank's first report gets.
  int64_t first_report_index = 0;
  /// The attempt's communicator when the trainer made it (local backend); otherwise the
  /// worker rendezvouses a gloo communicator through the run's store.
  std::shared_ptr<Communicator> communicator;
  /// Where the end of the rank goes: unset (default) sends `(worker_exit_atom,
  /// WorkerExit)` to `trainer`; a worker process hands it to its launcher instead.
  std::function<void(const WorkerExit&)> on_exit;
  /// Receives `(alive_atom)` at every heartbeat check of the worker actor: the launcher
  /// of a worker process, which declares a silent process hung. Default none.
  caf::actor watchdog;
  /// False in a worker process that does not see the driver's storage: its checkpoints
  /// travel to the trainer as messages, and it fetches those it reads.
  bool shared_storage = true;
};

struct WorkerState {
  static inline const char* name = "caftrain.worker";
  std::shared_ptr<ActorSession> session;
};

/// Starts the rank's training thread (train_func under an ActorSession) and stays alive
/// while it runs; when the actor exits (the trainer stops the attempt), the session is
/// stopped and its communicator closed so that the thread ends promptly.
caf::behavior worker_actor(caf::stateful_actor<WorkerState>* self, WorkerSpec spec);

/// Joins the training threads of run `run` that have finished, waiting up to `grace` for
/// the others, which are then detached (they are stuck in user code); threads that
/// `abandon_worker_threads` gave up on are detached at once. Returns how many threads
/// were left behind.
size_t join_worker_threads(const std::string& run, std::chrono::milliseconds grace);

/// Marks the still running training threads of `attempt` of run `run` as abandoned: the
/// trainer waited a stop grace period for them already, so `join_worker_threads` does
/// not wait for them again.
void abandon_worker_threads(const std::string& run, int64_t attempt);

} // namespace caftrain
