#include "actors/process_launcher.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/network.hpp"
#include "core/error.hpp"
#include "core/subprocess.hpp"

namespace caftrain {

void add_worker_process_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<WorkerContext>("caftrain::WorkerContext");
  cfg.add_message_type<ProcessAssignment>("caftrain::ProcessAssignment");
  cfg.add_message_type<LaunchSpec>("caftrain::LaunchSpec");
}

// -- the hub -----------------------------------------------------------------------------

caf::behavior hub_actor(caf::stateful_actor<HubState>* self) {
  return {
    [=](hub_register_atom, const std::string& key, caf::actor& launcher) {
      self->state.launchers[key] = std::move(launcher);
    },
    [=](hub_unregister_atom, const std::string& key) { self->state.launchers.erase(key); },
    [=](hello_atom hello, const std::string& key) {
      auto rp = self->make_response_promise();
      auto i = self->state.launchers.find(key);
      if (i == self->state.launchers.end())
        rp.deliver(make_caf_error(Errc::bad_state,
                                  "this worker process's key is unknown to the run: it belongs "
                                  "to an attempt that is over"));
      else
        rp.delegate(i->second, hello, key);
      return rp;
    },
  };
}

// -- the launcher ------------------------------------------------------------------------------

namespace {

using Self = caf::stateful_actor<LauncherState>*;

/// How often a launcher looks at its child's hello and heartbeat.
constexpr auto kCheckEvery = std::chrono::milliseconds(250);

std::string rank_prefix(Self self) {
  auto& st = self->state;
  return "rank " + std::to_string(st.spec.assignment.context.world_rank) + ": worker process " +
         std::to_string(st.pid);
}

std::chrono::milliseconds stop_grace(Self self) {
  return std::chrono::milliseconds(self->state.spec.stop_grace_ms);
}

WorkerExit failure(Self self, Errc code, const std::string& what) {
  auto& ctx = self->state.spec.assignment.context;
  WorkerExit exit;
  exit.rank = ctx.world_rank;
  exit.attempt = ctx.attempt;
  exit.failed = true;
  exit.error = RunError{code, what, ctx.world_rank, ctx.attempt};
  return exit;
}

void kill_child(Self self) {
  auto& st = self->state;
  if (st.pid > 0 && !st.killed) {
    st.killed = true;
    ::kill(st.pid, SIGKILL);
  }
}

/// The child failed while running (silent, never connected): the cause is recorded and
/// the process killed; the trainer hears of it once the process is gone.
void fail_running(Self self, Errc code, const std::string& what) {
  auto& st = self->state;
  if (st.exit)
    return;
  st.exit = failure(self, code, what);
  kill_child(self);
}

void stop(Self self, const std::string& reason) {
  auto& st = self->state;
  if (st.stopping)
    return;
  st.stopping = true;
  if (!st.worker) {
    // Not connected yet: it holds nothing, so it goes at once.
    if (!st.exit)
      st.exit = failure(self, Errc::cancelled, rank_prefix(self) + " was stopped before it started: " + reason);
    return kill_child(self);
  }
  self->send_exit(st.worker, make_caf_error(Errc::cancelled, reason));
  self->delayed_send(self, stop_grace(self), kill_atom::value);
}

/// The child is gone: the trainer gets its rank's end, and the launcher ends.
void reaped(Self self, int status) {
  auto& st = self->state;
  WorkerExit out;
  if (st.exit) {
    out = *st.exit;
    if (!out.failed && !exited_cleanly(status))
      spdlog::warn("caftrain: {} finished its rank, then {}", rank_prefix(self), describe_exit(status));
  } else if (st.killed && st.stopping) {
    auto grace = std::chrono::duration<double>(stop_grace(self)).count();
    out = failure(self, Errc::cancelled,
                  rank_prefix(self) + " did not stop within RunConfig.stop_grace (" +
                    std::to_string(grace) + " s) and was killed");
  } else if (exited_cleanly(status)) {
    out = failure(self, Errc::worker_failed,
                  rank_prefix(self) + " exited before its rank ended: the program must reach "
                                      "the same TorchTrainer::fit in its worker processes "
                                      "(see actors/worker_process.hpp)");
  } else {
    std::string hint;
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      hint = " (the kernel's OOM killer sends SIGKILL: see dmesg)";
    else if (!st.hello)
      hint = " before it connected to the run: the program's code before TorchTrainer::fit "
             "failed in the worker process (its output is above)";
    out = failure(self, Errc::worker_failed, rank_prefix(self) + " " + describe_exit(status) + hint);
  }
  self->send(st.spec.assignment.trainer, worker_exit_atom::value, out);
  self->quit();
}

} // namespace

void add_tls_environment(const caf::actor_system& system, std::map<std::string, std::string>& env) {
  if (auto tls = tls_of(system)) {
    env["CAFTRAIN_TLS_CERT"] = tls->certificate;
    env["CAFTRAIN_TLS_KEY"] = tls->key;
    env["CAFTRAIN_TLS_CA"] = tls->ca_file;
  }
}

caf::behavior launcher_actor(caf::stateful_actor<LauncherState>* self, LaunchSpec spec, HubAddress hub) {
  auto& st = self->state;
  st.spec = std::move(spec);
  st.hub = std::move(hub);
  auto me = caf::actor_cast<caf::actor>(self);
  st.spec.assignment.launcher = me;
  self->send(st.hub.hub, hub_register_atom::value, st.spec.key, me);
  auto port = std::to_string(st.hub.port);
  st.spec.env["CAFTRAIN_WORKER_HUB"] = st.hub.host + ":" + port;
  st.spec.env["CAFTRAIN_WORKER_PARENT"] = std::to_string(::getpid());
  st.spec.env["MASTER_ADDR"] = st.hub.host;
  st.spec.env["MASTER_PORT"] = port;
  // With this machine's identity: a node's files, not its driver's (paths on this machine).
  add_tls_environment(self->system(), st.spec.env);
  try {
    st.pid = spawn_process(st.spec.program, st.spec.argv, st.spec.env);
  } catch (const Error& e) {
    self->send(st.spec.assignment.trainer, worker_exit_atom::value,
               failure(self, Errc::unavailable, "rank " + std::to_string(st.spec.assignment.context.world_rank) +
                                                   ": " + e.what()));
    self->quit();
    return {};
  }
  st.started = st.last_alive = std::chrono::steady_clock::now();
  auto gone = std::make_shared<std::atomic<bool>>(false);
  st.reaper = std::make_shared<std::thread>([pid = st.pid, me, gone]() mutable {
    auto status = wait_process(pid);
    gone->store(true);
    caf::anon_send(me, reaped_atom::value, status);
    me = nullptr;
  });
  me = nullptr;
  self->attach_functor([pid = st.pid, reaper = st.reaper, gone, hub = st.hub.hub, key = st.spec.key] {
    // Nothing is left behind, even when the launcher ends before its child (the actor
    // system shutting down): the child is killed, then waited for.
    if (!gone->load())
      ::kill(pid, SIGKILL);
    if (reaper->joinable())
      reaper->join();
    caf::anon_send(hub, hub_unregister_atom::value, key);
  });
  self->set_exit_handler([=](caf::exit_msg& em) {
    stop(self, em.reason ? self->system().render(em.reason) : "the attempt was stopped");
  });
  self->set_down_handler([=](caf::down_msg&) {
    // The child's worker actor, or the connection to the child, is gone: the reaper says
    // how the process ended.
  });
  self->delayed_send(self, kCheckEvery, check_atom::value);
  return {
    [=](hello_atom, const std::string&) -> caf::result<ProcessAssignment> {
      auto& st = self->state;
      if (st.stopping || st.exit)
        return make_caf_error(Errc::cancelled, "the attempt of this worker process was stopped");
      st.hello = true;
      st.last_alive = std::chrono::steady_clock::now();
      return st.spec.assignment;
    },
    [=](started_atom, caf::actor& worker) {
      auto& st = self->state;
      st.worker = std::move(worker);
      self->monitor(st.worker);
      if (st.stopping) {
        st.stopping = false; // stop again, now through the worker
        stop(self, "the attempt was stopped");
      }
    },
    [=](alive_atom) { self->state.last_alive = std::chrono::steady_clock::now(); },
    [=](worker_exit_atom, const WorkerExit& exit) {
      auto& st = self->state;
      if (!st.exit)
        st.exit = exit;
      return true;
    },
    [=](check_atom) {
      auto& st = self->state;
      if (st.killed)
        return;
      auto now = std::chrono::steady_clock::now();
      auto& a = st.spec.assignment;
      auto collective_timeout = std::chrono::milliseconds(a.collective_timeout_ms);
      auto heartbeat_timeout = std::chrono::milliseconds(a.heartbeat_timeout_ms);
      if (!st.hello && now - st.started > collective_timeout) {
        auto secs = std::chrono::duration<double>(collective_timeout).count();
        return fail_running(self, Errc::worker_failed,
                            rank_prefix(self) + " did not connect to the run within " +
                              std::to_string(secs) + " s (RunConfig.collective_timeout)");
      }
      if (st.hello && !st.stopping && heartbeat_timeout.count() > 0 &&
          now - st.last_alive > heartbeat_timeout) {
        auto secs = std::chrono::duration<double>(now - st.last_alive).count();
        return fail_running(self, Errc::worker_failed,
                            rank_prefix(self) + " stopped answering for " + std::to_string(secs) +
                              " s (frozen or stopped; RunConfig.heartbeat_timeout) and was killed");
      }
      self->delayed_send(self, kCheckEvery, check_atom::value);
    },
    [=](kill_atom) { kill_child(self); },
    [=](reaped_atom, int status) { reaped(self, status); },
  };
}

} // namespace caftrain
