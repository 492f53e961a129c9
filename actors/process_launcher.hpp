// The driver's side of worker processes: a hub per run where they connect, and a
// launcher actor per rank that starts its process, stands for it before the trainer
// actor (as a worker actor does for a thread), and turns its death or silence into a
// failure.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/messages.hpp"
#include "actors/worker.hpp"

namespace caftrain {

// -- messages between a worker process and its launcher ----------------------------------

/// (hello_atom, key) -> ProcessAssignment: a worker process asks the hub what to run;
/// the hub hands the request to the launcher registered under the key.
using hello_atom = caf::atom_constant<caf::atom("wphello")>;
/// (started_atom, actor): the worker process's worker actor runs (the launcher stops the
/// rank through it).
using started_atom = caf::atom_constant<caf::atom("wpstarted")>;
/// (alive_atom): the worker process's heartbeat to its launcher.
using alive_atom = caf::atom_constant<caf::atom("wpalive")>;
/// (hub_register_atom, key, launcher) / (hub_unregister_atom, key): internal to the hub.
using hub_register_atom = caf::atom_constant<caf::atom("wpreg")>;
using hub_unregister_atom = caf::atom_constant<caf::atom("wpunreg")>;
/// (reaped_atom, wait status): internal; the launcher's child ended.
using reaped_atom = caf::atom_constant<caf::atom("wpreaped")>;
/// (kill_atom): internal; the stop grace period of the launcher's child is over.
using kill_atom = caf::atom_constant<caf::atom("wpkill")>;
/// (check_atom): internal; the launcher looks at its child's heartbeat and hello.
using check_atom = caf::atom_constant<caf::atom("wpcheck")>;
/// (spare_claimed_atom, key): a launcher took over spare `key`; the hub hands it the
/// spare's hello if the spare is waiting already.
using spare_claimed_atom = caf::atom_constant<caf::atom("wpclaimed")>;
/// (spare_start_atom, LaunchSpec) to a node agent: start a warm spare from the spec for
/// the case that another node is lost (its `spare_slot` names it; see SparePool).
using spare_start_atom = caf::atom_constant<caf::atom("wpspstart")>;
/// (spare_due_atom): internal; the launcher's rank has run a while: its spare starts.
using spare_due_atom = caf::atom_constant<caf::atom("wpspdue")>;

/// What a worker process runs: its rank's context and start, and the run it belongs to.
struct ProcessAssignment {
  WorkerContext context;
  /// The run's trainer actor (reports, heartbeat), its rendezvous store and its file gate.
  caf::actor trainer;
  caf::actor store;
  caf::actor files;
  /// The launcher, which takes the rank's WorkerExit.
  caf::actor launcher;
  std::optional<Checkpoint> checkpoint;
  int64_t first_report_index = 0;
  /// The run's train_loop_config (JSON): the driver's, which a Tuner may have sampled.
  std::string train_loop_config;
  /// The resolved backend ("gloo" or "nccl") and the run's timeouts, in milliseconds.
  std::string backend;
  int64_t report_timeout_ms = 0;
  int64_t collective_timeout_ms = 0;
  int64_t heartbeat_timeout_ms = 0;
  /// The id the driver wrote into the run directory (see checkpoint_transfer.hpp).
  std::string storage_id;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, WorkerContext& x) {
  return f(caf::meta::type_name("WorkerContext"), x.world_rank, x.local_rank, x.node_rank,
           x.world_size, x.local_world_size, x.device, x.num_threads, x.run_name, x.run_dir,
           x.attempt, x.trial_name);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ProcessAssignment& x) {
  return f(caf::meta::type_name("ProcessAssignment"), x.context, x.trainer, x.store, x.files, x.launcher,
           x.checkpoint, x.first_report_index, x.train_loop_config, x.backend,
           x.report_timeout_ms, x.collective_timeout_ms, x.heartbeat_timeout_ms, x.storage_id);
}

/// Registers the worker-process messages (from `caftrain::init`).
void add_worker_process_message_types(caf::actor_system_config& cfg);

// -- warm spares ---------------------------------------------------------------------------

struct LaunchSpec;

/// The warm spare processes on this machine (FailureConfig::warm_spares): at most one
/// per slot and run (its trainer), started while the attempt trains; a slot is a rank
/// of the run (the spare its launcher starts) or a spare the trainer asked this node for
/// in case another node is lost. A spare is the program started as a worker process of
/// the run would be, with a key of its own: it runs up to its TorchTrainer, says hello
/// to the hub and waits there. A restart's launcher of the run claims one (its own
/// slot's first) and answers its hello with the new attempt's assignment, so the restart
/// skips the process start (loading the binary and its libraries, the program's code
/// before fit). The worker process takes its rank's variables (RANK, LOCAL_RANK, ...)
/// from that assignment; only CUDA_VISIBLE_DEVICES, read once by CUDA, must match, so a
/// launcher claims only a spare started with the same value. Shared by a hub and its launchers
/// (one process, hence a mutex): the driver's, for its run, or a node's, for every run
/// that places ranks there. `drop_run` kills a run's unclaimed spares (a node's pool,
/// when the head says the run is over), `close` every unclaimed one.
class SparePool : public std::enable_shared_from_this<SparePool> {
 public:
  /// A spare taken over by a launcher, which now owns its reaper thread: the thread
  /// sends the launcher `(reaped_atom, status)` when the process ends.
  struct Claimed {
    pid_t pid = -1;
    std::string key;
    std::shared_ptr<std::thread> reaper;
    std::shared_ptr<std::atomic<bool>> gone;
  };

  SparePool() = default;
  SparePool(const SparePool&) = delete;
  SparePool& operator=(const SparePool&) = delete;
  ~SparePool();

  /// Starts a spare for `slot` of the run of `spec` (its trainer) from `spec` (its
  /// program, command line and environment, with the spare's own key) unless the slot has
  /// one that is unclaimed and alive. The pool must be owned by a shared_ptr.
  void start(const std::string& slot, const LaunchSpec& spec);

  /// Takes over an unclaimed live spare of the run of `trainer` whose
  /// CUDA_VISIBLE_DEVICES is `devices` for `owner`: `slot`'s if it has one, else any.
  std::optional<Claimed> claim(const std::string& slot, const caf::actor_addr& trainer,
                               const std::string& devices, const caf::actor& owner);

  /// Kills the unclaimed spares of the run whose trainer is actor `id` of `node` (its
  /// end); the spares it claimed are its ranks' processes, stopped with them.
  void drop_run(const caf::node_id& node, caf::actor_id id);


  /// Whether `key` is a spare's; `owner` is then set to its owner (invalid: unclaimed).
  bool find(const std::string& key, caf::actor& owner);

  /// Kills the unclaimed spares and waits for them; later `start`s start nothing.
  void close();

 private:
  struct Spare {
    std::string slot;
    caf::actor_addr trainer;
    /// Its CUDA_VISIBLE_DEVICES.
    std::string devices;
    pid_t pid = -1;
    bool dropped = false;
    caf::actor owner;
    std::shared_ptr<std::thread> reaper;
    std::shared_ptr<std::atomic<bool>> gone;
  };

  mutable std::mutex mtx_;
  std::map<std::string, Spare> spares_; // by key
  bool closed_ = false;
  /// Reaper threads of spares that ended unclaimed, joined by `close`.
  std::vector<std::shared_ptr<std::thread>> ended_;
};

// -- the hub ---------------------------------------------------------------------------------

struct HubState {
  static inline const char* name = "caftrain.hub";
  std::map<std::string, caf::actor> launchers;
  /// Hellos of spares nobody has claimed yet, by key.
  std::map<std::string, caf::response_promise> parked;
};

/// Hands each worker process's hello to the launcher of its key; refuses unknown keys
/// (a process of an attempt that is over). A spare's hello waits until a launcher claims
/// the spare. `spares` may be null; the hub closes it when it ends.
caf::behavior hub_actor(caf::stateful_actor<HubState>* self, std::shared_ptr<SparePool> spares);

// -- the launcher ------------------------------------------------------------------------------

/// What a launcher needs to start one rank's process, wherever it runs: in the driver
/// (worker processes on this machine) or in a node agent (a cluster's node), which is
/// why it is a message type and names no RunSpec.
struct LaunchSpec {
  /// What the process is told at its hello (`launcher` is filled in by the launcher).
  ProcessAssignment assignment;
  /// The rank's key at the hub (one per rank and attempt).
  std::string key;
  /// The binary to start: "/proc/self/exe" in the driver, the driver's own path on a node
  /// (a path valid on every node, as with torchrun or MPI).
  std::string program;
  /// Command line and extra environment of the process; the launcher adds the hub's
  /// address (CAFTRAIN_WORKER_HUB, MASTER_ADDR, MASTER_PORT) and its own pid.
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
  /// RunConfig.stop_grace, in milliseconds.
  int64_t stop_grace_ms = 0;
  /// The rank's place among warm spares (FailureConfig::warm_spares): "" for none, else
  /// the run and rank. The launcher takes over the spare of its slot, if one is there,
  /// instead of starting a process, and once its process runs has the next spare started.
  std::string spare_slot;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, LaunchSpec& x) {
  return f(caf::meta::type_name("LaunchSpec"), x.assignment, x.key, x.program, x.argv, x.env,
           x.stop_grace_ms, x.spare_slot);
}

/// Where the launcher's process connects: the hub actor and its published address.
struct HubAddress {
  caf::actor hub;
  std::string host;
  uint16_t port = 0;
  /// The hub's warm spares (may be null).
  std::shared_ptr<SparePool> spares;
};

struct LauncherState {
  static inline const char* name = "caftrain.launcher";
  LaunchSpec spec;
  HubAddress hub;
  pid_t pid = -1;
  /// Waits for the child and tells the launcher (joined when the launcher ends).
  std::shared_ptr<std::thread> reaper;
  /// The worker actor in the child, once it runs.
  caf::actor worker;
  bool hello = false;
  bool stopping = false;
  bool killed = false;
  std::chrono::steady_clock::time_point started;
  std::chrono::steady_clock::time_point last_alive;
  /// What the child said of its rank's end, before it exited.
  std::optional<WorkerExit> exit;
};

/// Starts the rank's process and stands for it: the trainer monitors and stops the
/// launcher as it does a worker actor. The launcher hands the trainer exactly one
/// WorkerExit, once the process is gone: the child's own, or a failure naming how it
/// ended (a signal, an exit status, silence past heartbeat_timeout, no hello within the
/// collective timeout). Stopped, it asks the child to stop and kills it (SIGKILL) when
/// it has not exited after RunConfig.stop_grace.
caf::behavior launcher_actor(caf::stateful_actor<LauncherState>* self, LaunchSpec spec, HubAddress hub);

/// Adds to `env` where a worker process finds `hub` (CAFTRAIN_WORKER_HUB, MASTER_ADDR,
/// MASTER_PORT), its parent (this process) and this system's TLS files.
void add_hub_environment(const caf::actor_system& system, const HubAddress& hub,
                         std::map<std::string, std::string>& env);

/// Sets `CAFTRAIN_TLS_CERT`, `_KEY` and `_CA` in `env` to `system`'s TLS files when it
/// uses TLS: a caftrain process it starts (a worker process, a job's driver) then
/// connects with the same identity (see `tls_from_environment`).
void add_tls_environment(const caf::actor_system& system, std::map<std::string, std::string>& env);

} // namespace caftrain
