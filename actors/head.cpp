#include "actors/head.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/messages.hpp"
#include "actors/network.hpp"
#include "actors/node_agent.hpp"
#include "actors/process_launcher.hpp"
#include "core/error.hpp"
#include "core/subprocess.hpp"

namespace caftrain {

namespace fs = std::filesystem;

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
  if (!same_token(token, self->state.config.token))
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

/// (job_ended_atom, id, wait status): a job's driver ended.
using job_ended_atom = caf::atom_constant<caf::atom("cljobend")>;
/// (job_kill_atom, id): a stopped job that ignored SIGTERM is killed.
using job_kill_atom = caf::atom_constant<caf::atom("cljobkill")>;

std::string host_name() {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}

caf::result<JobView> submit_job(Self self, JobSpec& spec) {
  auto& st = self->state;
  auto refuse = [](const std::string& why) { return make_caf_error(Errc::invalid_argument, why); };
  if (st.address.empty())
    return make_caf_error(Errc::unavailable, "the head is not published yet; try again");
  if (spec.program.empty())
    return refuse("a job needs a program: caftrain submit --head HOST:PORT -- PROGRAM ARGS...");
  if (::access(spec.program.c_str(), X_OK) != 0)
    return refuse("'" + spec.program + "' is not an executable file on the head's machine: build or copy it "
                  "there at that path (as for the nodes) and submit again");
  JobView job;
  job.id = "job-" + random_hex(10);
  job.submitter = spec.submitter;
  auto dir = fs::path(st.config.storage) / "jobs" / job.id;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    return make_caf_error(Errc::io_error, "cannot create the job's directory '" + dir.string() + "': " +
                                            ec.message() + " (caftrain head --storage DIR)");
  job.log = (dir / "output.log").string();
  auto cwd = spec.working_dir;
  if (cwd.empty() || !fs::is_directory(cwd, ec))
    cwd = dir.string();
  // The driver finds the cluster as `ray.init()` finds RAY_ADDRESS.
  auto env = spec.env;
  env["CAFTRAIN_ADDRESS"] = st.address;
  env["CAFTRAIN_TOKEN_FILE"] = st.config.token_file;
  env["CAFTRAIN_JOB_ID"] = job.id;
  add_tls_environment(self->system(), env);
  std::vector<std::string> argv{spec.program};
  argv.insert(argv.end(), spec.args.begin(), spec.args.end());
  for (auto& a : argv)
    job.command += (job.command.empty() ? "" : " ") + a;
  try {
    job.pid = static_cast<int32_t>(spawn_process(spec.program, argv, env, SpawnOptions{job.log, cwd}));
  } catch (const Error& e) {
    return make_caf_error(Errc::unavailable, e.what());
  }
  job.state = "running";
  st.jobs[job.id] = job;
  spdlog::info("caftrain head: job {} (pid {}) started for {}: {}", job.id, job.pid, spec.submitter, job.command);
  // Waited for on a thread of its own; the head hears of the end as a message.
  std::thread([pid = job.pid, id = job.id, secret = st.config.secret,
               head = caf::actor_cast<caf::weak_actor_ptr>(self)] {
    auto status = wait_process(pid);
    if (auto alive = caf::actor_cast<caf::actor>(head.lock()))
      caf::anon_send(alive, job_ended_atom::value, id, static_cast<int32_t>(status), secret);
  }).detach();
  return job;
}

void job_ended(Self self, const std::string& id, int status) {
  auto& st = self->state;
  auto i = st.jobs.find(id);
  if (i == st.jobs.end())
    return;
  auto& job = i->second;
  job.end = describe_exit(status);
  job.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
  job.state = st.stopping.erase(id) ? "stopped" : exited_cleanly(status) ? "succeeded" : "failed";
  spdlog::info("caftrain head: job {} {} ({})", id, job.end, job.state);
}

/// The job `name` names: a job id, or a run its driver registered.
JobView* find_job(Self self, const std::string& name) {
  auto& st = self->state;
  auto i = st.jobs.find(name);
  if (i == st.jobs.end())
    if (auto r = st.run_jobs.find(name); r != st.run_jobs.end())
      i = st.jobs.find(r->second);
  return i == st.jobs.end() ? nullptr : &i->second;
}

caf::result<JobLogs> job_logs(Self self, const std::string& name, int64_t offset) {
  auto job = find_job(self, name);
  if (!job) {
    auto run = self->state.runs.find(name);
    if (run != self->state.runs.end())
      return make_caf_error(Errc::invalid_argument,
                            "run '" + name + "' has a driver the head did not start (" + run->second.driver +
                              "): its output is where that driver runs; the head keeps the output of "
                              "`caftrain submit` jobs");
    return make_caf_error(Errc::invalid_argument,
                          "the head has no job or run '" + name + "' (see caftrain status)");
  }
  JobLogs out;
  out.job = *job;
  constexpr int64_t kMaxPiece = 1 << 20;
  std::ifstream in(job->log, std::ios::binary);
  if (in) {
    in.seekg(0, std::ios::end);
    int64_t size = in.tellg();
    offset = std::clamp<int64_t>(offset, 0, size);
    auto n = std::min(kMaxPiece, size - offset);
    out.text.resize(static_cast<size_t>(n));
    in.seekg(offset);
    in.read(out.text.data(), n);
    out.text.resize(static_cast<size_t>(in.gcount()));
  }
  out.next_offset = offset + static_cast<int64_t>(out.text.size());
  return out;
}

bool stop_job(Self self, const std::string& id) {
  auto& st = self->state;
  auto i = st.jobs.find(id);
  if (i == st.jobs.end())
    return false;
  if (i->second.state != "running")
    return true;
  spdlog::info("caftrain head: stopping job {} (pid {})", id, i->second.pid);
  st.stopping.insert(id);
  ::kill(i->second.pid, SIGTERM);
  self->delayed_send(self, std::chrono::seconds(5), job_kill_atom::value, id);
  return true;
}

} // namespace

caf::behavior head_actor(caf::stateful_actor<HeadState>* self, HeadConfig config) {
  auto& st = self->state;
  st.config = std::move(config);
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
      for (auto& [id, job] : self->state.jobs)
        if (job.state == "running" && process_label(job.pid) == run.driver)
          self->state.run_jobs[key] = id;
      self->state.runs[key] = std::move(run);
    },
    [=](head_address_atom, std::string& address, const std::string& secret) {
      if (same_token(secret, self->state.config.secret))
        self->state.address = std::move(address);
    },
    [=](job_submit_atom, JobSpec& spec) -> caf::result<JobView> {
      if (!from_trusted(self))
        return untrusted();
      return submit_job(self, spec);
    },
    [=](job_ended_atom, const std::string& id, int32_t status, const std::string& secret) {
      // Only the head's own waiting threads report ends.
      if (same_token(secret, self->state.config.secret))
        job_ended(self, id, status);
    },
    [=](job_logs_atom, const std::string& name, int64_t offset) -> caf::result<JobLogs> {
      if (!from_trusted(self))
        return untrusted();
      return job_logs(self, name, offset);
    },
    [=](job_stop_atom, const std::string& id) -> caf::result<bool> {
      if (!from_trusted(self))
        return untrusted();
      return stop_job(self, id);
    },
    [=](job_kill_atom, const std::string& id) {
      if (self->current_sender() != self->ctrl())
        return;
      auto i = self->state.jobs.find(id);
      if (i != self->state.jobs.end() && i->second.state == "running") {
        spdlog::warn("caftrain head: job {} ignored SIGTERM for 5 s; killing it", id);
        ::kill(i->second.pid, SIGKILL);
      }
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
            for (auto& [id, job] : st.jobs)
              out.jobs.push_back(job);
            out.pending = std::move(pool.pending);
            rp.deliver(std::move(out));
          },
          [=](caf::error& err) mutable { rp.deliver(err); });
      return rp;
    },
  };
}

int run_head(caf::actor_system& system, const HeadOptions& options) {
  HeadConfig config;
  config.token_file = options.token_file.empty() ? default_token_file() : options.token_file;
  config.token = read_token(config.token_file, true);
  config.storage = options.storage;
  config.secret = random_hex(32);
  if (config.storage.empty()) {
    const char* home = std::getenv("HOME");
    config.storage = std::string(home && *home ? home : "/tmp") + "/.caftrain/head";
  }
  config.storage = fs::absolute(config.storage).string();
  config.token_file = fs::absolute(config.token_file).string();
  // Detached: jobs' output files are read on the head's own thread, not the scheduler's.
  auto head = system.spawn<caf::detached>(head_actor, config);
  auto port = net::publish(system, head, options.port, options.host.c_str());
  if (!port) {
    std::fprintf(stderr, "caftrain head: cannot listen on %s:%u: %s\n", options.host.c_str(),
                 static_cast<unsigned>(options.port), system.render(port.error()).c_str());
    caf::anon_send_exit(head, caf::exit_reason::user_shutdown);
    return 1;
  }
  auto address = options.host + ":" + std::to_string(*port);
  // Jobs run on this machine: they reach the head on loopback when it listens there,
  // else at this machine's name (which their nodes resolve too).
  auto for_jobs = address;
  if (options.host == "0.0.0.0" || options.host.empty())
    for_jobs = host_name() + ":" + std::to_string(*port);
  caf::anon_send(head, head_address_atom::value, for_jobs, config.secret);
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
