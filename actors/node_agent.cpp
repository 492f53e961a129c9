#include "actors/node_agent.hpp"

#include <unistd.h>

#include <cstdio>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/cluster.hpp"
#include "actors/messages.hpp"
#include "actors/network.hpp"
#include "core/error.hpp"

namespace caftrain {

caf::behavior node_agent_actor(caf::stateful_actor<NodeAgentState>* self, std::string id, HubAddress hub) {
  self->state.id = std::move(id);
  self->state.hub = std::move(hub);
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& st = self->state;
    st.launchers.erase(dm.source);
    st.trainer_of.erase(dm.source);
  });
  return {
    [=](run_gone_atom, const caf::node_id& node, caf::actor_id id) {
      auto& st = self->state;
      if (st.hub.spares)
        st.hub.spares->drop_run(node, id); // the run is over: its spares are not needed
      for (auto& [launcher, of] : st.trainer_of)
        if (of.node() == node && of.id() == id) {
          spdlog::info("caftrain node {}: the driver of a run is gone; stopping its worker process", st.id);
          self->send_exit(st.launchers[launcher], caf::exit_reason::user_shutdown);
        }
    },
    [=](spare_start_atom, LaunchSpec& spec) {
      auto& st = self->state;
      if (!st.hub.spares || ::access(spec.program.c_str(), X_OK) != 0)
        return; // no spares here; or the run's launch here will say what is missing
      spdlog::info("caftrain node {}: starting a warm spare for run {} ({})", st.id,
                   spec.assignment.context.run_name, spec.spare_slot);
      add_hub_environment(self->system(), st.hub, spec.env);
      st.hub.spares->start(spec.spare_slot, spec);
    },
    [=](launch_atom, LaunchSpec& spec) -> caf::result<caf::actor> {
      auto& st = self->state;
      auto rank = spec.assignment.context.world_rank;
      if (::access(spec.program.c_str(), X_OK) != 0)
        return make_caf_error(Errc::unavailable,
                              "rank " + std::to_string(rank) + ": node '" + st.id +
                                "' cannot run the driver's program '" + spec.program +
                                "': it must be at the same path on every node (as with torchrun or MPI)");
      spdlog::info("caftrain node {}: starting rank {} of run {} (attempt {})", st.id, rank,
                   spec.assignment.context.run_name, spec.assignment.context.attempt);
      auto trainer = spec.assignment.trainer.address();
      auto launcher = self->spawn<caf::monitored>(launcher_actor, std::move(spec), st.hub);
      st.launchers[launcher.address()] = launcher;
      st.trainer_of[launcher.address()] = trainer;
      return launcher;
    },
  };
}

int run_node(caf::actor_system& system, const NodeOptions& options) {
  auto fail = [](const std::string& why) {
    std::fprintf(stderr, "caftrain node: %s\n", why.c_str());
    return 2;
  };
  std::string token;
  std::pair<std::string, uint16_t> address;
  try {
    token = read_token(options.token_file);
    address = parse_address(options.head);
  } catch (const Error& e) {
    return fail(e.what());
  }
  auto reached = reach(system, address.first, address.second, std::chrono::seconds(10));
  if (!reached)
    return fail("cannot reach the head at " + options.head + ": " + system.render(reached.error()) + tls_hint(system));
  auto head = std::move(*reached);
  // The node's worker processes connect here, on this machine.
  // Warm spares of the runs that ask for them (FailureConfig::warm_spares) wait here too.
  auto spares = std::make_shared<SparePool>();
  auto hub = system.spawn(hub_actor, spares);
  auto port = net::publish(system, hub, 0, "127.0.0.1");
  if (!port)
    return fail("cannot open the port worker processes connect to: " + system.render(port.error()));
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  auto name = options.name.empty() ? std::string(host) + "-" + std::to_string(::getpid()) : options.name;
  auto agent = system.spawn(node_agent_actor, name, HubAddress{hub, "127.0.0.1", *port, spares});
  // Drivers connect to the agent directly: launches and their workers' ends do not pass
  // through the head.
  auto host_for_drivers = advertise_as(options.host, address.first);
  auto agent_port = net::publish(system, agent, 0, host_for_drivers == "127.0.0.1" ? "127.0.0.1" : nullptr);
  if (!agent_port)
    return fail("cannot open the port drivers connect to: " + system.render(agent_port.error()));
  JoinRequest join;
  join.token = token;
  join.name = name;
  join.host = host;
  join.pid = static_cast<int32_t>(::getpid());
  auto local = local_node_resources();
  join.resources = ResourceSet::from_map(options.custom);
  join.resources.set("CPU", options.cpus > 0 ? options.cpus : local.get("CPU"));
  auto gpus = options.gpus >= 0 ? options.gpus : local.get("GPU");
  if (gpus > 0)
    join.resources.set("GPU", gpus);
  join.agent = agent;
  join.address = host_for_drivers + ":" + std::to_string(*agent_port);
  caf::scoped_actor self{system};
  std::string refused;
  self->request(head, std::chrono::seconds(10), join_atom::value, join)
    .receive([](std::string&) {}, [&](caf::error& err) { refused = to_run_error(err).message; });
  auto leave = [&] {
    caf::anon_send_exit(agent, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(hub, caf::exit_reason::user_shutdown);
    net::unpublish(system, hub, *port);
  };
  if (!refused.empty()) {
    leave();
    return fail(refused);
  }
  std::printf("caftrain node '%s' joined the cluster at %s with %s\n", name.c_str(), options.head.c_str(),
              join.resources.to_string().c_str());
  std::fflush(stdout);
  self->monitor(head);
  self->receive([](caf::down_msg&) {});
  std::fprintf(stderr, "caftrain node '%s': the head at %s is gone; this node leaves (start it again "
                       "once the head is back)\n", name.c_str(), options.head.c_str());
  leave();
  return 1;
}

} // namespace caftrain
