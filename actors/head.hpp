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

/// State of a head actor.
struct HeadState {
  static inline const char* name = "caftrain.head";
  /// The token every node and driver must present.
  std::string token;
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
/// listed and stopped, and when a run's driver is gone its nodes stop its processes. Joins and connects with another token or protocol version are refused.
caf::behavior head_actor(caf::stateful_actor<HeadState>* self, std::string token);

/// What a `caftrain head` process runs: publishes a head actor on `host:port` (port 0
/// picks a free one), writes "host:port" to `address_file` when not empty, prints it,
/// and serves until the process is ended. Returns the process's exit status.
struct HeadOptions {
  std::string host = "0.0.0.0";
  uint16_t port = 6380;
  std::string token_file = "";
  std::string address_file = "";
};
int run_head(caf::actor_system& system, const HeadOptions& options);

} // namespace caftrain
