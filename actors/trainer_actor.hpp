// The trainer actor: supervises one run's workers, collects reports, has its checkpoints
// persisted and restarts the group after failures. Its I/O actor (the persister) does the
// disk work, its store server the rendezvous.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/cluster.hpp"
#include "actors/messages.hpp"
#include "actors/pool_actor.hpp"
#include "actors/worker.hpp"
#include "checkpoint/checkpoint_manager.hpp"

namespace caftrain {

class SparePool; // actors/process_launcher.hpp

/// State of a trainer actor (one per run).
struct TrainerState {
  static inline const char* name = "caftrain.trainer";

  /// One report round: what each rank reported and who waits for the round to complete.
  struct Round {
    std::vector<std::optional<WorkerReport>> reports;
    std::vector<caf::response_promise> promises;
    size_t arrived = 0;
    bool persisting = false;
  };

  /// What to do once a stopping attempt's threads have exited: decide between restart
  /// and finish from the failure that caused the stop, or finish.
  enum class AfterStop { decide, finish };

  std::shared_ptr<RunSpec> spec;
  /// See RunStatus: the current state and every state so far.
  std::string state = "pending";
  std::vector<std::string> states = {"pending"};
  int64_t attempt = -1;
  /// Number of the first attempt: 0, or one past the last attempt of a restored run.
  int64_t first_attempt = 0;
  int64_t failures = 0;
  // -- the current attempt --
  std::vector<caf::actor> workers;
  std::set<int64_t> running;
  std::set<int64_t> succeeded;
  bool stopping = false;
  /// The failure that is stopping the attempt (the most telling one seen).
  std::optional<RunError> cause;
  AfterStop after_stop = AfterStop::finish;
  // -- resources --
  /// The resource pool the workers are placed through (local_pool of the system).
  caf::actor pool;
  /// True while the pool has not granted the run's bundles yet.
  bool placing = false;
  /// Why the pool makes the run wait ("" when it does not).
  std::string waiting_reason;
  /// The granted bundles; released when the run ends.
  std::optional<Placement> placement;
  /// What the run asked the pool for (unset when its caller placed it).
  std::optional<PlacementRequest> placement_request;
  /// True when a node of `placement` was lost: the next attempt asks the pool again.
  bool placement_lost = false;
  /// The cluster this run's workers are placed on (the driver connected to one).
  std::optional<ClusterHandle> cluster;
  /// Node of each rank of the current attempt ("local" off a cluster).
  std::vector<std::string> rank_nodes;
  /// The agents of the cluster's nodes this driver connected to directly, by node id.
  std::map<std::string, caf::actor> agents;
  // -- worker processes (ScalingConfig.worker_mode "process") --
  /// The run's hub, where its worker processes connect (published on `hub_port`).
  caf::actor hub;
  uint16_t hub_port = 0;
  /// The hub's warm spares (FailureConfig::warm_spares), else null.
  std::shared_ptr<SparePool> spares;
  /// The run's rendezvous store (store_server.hpp), an actor of its own.
  caf::actor store;
  // -- reports and checkpoints --
  std::map<int64_t, Round> rounds;
  int64_t next_index = 0;
  std::vector<ReportRecord> history;
  std::unique_ptr<CheckpointManager> manager;
  std::optional<Checkpoint> initial_checkpoint;
  /// The latest checkpoint the run directory held when the actor started ("" if none).
  std::string adopted_latest;
  /// Reports the run directory's history held then (where a foreign checkpoint resumes).
  int64_t adopted_reports = 0;
  caf::actor persister;
  /// Checkpoints sent to the persister and not committed (or failed) yet.
  int64_t persists_in_flight = 0;
  /// A restart decided while checkpoints were in flight: the next attempt starts once
  /// they are committed, so that it starts from the newest one and never reuses the
  /// report indices (and checkpoint names) of a late commit.
  bool restart_after_persists = false;
  /// The id written into the run directory, by which a worker process tells whether it
  /// sees the driver's storage (else its checkpoints travel as messages).
  std::string storage_id;
  /// The run's file gate (file_gate), through which worker processes that do not see
  /// the storage upload and fetch checkpoint files.
  caf::actor files;
  // -- callers --
  std::vector<caf::actor> subscribers;
  std::vector<caf::response_promise> fit_promises;
  std::optional<RunError> error;
  std::optional<Result> result;
  bool stop_criteria_met = false;
};

/// Starts no worker until started (start_atom or fit_atom). See messages.hpp for the
/// protocol: fit, start, subscribe, unsubscribe, status, cancel from callers; report and
/// worker_exit from workers. Workers rendezvous at the run's store server (`store`).
caf::behavior trainer_actor(caf::stateful_actor<TrainerState>* self, std::shared_ptr<RunSpec> spec);

struct FileGateState {
  static inline const char* name = "caftrain.files";
  caf::actor persister;
  /// The run's directory.
  std::string dir;
  /// Files of the checkpoints the trainer handed to worker processes, by checkpoint path.
  std::map<std::string, std::set<std::string>> served;
};

/// The run's door for checkpoint files that travel as messages (worker processes that do
/// not see the run's storage; see checkpoint_transfer.hpp): uploads go to the persister
/// with the run's directory, fetches only for files of checkpoints the trainer handed out
/// (`(serve_files_atom, path, files)` from the trainer). An actor of its own, so that
/// the pieces of a checkpoint never queue in the trainer's mailbox ahead of reports,
/// exits and heartbeats.
caf::behavior file_gate(caf::stateful_actor<FileGateState>* self, caf::actor persister, std::string dir);

/// The persister: commits checkpoints on its own thread (spawn it detached).
caf::behavior persister_actor(caf::event_based_actor* self);

} // namespace caftrain
