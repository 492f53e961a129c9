// A cluster's node (`caftrain node`): joins the head with its resources and starts the
// worker processes that runs place on it.
#pragma once

#include <map>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/process_launcher.hpp"

namespace caftrain {

/// (run_gone_atom, node_id, actor_id of the trainer): the head tells every node that a run's trainer
/// actor (its driver) is gone; the node stops that run's worker processes.
using run_gone_atom = caf::atom_constant<caf::atom("clrungone")>;

/// State of a node agent.
struct NodeAgentState {
  static inline const char* name = "caftrain.node";
  /// Where this node's worker processes connect (on this machine).
  HubAddress hub;
  /// The node's id in the cluster.
  std::string id;
  /// Every launcher running here, with the trainer actor it answers to.
  std::map<caf::actor_addr, caf::actor_addr> trainer_of;
  std::map<caf::actor_addr, caf::actor> launchers;
};

/// Starts worker processes on request: (launch_atom, LaunchSpec) -> the launcher actor
/// standing for the process (see process_launcher.hpp). A program that does not exist
/// on this node is refused, naming it. Stops the processes of a run whose driver is gone
/// (run_gone_atom): a worker process dies with its node, not with its driver.
caf::behavior node_agent_actor(caf::stateful_actor<NodeAgentState>* self, std::string id, HubAddress hub);

/// What `caftrain node` is given.
struct NodeOptions {
  /// The head's "host:port".
  std::string head;
  /// The node's id in the cluster. Default "<hostname>-<pid>".
  std::string name = "";
  /// CPUs offered. Default 0: the machine's hardware threads.
  double cpus = 0;
  /// GPUs offered. Default -1: the CUDA devices visible to this process.
  double gpus = -1;
  /// Custom resources by name.
  std::map<std::string, double> custom = {};
  /// The cluster token's file; "" is `default_token_file()`.
  std::string token_file = "";
  /// The address drivers reach this node at (its agent listens on every interface).
  /// "" (default): 127.0.0.1 when the head is on loopback, else the host name.
  std::string host = "";
};

/// Joins the cluster and serves it until the head is gone (or the process is ended).
/// Returns the exit status: 2 when the head cannot be reached or refuses the node, 1
/// when the head goes away later. The node's worker processes end with it.
int run_node(caf::actor_system& system, const NodeOptions& options);

} // namespace caftrain
