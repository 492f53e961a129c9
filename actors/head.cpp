#include "actors/head.hpp"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/messages.hpp"
#include "actors/node_agent.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace {

using Self = caf::stateful_actor<HeadState>*;

/// Compares in time independent of where the strings differ (their length is no secret).
bool same_token(const std::string& given, const std::string& token) {
  if (given.size() != token.size() || token.empty())
    return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < token.size(); ++i)
    diff |= static_cast<unsigned char>(given[i] ^ token[i]);
  return diff == 0;
}

/// Why a peer is refused, or "" when its protocol and token are the cluster's.
std::string check_peer(Self self, int32_t protocol, const std::string& token) {
  if (protocol != kClusterProtocol)
    return "it speaks cluster protocol " + std::to_string(protocol) + ", this head speaks " +
           std::to_string(kClusterProtocol) + "; run the same caftrain version on every machine";
  if (!same_token(token, self->state.token))
    return "its cluster token does not match the head's; copy the head's token file "
           "(caftrain head --token-file, by default ~/.caftrain/cluster_token)";
  return "";
}

bool from_trusted(Self self) {
  auto& sender = self->current_sender();
  if (!sender)
    return false;
  if (sender->node() == self->node())
    return true;
  return self->state.trusted.count(sender->node()) > 0;
}

caf::error untrusted() {
  return make_caf_error(Errc::invalid_config,
                        "this peer has not presented the cluster's token (connect first)");
}

void node_lost(Self self, const std::string& id, const std::string& why) {
  auto& st = self->state;
  auto node = st.nodes.find(id);
  if (node == st.nodes.end())
    return;
  spdlog::warn("caftrain head: node '{}' ({} pid {}) was lost: {}", id, node->second.host,
               node->second.pid, why);
  st.nodes.erase(node);
  st.agents.erase(id);
  self->send(st.pool, pool_remove_node_atom::value, id);
}

} // namespace

caf::behavior head_actor(caf::stateful_actor<HeadState>* self, std::string token) {
  auto& st = self->state;
  st.token = std::move(token);
  st.pool = self->spawn<caf::linked>(pool_actor, std::map<std::string, ResourceSet>{});
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& st = self->state;
    for (auto& [id, agent] : st.agents)
      if (agent.address() == dm.source) {
        auto key = id;
        return node_lost(self, key, self->system().render(dm.reason));
      }
    for (auto i = st.runs.begin(); i != st.runs.end(); ++i)
      if (i->second.trainer.address() == dm.source) {
        spdlog::info("caftrain head: run '{}' of {} ended", i->first, i->second.driver);
        // A driver that died leaves its worker processes to their nodes: they stop them.
        for (auto& [id, agent] : st.agents)
          self->send(agent, run_gone_atom::value, dm.source.node(), dm.source.id());
        st.runs.erase(i);
        return;
      }
  });
  return {
    [=](join_atom, JoinRequest& req) -> caf::result<std::string> {
      auto& st = self->state;
      auto why = check_peer(self, req.protocol, req.token);
      if (!why.empty()) {
        spdlog::warn("caftrain head: refused node '{}' ({} pid {}): {}", req.name, req.host, req.pid, why);
        return make_caf_error(Errc::invalid_config, "the head refused this node: " + why);
      }
      if (!req.agent)
        return make_caf_error(Errc::invalid_argument, "a join must carry the node's agent");
      if (st.agents.count(req.name))
        return make_caf_error(Errc::invalid_config,
                              "a node named '" + req.name + "' (" + st.nodes[req.name].host + " pid " +
                                std::to_string(st.nodes[req.name].pid) +
                                ") is in the cluster already; give this one another --name");
      self->state.trusted.insert(req.agent.node());
      self->monitor(req.agent);
      NodeView view{req.name, req.host, req.pid, req.resources, req.resources, req.address};
      st.nodes[req.name] = view;
      st.agents[req.name] = req.agent;
      self->send(st.pool, pool_add_node_atom::value, req.name, req.resources);
      spdlog::info("caftrain head: node '{}' ({} pid {}) joined with {}", req.name, req.host,
                   req.pid, req.resources.to_string());
      return req.name;
    },
    [=](connect_atom, ClientHello& hello) -> caf::result<ClusterHandle> {
      auto why = check_peer(self, hello.protocol, hello.token);
      if (!why.empty()) {
        spdlog::warn("caftrain head: refused {}: {}", hello.who, why);
        return make_caf_error(Errc::invalid_config, why);
      }
      if (auto& sender = self->current_sender())
        self->state.trusted.insert(sender->node());
      spdlog::debug("caftrain head: {} connected", hello.who);
      return ClusterHandle{caf::actor_cast<caf::actor>(self), self->state.pool};
    },
    [=](run_register_atom, RunView& run) {
      if (!from_trusted(self) || !run.trainer)
        return;
      self->monitor(run.trainer);
      auto key = run.name;
      if (self->state.runs.count(key))
        key += " (" + run.driver + ")"; // another driver's run of that name
      spdlog::info("caftrain head: run '{}' of {} registered", key, run.driver);
      self->state.runs[key] = std::move(run);
    },
    [=](run_stop_atom, const std::string& name) -> caf::result<bool> {
      if (!from_trusted(self))
        return untrusted();
      auto i = self->state.runs.find(name);
      if (i == self->state.runs.end())
        return false;
      spdlog::info("caftrain head: stopping run '{}'", name);
      self->send(i->second.trainer, cancel_atom::value);
      return true;
    },
    [=](cluster_status_atom) {
      auto trusted = from_trusted(self);
      auto rp = self->make_response_promise();
      if (!trusted) {
        rp.deliver(untrusted());
        return rp;
      }
      self->request(self->state.pool, std::chrono::seconds(10), pool_status_atom::value)
        .then(
          [=](PoolStatus& pool) mutable {
            auto& st = self->state;
            ClusterStatus out;
            for (auto& [id, view] : st.nodes) {
              auto node = view;
              for (auto& pn : pool.nodes)
                if (pn.id == id)
                  node.available = pn.available;
              out.nodes.push_back(node);
            }
            for (auto& [name, run] : st.runs)
              out.runs.push_back(run);
            out.pending = std::move(pool.pending);
            rp.deliver(std::move(out));
          },
          [=](caf::error& err) mutable { rp.deliver(err); });
      return rp;
    },
  };
}

int run_head(caf::actor_system& system, const HeadOptions& options) {
  auto token = read_token(options.token_file, true);
  auto head = system.spawn(head_actor, token);
  auto port = system.middleman().publish(head, options.port, options.host.c_str(), true);
  if (!port) {
    std::fprintf(stderr, "caftrain head: cannot listen on %s:%u: %s\n", options.host.c_str(),
                 static_cast<unsigned>(options.port), system.render(port.error()).c_str());
    caf::anon_send_exit(head, caf::exit_reason::user_shutdown);
    return 1;
  }
  auto address = options.host + ":" + std::to_string(*port);
  if (!options.address_file.empty()) {
    auto tmp = options.address_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << address << "\n";
    }
    std::rename(tmp.c_str(), options.address_file.c_str());
  }
  std::printf("caftrain head listening on %s (pid %d)\n", address.c_str(), static_cast<int>(::getpid()));
  std::fflush(stdout);
  caf::scoped_actor self{system};
  self->monitor(head);
  self->receive([](caf::down_msg&) {});
  return 0;
}

} // namespace caftrain
