// The pool actor: serves a ResourcePool to every job of a process (and, later, of a
// cluster's head): placements on request, queued with a visible reason when busy.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>
#include <caf/meta/type_name.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/resource_pool.hpp"

namespace caftrain {

// -- messages -----------------------------------------------------------------------------

/// (pool_request_atom, PlacementRequest) -> Placement: answered once placed (at once
/// when it fits, later when resources free up); an `invalid_config` error when the pool
/// can never hold it. The placement is released when the requester sends
/// pool_release_atom or terminates.
using pool_request_atom = caf::atom_constant<caf::atom("plrequest")>;
/// (pool_release_atom, placement id): returns a placement's resources.
using pool_release_atom = caf::atom_constant<caf::atom("plrelease")>;
/// (pool_status_atom) -> PoolStatus.
using pool_status_atom = caf::atom_constant<caf::atom("plstatus")>;
/// (pool_reason_atom, owner) -> std::string: why owner's request waits ("" if it does not).
using pool_reason_atom = caf::atom_constant<caf::atom("plreason")>;
/// (pool_add_node_atom, node id, ResourceSet): adds a node (or updates its totals).
using pool_add_node_atom = caf::atom_constant<caf::atom("pladdnode")>;
/// (pool_remove_node_atom, node id): removes a node (a cluster's node that was lost);
/// the holder of each placement with a bundle on it gets (pool_lost_atom, placement id,
/// node id): that placement is gone, its workers there with it.
using pool_remove_node_atom = caf::atom_constant<caf::atom("plrmnode")>;
using pool_lost_atom = caf::atom_constant<caf::atom("pllost")>;
/// (pool_backup_atom, PlacementRequest, placement id, node id) -> std::vector<std::string>:
/// the node of each bundle if that node were lost (`ResourcePool::placement_without`),
/// empty when the request would not fit then.
using pool_backup_atom = caf::atom_constant<caf::atom("plbackup")>;

/// What the pool holds and who waits.
struct PoolStatus {
  std::vector<PoolNode> nodes;
  std::vector<Placement> placements;
  /// Queued requests with the reason each waits, in submission order.
  std::vector<PendingRequest> pending;
};

/// A resource set travels as its amounts in 1/10000 units.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, ResourceSet& x) {
  return f(caf::meta::type_name("ResourceSet"), x.units_);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PlacementRequest& x) {
  return f(caf::meta::type_name("PlacementRequest"), x.owner, x.bundles, x.strategy);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, Placement& x) {
  return f(caf::meta::type_name("Placement"), x.id, x.owner, x.nodes, x.bundles);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PoolNode& x) {
  return f(caf::meta::type_name("PoolNode"), x.id, x.total, x.available);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PendingRequest& x) {
  return f(caf::meta::type_name("PendingRequest"), x.ticket, x.request, x.reason);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, PoolStatus& x) {
  return f(caf::meta::type_name("PoolStatus"), x.nodes, x.placements, x.pending);
}

/// Registers the pool's message types (called by caftrain::init).
void add_pool_message_types(caf::actor_system_config& cfg);

// -- the actor ----------------------------------------------------------------------------

/// State of a pool actor.
struct PoolState {
  static inline const char* name = "caftrain.pool";

  /// A request that waits, with who asked and the promise to keep.
  struct Waiter {
    caf::actor_addr requester;
    caf::response_promise promise;
  };

  ResourcePool pool;
  /// Queued tickets.
  std::map<uint64_t, Waiter> waiters;
  /// Holder of each placement.
  std::map<uint64_t, caf::actor_addr> holders;
};

/// Serves `nodes` (id -> totals). Requesters are monitored: a requester that terminates
/// releases what it holds and withdraws what it waits for.
caf::behavior pool_actor(caf::stateful_actor<PoolState>* self, std::map<std::string, ResourceSet> nodes);

/// The resources of this machine: {CPU: hardware threads, GPU: visible CUDA devices}.
ResourceSet local_node_resources();

/// The pool actor of this actor system, serving this machine as node "local": spawned on
/// first use (hidden: it never delays the system's shutdown) and alive while a job holds
/// it. Every TorchTrainer of the system places its workers through it.
caf::actor local_pool(caf::actor_system& system);

} // namespace caftrain
