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

// -- warm spares -------------------------------------------------------------------------

namespace {

/// The CUDA_VISIBLE_DEVICES of a process started with `env` ("" when unset).
std::string visible_devices(const std::map<std::string, std::string>& env) {
  auto i = env.find("CUDA_VISIBLE_DEVICES");
  return i == env.end() ? std::string() : i->second;
}

} // namespace

SparePool::~SparePool() {
  close();
}

void SparePool::start(const std::string& slot, const LaunchSpec& spec) {
  std::lock_guard<std::mutex> guard(mtx_);
  if (closed_)
    return;
  auto trainer = spec.assignment.trainer.address();
  for (auto& [key, spare] : spares_)
    if (spare.slot == slot && spare.trainer == trainer && !spare.owner && !spare.gone->load())
      return;
  auto key = spec.key + "-spare";
  auto env = spec.env;
  env["CAFTRAIN_WORKER_KEY"] = key;
  env["CAFTRAIN_WORKER_SPARE"] = "1";
  pid_t pid = -1;
  try {
    pid = spawn_process(spec.program, spec.argv, env);
  } catch (const Error& e) {
    spdlog::warn("caftrain: cannot start a spare worker process for {}: {}", slot, e.what());
    return;
  }
  auto gone = std::make_shared<std::atomic<bool>>(false);
  auto reaper = std::make_shared<std::thread>([pool = weak_from_this(), key, pid, gone] {
    auto status = wait_process(pid);
    gone->store(true);
    auto self = pool.lock();
    if (!self)
      return;
    caf::actor owner;
    bool unexpected = false;
    {
      std::lock_guard<std::mutex> guard(self->mtx_);
      auto i = self->spares_.find(key);
      if (i == self->spares_.end())
        return;
      owner = i->second.owner;
      if (!owner && i->second.reaper)
        self->ended_.push_back(std::move(i->second.reaper)); // this thread; joined by close
      unexpected = !owner && !self->closed_ && !i->second.dropped;
      self->spares_.erase(i);
    }
    if (owner)
      caf::anon_send(owner, reaped_atom::value, status);
    else if (unexpected)
      spdlog::warn("caftrain: spare worker process {} {} before it was needed", pid, describe_exit(status));
  });
  spares_[key] = Spare{slot, trainer, visible_devices(env), pid, false, caf::actor(), reaper, gone};
}

std::optional<SparePool::Claimed> SparePool::claim(const std::string& slot, const caf::actor_addr& trainer,
                                                   const std::string& devices, const caf::actor& owner) {
  std::lock_guard<std::mutex> guard(mtx_);
  auto usable = [&](const Spare& spare) {
    return spare.trainer == trainer && spare.devices == devices && !spare.owner && !spare.dropped &&
           !spare.gone->load();
  };
  auto take = [&](const std::string& key, Spare& spare) {
    spare.owner = owner;
    return Claimed{spare.pid, key, std::move(spare.reaper), spare.gone};
  };
  for (auto& [key, spare] : spares_) // the slot's own spare first
    if (spare.slot == slot && usable(spare))
      return take(key, spare);
  for (auto& [key, spare] : spares_)
    if (usable(spare))
      return take(key, spare);
  return std::nullopt;
}

bool SparePool::find(const std::string& key, caf::actor& owner) {
  std::lock_guard<std::mutex> guard(mtx_);
  auto i = spares_.find(key);
  if (i == spares_.end())
    return false;
  owner = i->second.owner;
  return true;
}

void SparePool::drop_run(const caf::node_id& node, caf::actor_id id) {
  std::lock_guard<std::mutex> guard(mtx_);
  for (auto& [key, spare] : spares_)
    if (!spare.owner && !spare.dropped && spare.trainer.node() == node && spare.trainer.id() == id) {
      spare.dropped = true;
      if (!spare.gone->load())
        ::kill(spare.pid, SIGKILL); // its reaper reaps it and forgets it
    }
}

void SparePool::close() {
  std::vector<std::shared_ptr<std::thread>> reapers;
  {
    std::lock_guard<std::mutex> guard(mtx_);
    closed_ = true;
    for (auto& [key, spare] : spares_)
      if (!spare.owner && spare.reaper) {
        if (!spare.gone->load())
          ::kill(spare.pid, SIGKILL);
        reapers.push_back(spare.reaper);
      }
    reapers.insert(reapers.end(), ended_.begin(), ended_.end());
    ended_.clear();
  }
  for (auto& r : reapers) {
    if (!r->joinable())
      continue;
    if (r->get_id() == std::this_thread::get_id())
      r->detach(); // a reaper that held the pool's last reference: it ends right after
    else
      r->join();
  }
}

// -- the hub -----------------------------------------------------------------------------

caf::behavior hub_actor(caf::stateful_actor<HubState>* self, std::shared_ptr<SparePool> spares) {
  if (spares)
    self->attach_functor([spares] { spares->close(); }); // the run's end: no spare stays
  return {
    [=](hub_register_atom, const std::string& key, caf::actor& launcher) {
      self->state.launchers[key] = std::move(launcher);
    },
    [=](hub_unregister_atom, const std::string& key) { self->state.launchers.erase(key); },
    [=](hello_atom hello, const std::string& key) {
      auto& st = self->state;
      auto rp = self->make_response_promise();
      auto i = st.launchers.find(key);
      caf::actor owner;
      if (i != st.launchers.end())
        rp.delegate(i->second, hello, key);
      else if (spares && spares->find(key, owner)) {
        if (owner) {
          rp.delegate(owner, hello, key);
        } else {
          // A spare waits for a restart. Those whose spare is gone (dropped with its run)
          // are forgotten: a node's hub outlives many runs.
          for (auto p = st.parked.begin(); p != st.parked.end();)
            p = spares->find(p->first, owner) ? std::next(p) : st.parked.erase(p);
          st.parked[key] = rp;
        }
      } else {
        rp.deliver(make_caf_error(Errc::bad_state,
                                  "this worker process's key is unknown to the run: it belongs "
                                  "to an attempt that is over"));
      }
      return rp;
    },
    [=](spare_claimed_atom, const std::string& key) {
      auto& st = self->state;
      auto i = st.parked.find(key);
      caf::actor owner;
      if (i == st.parked.end() || !spares || !spares->find(key, owner) || !owner)
        return;
      i->second.delegate(owner, hello_atom::value, key);
      st.parked.erase(i);
    },
  };
}

// -- the launcher ------------------------------------------------------------------------------

namespace {

using Self = caf::stateful_actor<LauncherState>*;

/// How often a launcher looks at its child's hello and heartbeat.
constexpr auto kCheckEvery = std::chrono::milliseconds(250);

/// How long a rank runs before its warm spare starts.
constexpr auto kSpareAfter = std::chrono::milliseconds(1000);

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
    spdlog::warn("caftrain: {}", out.error.message); // a stop that should have been prompt
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

void add_hub_environment(const caf::actor_system& system, const HubAddress& hub,
                         std::map<std::string, std::string>& env) {
  auto port = std::to_string(hub.port);
  env["CAFTRAIN_WORKER_HUB"] = hub.host + ":" + port;
  env["CAFTRAIN_WORKER_PARENT"] = std::to_string(::getpid());
  env["MASTER_ADDR"] = hub.host;
  env["MASTER_PORT"] = port;
  // With this machine's identity: a node's files, not its driver's (paths on this machine).
  add_tls_environment(system, env);
}

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
  add_hub_environment(self->system(), st.hub, st.spec.env);
  std::shared_ptr<std::atomic<bool>> gone;
  std::optional<SparePool::Claimed> spare;
  if (st.hub.spares && !st.spec.spare_slot.empty())
    spare = st.hub.spares->claim(st.spec.spare_slot, st.spec.assignment.trainer.address(),
                                 visible_devices(st.spec.env), me);
  if (spare) {
    // A warm spare of this rank: loaded already, waiting for its hello's answer.
    st.pid = spare->pid;
    st.reaper = spare->reaper;
    gone = spare->gone;
    self->send(st.hub.hub, spare_claimed_atom::value, spare->key);
  } else {
    try {
      st.pid = spawn_process(st.spec.program, st.spec.argv, st.spec.env);
    } catch (const Error& e) {
      self->send(st.spec.assignment.trainer, worker_exit_atom::value,
                 failure(self, Errc::unavailable, "rank " + std::to_string(st.spec.assignment.context.world_rank) +
                                                     ": " + e.what()));
      self->quit();
      return {};
    }
    gone = std::make_shared<std::atomic<bool>>(false);
    st.reaper = std::make_shared<std::thread>([pid = st.pid, me, gone]() mutable {
      auto status = wait_process(pid);
      gone->store(true);
      caf::anon_send(me, reaped_atom::value, status);
      me = nullptr;
    });
  }
  st.started = st.last_alive = std::chrono::steady_clock::now();
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
        return;
      }
      // The next restart's process loads while this rank trains; not at once, where it
      // would compete with this attempt's own start (its restore, its first steps).
      if (st.hub.spares && !st.spec.spare_slot.empty())
        self->delayed_send(self, kSpareAfter, spare_due_atom::value);
    },
    [=](spare_due_atom) {
      auto& st = self->state;
      if (!st.stopping && !st.exit)
        st.hub.spares->start(st.spec.spare_slot, st.spec);
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
