// Clusters: a head (`caftrain head`), nodes that join it (`caftrain node`), and drivers:
// programs that connect with an address (Ray's `ray.init(address=...)`) and then place
// the worker processes of every TorchTrainer on the cluster's nodes.
//
// The head serves the cluster's resource pool (the same pool actor a process serves for
// its own machine), the registry of nodes and of runs. A node agent reports its
// resources, starts worker processes (the driver's own binary, started again on the node
// as torchrun or MPI do) and stands for them through launcher actors. Every connection
// presents the cluster's token (read from a file, never from the command line) and the
// protocol version; a wrong one is refused with a message and changes nothing.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/expected.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>

#include "actors/pool_actor.hpp"

namespace caftrain {

/// Version of the messages between heads, nodes and drivers; peers of another version
/// are refused by name.
/// (2: jobs, `caftrain submit` / `logs`.)
constexpr int32_t kClusterProtocol = 2;

// -- messages -------------------------------------------------------------------------------

/// (join_atom, JoinRequest) -> std::string (the node's id): a node agent joins the head.
using join_atom = caf::atom_constant<caf::atom("cljoin")>;
/// (connect_atom, ClientHello) -> ClusterHandle: a driver or a `caftrain` command connects.
using connect_atom = caf::atom_constant<caf::atom("clconnect")>;
/// (launch_atom, LaunchSpec) -> caf::actor: a node agent starts a rank's process and
/// answers with its launcher (drivers connect to the agent directly, at its address).
using launch_atom = caf::atom_constant<caf::atom("cllaunch")>;
/// (cluster_status_atom) -> ClusterStatus.
using cluster_status_atom = caf::atom_constant<caf::atom("clstatus")>;
/// (run_register_atom, RunView): a driver's run appears in the head's registry until its
/// trainer actor ends.
using run_register_atom = caf::atom_constant<caf::atom("clrunreg")>;
/// (run_stop_atom, run name) -> bool: cancels a run of the cluster (false: no such run).
using run_stop_atom = caf::atom_constant<caf::atom("clrunstop")>;

/// (job_submit_atom, JobSpec) -> JobView: the head starts a driver program on its own
/// machine (`caftrain submit`, as `ray job submit`).
using job_submit_atom = caf::atom_constant<caf::atom("cljobsub")>;
/// (job_logs_atom, name, offset) -> JobLogs: a job's output from byte `offset` on; `name`
/// is a job's id or the name of a run its driver registered.
using job_logs_atom = caf::atom_constant<caf::atom("cljoblogs")>;
/// (job_stop_atom, id) -> bool: ends a job's driver (SIGTERM, SIGKILL 5 s later).
using job_stop_atom = caf::atom_constant<caf::atom("cljobstop")>;

/// A node agent's request to join.
struct JoinRequest {
  int32_t protocol = kClusterProtocol;
  std::string token;
  /// The node's id in the cluster (unique among the live nodes).
  std::string name;
  /// Host name and pid of the node agent (shown by `caftrain status`).
  std::string host;
  int32_t pid = 0;
  ResourceSet resources;
  caf::actor agent;
  /// "host:port" where the agent is published: drivers connect to it directly.
  std::string address;
};

/// A driver's (or a command's) request to use the cluster.
struct ClientHello {
  int32_t protocol = kClusterProtocol;
  std::string token;
  /// Who connects ("driver <host> pid <pid>"), for the head's log.
  std::string who;
};

/// What a driver uses: the head (launches, run registry) and its resource pool.
struct ClusterHandle {
  caf::actor head;
  caf::actor pool;
};

/// A node as `caftrain status` shows it.
struct NodeView {
  std::string id;
  std::string host;
  int32_t pid = 0;
  ResourceSet total;
  ResourceSet available;
  /// Where the node's agent is published ("host:port").
  std::string address;
};

/// A run registered with the head.
struct RunView {
  std::string name;
  /// The driver's host and pid.
  std::string driver;
  /// The run's trainer actor (ask it status_atom; send it cancel_atom).
  caf::actor trainer;
};

/// A driver program the head is asked to run.
struct JobSpec {
  /// The program (a path valid on the head's machine) and its arguments.
  std::string program;
  std::vector<std::string> args;
  /// Where it runs: a directory on the head's machine ("" or missing there: the job's
  /// own directory in the head's storage).
  std::string working_dir;
  /// Variables set for it on top of the head's environment.
  std::map<std::string, std::string> env;
  /// Who submitted it (host and pid), for the head's log.
  std::string submitter;
};

/// A job as the head tracks it.
struct JobView {
  std::string id;
  /// The command line, for display.
  std::string command;
  /// "running", "succeeded", "failed" or "stopped".
  std::string state;
  /// How it ended in words ("exited with status 3"), "" while it runs.
  std::string end;
  /// Its exit status (-1 while running, 128 + signal when killed by one).
  int32_t exit_code = -1;
  int32_t pid = 0;
  /// The file on the head's machine that holds its output.
  std::string log;
  std::string submitter;
};

/// A piece of a job's output.
struct JobLogs {
  JobView job;
  /// The bytes from the requested offset on (at most 1 MiB), and where the next piece starts.
  std::string text;
  int64_t next_offset = 0;
};

/// The cluster as the head sees it.
struct ClusterStatus {
  std::vector<NodeView> nodes;
  std::vector<RunView> runs;
  /// Jobs submitted to the head, running and ended.
  std::vector<JobView> jobs;
  /// Placement requests waiting for resources, with their reasons.
  std::vector<PendingRequest> pending;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, JoinRequest& x) {
  return f(caf::meta::type_name("JoinRequest"), x.protocol, x.token, x.name, x.host, x.pid,
           x.resources, x.agent, x.address);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ClientHello& x) {
  return f(caf::meta::type_name("ClientHello"), x.protocol, x.token, x.who);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ClusterHandle& x) {
  return f(caf::meta::type_name("ClusterHandle"), x.head, x.pool);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, NodeView& x) {
  return f(caf::meta::type_name("NodeView"), x.id, x.host, x.pid, x.total, x.available, x.address);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, RunView& x) {
  return f(caf::meta::type_name("RunView"), x.name, x.driver, x.trainer);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, JobSpec& x) {
  return f(caf::meta::type_name("JobSpec"), x.program, x.args, x.working_dir, x.env, x.submitter);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, JobView& x) {
  return f(caf::meta::type_name("JobView"), x.id, x.command, x.state, x.end, x.exit_code, x.pid, x.log,
           x.submitter);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, JobLogs& x) {
  return f(caf::meta::type_name("JobLogs"), x.job, x.text, x.next_offset);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ClusterStatus& x) {
  return f(caf::meta::type_name("ClusterStatus"), x.nodes, x.runs, x.jobs, x.pending);
}

/// Registers the cluster's message types (called by caftrain::init).
void add_cluster_message_types(caf::actor_system_config& cfg);

// -- tokens and addresses ----------------------------------------------------------------

/// `$CAFTRAIN_TOKEN_FILE`, else `~/.caftrain/cluster_token`.
std::string default_token_file();

/// Reads the cluster token from `path` ("" is `default_token_file()`). With `create`, a
/// missing file is made with a fresh random token, readable by its owner only (what
/// `caftrain head` does). Throws `Error(invalid_config)` naming the file and the fix when
/// it is missing, empty or readable by others.
std::string read_token(const std::string& path, bool create = false);

/// `$CAFTRAIN_ADDRESS`: the head a driver connects to when it is given no address (the
/// head sets it for the jobs it runs, as Ray sets RAY_ADDRESS); "" when unset.
std::string default_address();

/// Splits "host:port"; throws `Error(invalid_argument)` naming the expected form.
std::pair<std::string, uint16_t> parse_address(const std::string& address);

/// `n` random hexadecimal digits (tokens, worker keys).
std::string random_hex(size_t n);

/// The actor published at `host:port`, trying again every 200 ms until `timeout` is
/// over (a head or node that is still starting); the last error when it never answers.
caf::expected<caf::actor> reach(caf::actor_system& system, const std::string& host, uint16_t port,
                                std::chrono::milliseconds timeout);

// -- drivers ---------------------------------------------------------------------------------

/// How a driver connects.
struct ClusterOptions {
  /// The file holding the cluster's token; "" (default) is `default_token_file()`.
  std::string token_file = "";
  /// How long to try reaching the head. Default 10 s.
  std::chrono::milliseconds timeout = std::chrono::seconds(10);
  /// The address nodes reach this driver at (its worker processes connect to it). ""
  /// (default): 127.0.0.1 when the head is on loopback, else this machine's host name.
  std::string host = "";
};

/// Connects this program to the cluster whose head listens at `address` ("host:port"),
/// as `ray.init(address=...)`: from then on every TorchTrainer of `system` places its
/// workers on the cluster's nodes, as worker processes (ScalingConfig.worker_mode
/// "process"). Throws `Error(unavailable)` when the head cannot be reached and
/// `Error(invalid_config)` when it refuses the token or the protocol version. In a
/// worker process (started by a run of the driver) it does nothing: the worker trains
/// where its node put it.
void connect(caf::actor_system& system, const std::string& address, ClusterOptions options = {});

/// The cluster `system` is connected to, if any.
std::optional<ClusterHandle> cluster_of(caf::actor_system& system);

/// The address the cluster's nodes reach `system` at (see ClusterOptions::host); "" when
/// it is not connected.
std::string advertised_host(caf::actor_system& system);

/// The address a process that reaches the head at `head_host` tells others to reach it
/// at: `given` when set, 127.0.0.1 for a head on loopback, else this machine's host name.
std::string advertise_as(const std::string& given, const std::string& head_host);

/// The pool every job of `system` places its workers through: the cluster's when the
/// system is connected to one, else `local_pool(system)`.
caf::actor system_pool(caf::actor_system& system);

/// "<hostname> pid <pid>": how this process names itself to the head.
std::string process_label();

/// The label of process `pid` of this machine (a job the head started, say).
std::string process_label(int64_t pid);

} // namespace caftrain
