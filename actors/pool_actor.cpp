#include "actors/pool_actor.hpp"

#include <algorithm>
#include <mutex>
#include <thread>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include "actors/messages.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace {

using Self = caf::stateful_actor<PoolState>*;

/// Keeps the promises of requests that a change of the pool granted.
void deliver(Self self, const std::vector<std::pair<uint64_t, Placement>>& granted) {
  auto& st = self->state;
  for (auto& [ticket, placement] : granted) {
    auto w = st.waiters.find(ticket);
    if (w == st.waiters.end()) {
      st.pool.release(placement.id); // its requester is gone
      continue;
    }
    st.holders[placement.id] = w->second.requester;
    spdlog::debug("caftrain: pool granted {} to {} after waiting", placement.bundles.size(),
                  placement.owner);
    w->second.promise.deliver(placement);
    st.waiters.erase(w);
  }
}

/// Releases the placements of `holder` and withdraws what it waits for.
void forget(Self self, const caf::actor_addr& holder) {
  auto& st = self->state;
  for (auto w = st.waiters.begin(); w != st.waiters.end();) {
    if (w->second.requester == holder) {
      st.pool.withdraw(w->first);
      w = st.waiters.erase(w);
    } else {
      ++w;
    }
  }
  std::vector<uint64_t> held;
  for (auto& [id, addr] : st.holders)
    if (addr == holder)
      held.push_back(id);
  for (auto id : held) {
    st.holders.erase(id);
    deliver(self, st.pool.release(id));
  }
}

} // namespace

void add_pool_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<ResourceSet>("caftrain::ResourceSet");
  cfg.add_message_type<PlacementRequest>("caftrain::PlacementRequest");
  cfg.add_message_type<Placement>("caftrain::Placement");
  cfg.add_message_type<PoolNode>("caftrain::PoolNode");
  cfg.add_message_type<PendingRequest>("caftrain::PendingRequest");
  cfg.add_message_type<PoolStatus>("caftrain::PoolStatus");
}

caf::behavior pool_actor(caf::stateful_actor<PoolState>* self, std::map<std::string, ResourceSet> nodes) {
  for (auto& [id, total] : nodes)
    self->state.pool.add_node(id, total);
  self->set_down_handler([=](caf::down_msg& dm) { forget(self, dm.source); });
  return {
    [=](pool_request_atom, PlacementRequest& request) {
      auto& st = self->state;
      // Before make_response_promise, which takes the sender out of the current message.
      auto requester = self->current_sender();
      auto rp = self->make_response_promise();
      try {
        auto [ticket, placed] = st.pool.submit(request);
        if (requester)
          self->monitor(requester);
        auto addr = caf::actor_cast<caf::actor_addr>(requester);
        if (placed) {
          st.holders[placed->id] = addr;
          rp.deliver(*placed);
        } else {
          spdlog::info("caftrain: {} is {}", request.owner, st.pool.waiting_reason(ticket));
          st.waiters[ticket] = PoolState::Waiter{addr, rp};
        }
      } catch (const Error& e) {
        rp.deliver(make_caf_error(e.code(), e.what()));
      }
      return rp;
    },
    [=](pool_release_atom, uint64_t id) {
      auto& st = self->state;
      st.holders.erase(id);
      deliver(self, st.pool.release(id));
    },
    [=](pool_status_atom) {
      auto& st = self->state;
      PoolStatus status;
      for (auto& [id, node] : st.pool.nodes())
        status.nodes.push_back(node);
      for (auto& [id, p] : st.pool.placements())
        status.placements.push_back(p);
      status.pending = st.pool.pending();
      return status;
    },
    [=](pool_reason_atom, const std::string& owner) {
      for (auto& p : self->state.pool.pending())
        if (p.request.owner == owner)
          return p.reason;
      return std::string();
    },
    [=](pool_backup_atom, const PlacementRequest& request, uint64_t id, const std::string& lost) {
      return self->state.pool.placement_without(request, id, lost).value_or(std::vector<std::string>());
    },
    [=](pool_add_node_atom, const std::string& id, ResourceSet& total) {
      deliver(self, self->state.pool.add_node(id, std::move(total)));
    },
    [=](pool_remove_node_atom, const std::string& id) {
      auto& st = self->state;
      for (auto& lost : st.pool.remove_node(id)) {
        auto holder = st.holders.find(lost.id);
        if (holder == st.holders.end())
          continue;
        if (auto h = caf::actor_cast<caf::actor>(holder->second))
          self->send(h, pool_lost_atom::value, lost.id, id);
        st.holders.erase(holder);
      }
      // What the lost placements held on other nodes is free again.
      deliver(self, st.pool.grant_pending());
    },
  };
}

ResourceSet local_node_resources() {
  ResourceSet r;
  r.set("CPU", static_cast<double>(std::max(1u, std::thread::hardware_concurrency())));
  auto gpus = torch::cuda::is_available() ? torch::cuda::device_count() : 0;
  if (gpus > 0)
    r.set("GPU", static_cast<double>(gpus));
  return r;
}

caf::actor local_pool(caf::actor_system& system) {
  // Weak: the pool lives while a job holds it. A strong reference kept past the
  // scheduler's end (the system's registry) would destroy the actor after its executor.
  static std::mutex mtx;
  static std::map<const caf::actor_system*, caf::weak_actor_ptr> pools;
  std::lock_guard<std::mutex> guard(mtx);
  auto& weak = pools[&system];
  if (auto strong = weak.lock())
    return caf::actor_cast<caf::actor>(strong);
  auto pool = system.spawn<caf::hidden>(pool_actor, std::map<std::string, ResourceSet>{
                                                      {"local", local_node_resources()}});
  weak = caf::actor_cast<caf::weak_actor_ptr>(pool);
  return pool;
}

} // namespace caftrain
