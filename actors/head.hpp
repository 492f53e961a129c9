// The head of a cluster (`caftrain head`): the registry of nodes and runs, and the
// cluster's resource pool.
#pragma once

#include <map>
#include <set>
#include <string>

#include <caf/actor.hpp>
#include <caf/fwd.hpp>
#include <caf/node_id.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/cluster.hpp"

namespace caftrain {

/// What a head actor needs to know of its process.
struct HeadConfig {
  /// The token every node and driver must present, and the file it is in (the jobs the
  /// head runs read it there).
  std::string token;
  std::string token_file;
  /// The head's directory: `jobs/<id>/output.log` holds each job's output.
  std::string storage;
  /// Known to this process only: messages from it (the head's address, a job's end)
  /// carry it, since an anonymous message may come from any peer.
  std::string secret;
};

/// (head_address_atom, "host:port", secret): where the head is published, told once it
/// is: the jobs it runs connect there.
using head_address_atom = caf::atom_constant<caf::atom("claddress")>;

/// State of a head actor.
struct HeadState {
  static inline const char* name = "caftrain.head";
  HeadConfig config;
  std::string address;
  /// Jobs by id (kept after they end, for `caftrain logs`), the runs their drivers
  /// registered (run name -> job id), and the jobs asked to stop.
  std::map<std::string, JobView> jobs;
  std::map<std::string, std::string> run_jobs;
  std::set<std::string> stopping;
  /// The pool of the cluster's nodes.
  caf::actor pool;
  /// Live nodes by id, with their agents.
  std::map<std::string, NodeView> nodes;
  std::map<std::string, caf::actor> agents;
  /// Registered runs by name.
  std::map<std::string, RunView> runs;
  /// Machines that presented the token: only they may launch, register, stop or ask.
  std::set<caf::node_id> trusted;
};

/// Serves a cluster: nodes join (join_atom) and leave (their agent goes down: the pool
/// drops the node and the runs placed on it are told, within CAF's connection timeout
/// for a node that stops answering); drivers connect (connect_atom), use the pool and
/// reach the nodes' agents at the addresses the status lists; runs register, can be
/// listed and stopped, and when a run's driver is gone its nodes stop its processes.
/// Joins and connects with another token or protocol version are refused. Jobs
/// (job_submit_atom) are driver programs the head starts on its own machine, their output
/// in a file under the head's storage (job_logs_atom reads it). The head reads and writes
/// files: spawn it detached.
caf::behavior head_actor(caf::stateful_actor<HeadState>* self, HeadConfig config);

/// What a `caftrain head` process runs: publishes a head actor on `host:port` (port 0
/// picks a free one), writes "host:port" to `address_file` when not empty, prints it,
/// and serves until the process is ended. Returns the process's exit status.
struct HeadOptions {
  std::string host = "0.0.0.0";
  uint16_t port = 6380;
  std::string token_file = "";
  std::string address_file = "";
  /// The head's directory (jobs' output); "" is ~/.caftrain/head.
  std::string storage = "";
};
int run_head(caf::actor_system& system, const HeadOptions& options);

} // namespace caftrain
