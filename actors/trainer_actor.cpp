#include "actors/trainer_actor.hpp"
#include "actors/checkpoint_transfer.hpp"
#include "actors/network.hpp"
#include "actors/process_launcher.hpp"
#include "actors/run_files.hpp"
#include "actors/store_server.hpp"
#include "actors/subscribers.hpp"
#include "actors/torch_trainer.hpp"
#include "actors/worker_process.hpp"

#include <chrono>
#include <cmath>
#include <functional>
#include <iomanip>
#include <unistd.h>
#include <filesystem>
#include <set>
#include <sstream>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "checkpoint/files.hpp"
#include "core/error.hpp"
#include "environment/local_communicator.hpp"
#include "environment/store_protocol.hpp"

namespace caftrain {

namespace fs = std::filesystem;

namespace {

using Self = caf::stateful_actor<TrainerState>*;
using AfterStop = TrainerState::AfterStop;

// The trainer's own messages to its I/O actor (the persister), which does every disk
// write and check of the run off CAF's scheduler threads, in the order they were sent.
/// (history_atom, dir, ReportRecord): appends a report to the run's history.jsonl.
using history_atom = caf::atom_constant<caf::atom("history")>;
/// (remove_atom, path): deletes a checkpoint the retention policy dropped.
using remove_atom = caf::atom_constant<caf::atom("rmckpt")>;
/// (validate_atom, candidates newest first) -> index of the first that validates, or -1.
using validate_atom = caf::atom_constant<caf::atom("validate")>;
/// (result_file_atom, Result) -> true: writes result.json (of a run that ended).
using result_file_atom = caf::atom_constant<caf::atom("resultf")>;
/// (unresult_atom, dir): removes result.json (a resumed run has not ended yet).
using unresult_atom = caf::atom_constant<caf::atom("unresult")>;
/// (io_done_atom): the I/O actor quits once everything sent before is done.
using io_done_atom = caf::atom_constant<caf::atom("iodone")>;
/// (serve_files_atom, checkpoint path, files): the file gate lets workers fetch them.
using serve_files_atom = caf::atom_constant<caf::atom("servefiles")>;
/// (loss_spares_atom, attempt): internal; the attempt runs: start the spares for a node's
/// loss (see plan_loss_spares).
using loss_spares_atom = caf::atom_constant<caf::atom("lossspare")>;

/// How long an attempt runs before the spares for a node's loss start: not at once, where
/// they would compete with the attempt's own start (as a launcher waits for its own).
constexpr auto kLossSparesAfter = std::chrono::milliseconds(1500);

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string checkpoint_name(int64_t index) {
  std::ostringstream os;
  os << "checkpoint_" << std::setw(6) << std::setfill('0') << index;
  return os.str();
}

const RunConfig& run_config(Self self) {
  return self->state.spec->options.run;
}

// -- results ------------------------------------------------------------------------------

Result build_result(Self self) {
  auto& st = self->state;
  Result r;
  r.metrics_history = st.history;
  if (!st.history.empty())
    r.metrics = st.history.back().metrics;
  r.checkpoint = st.manager->latest();
  r.best_checkpoints = st.manager->best();
  r.path = st.spec->dir;
  r.error = st.error;
  r.attempts = st.attempt + 1;
  return r;
}

RunStatus status_of(Self self) {
  auto& st = self->state;
  RunStatus s;
  s.state = st.state;
  s.states = st.states;
  s.waiting_reason = st.waiting_reason;
  s.attempt = std::max<int64_t>(st.attempt, 0);
  s.failures = st.failures;
  s.reports = static_cast<int64_t>(st.history.size());
  if (!st.history.empty())
    s.latest = st.history.back().metrics;
  s.path = st.spec->dir;
  return s;
}

/// Moves the run to `state` (see RunStatus) and tells the run's callbacks.
void set_state(Self self, const std::string& state) {
  auto& st = self->state;
  if (st.state == state)
    return;
  st.state = state;
  st.states.push_back(state);
  if (run_config(self).callbacks.empty())
    return;
  auto status = status_of(self);
  for (auto& cb : run_config(self).callbacks)
    cb->on_state(status);
}

void fail_waiters(Self self, const caf::error& err);

void announce_result(Self self);

// -- worker processes ----------------------------------------------------------------------

bool process_mode(Self self) {
  return self->state.spec->options.scaling.worker_mode == "process";
}

/// Publishes the run's hub, where its worker processes connect (on 127.0.0.1, or on a
/// cluster where its nodes reach this driver: a worker process connects to its driver
/// directly). False, with the run ended, when it cannot.
bool open_hub(Self self) {
  auto& st = self->state;
  if (st.spec->options.run.failure.warm_spares)
    st.spares = std::make_shared<SparePool>();
  st.hub = self->spawn<caf::linked>(hub_actor, st.spares);
  // On a cluster, worker processes on other machines connect here too.
  auto host = st.cluster ? advertised_host(self->system()) : std::string("127.0.0.1");
  auto port = net::publish(self->system(), st.hub, 0, host == "127.0.0.1" ? "127.0.0.1" : nullptr);
  if (!port) {
    st.error = RunError{Errc::unavailable, "cannot open the port worker processes connect to: " +
                                             self->system().render(port.error())};
    return false;
  }
  st.hub_port = *port;
  return true;
}

void close_hub(Self self) {
  auto& st = self->state;
  if (!st.hub)
    return;
  if (st.hub_port != 0)
    net::unpublish(self->system(), st.hub, st.hub_port);
  self->unlink_from(st.hub);
  self->send_exit(st.hub, caf::exit_reason::user_shutdown);
  st.hub = nullptr;
  st.hub_port = 0;
}

/// The real path of this program's binary: what a cluster's nodes start (a path valid
/// on every node, as with torchrun or MPI).
std::string own_executable() {
  std::error_code ec;
  auto path = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("/proc/self/exe") : path.string();
}

/// Lets worker processes that do not see the run's storage fetch `ckpt`'s files.
void serve(Self self, const Checkpoint& ckpt) {
  if (!process_mode(self))
    return;
  std::vector<std::string> files;
  for (auto& [file, digest] : ckpt.metadata().files)
    files.push_back(file);
  self->send(self->state.files, serve_files_atom::value, ckpt.path(), std::move(files));
}

/// Where each rank of a placement (`nodes`, a node per rank) stands: its rank among its
/// node's ranks, and the node's rank (in order of first use).
struct Standing {
  int64_t local_rank = 0;
  int64_t node_rank = 0;
  int64_t local_world_size = 0;
};

std::vector<Standing> standings(const std::vector<std::string>& nodes) {
  std::vector<std::string> order;
  std::map<std::string, int64_t> per_node, seen;
  for (auto& node : nodes) {
    if (!per_node.count(node))
      order.push_back(node);
    ++per_node[node];
  }
  std::vector<Standing> result;
  for (auto& node : nodes)
    result.push_back({seen[node]++, std::find(order.begin(), order.end(), node) - order.begin(), per_node[node]});
  return result;
}

/// The CUDA_VISIBLE_DEVICES of a worker process of local rank `local_rank`: a CPU worker
/// sees no GPU (as Ray sets it); a GPU worker sees its own, as cuda:0.
std::string visible_devices(Self self, int64_t local_rank) {
  return self->state.spec->options.scaling.use_gpu ? std::to_string(local_rank) : "";
}

/// The CUDA_VISIBLE_DEVICES of each rank standing as `where` says.
std::vector<std::string> devices_of(Self self, const std::vector<Standing>& where) {
  std::vector<std::string> devices;
  for (auto& s : where)
    devices.push_back(visible_devices(self, s.local_rank));
  return devices;
}

/// How rank `ws.context.world_rank` is started as a worker process: what it is told at
/// its hello, its command line and environment (torch's variables, as torchrun sets
/// them; the launcher adds where its hub listens).
LaunchSpec launch_spec(Self self, WorkerSpec& ws) {
  auto& st = self->state;
  auto& ctx = ws.context;
  auto& options = st.spec->options;
  auto& scaling = options.scaling;
  auto& run = options.run;
  if (scaling.use_gpu)
    ctx.device = "cuda:0"; // the process sees its own GPU only
  LaunchSpec ls;
  auto& a = ls.assignment;
  a.context = ctx;
  a.trainer = caf::actor_cast<caf::actor>(self);
  a.store = st.store;
  a.files = st.files;
  a.checkpoint = ws.checkpoint;
  a.storage_id = st.storage_id;
  if (ws.checkpoint)
    serve(self, *ws.checkpoint);
  a.first_report_index = ws.first_report_index;
  a.train_loop_config = config_to_json(options.train_loop_config);
  a.backend = resolve_backend(options);
  a.report_timeout_ms = run.report_timeout.count();
  a.collective_timeout_ms = run.collective_timeout.count();
  a.heartbeat_timeout_ms = run.heartbeat_timeout.count();
  ls.key = random_hex(32) + "-r" + std::to_string(ctx.world_rank) + "-a" + std::to_string(ctx.attempt);
  ls.program = st.cluster ? own_executable() : "/proc/self/exe";
  ls.argv = worker_command();
  ls.stop_grace_ms = run.stop_grace.count();
  if (st.spares)
    ls.spare_slot = st.spec->name + "/rank " + std::to_string(ctx.world_rank);
  ls.env = {
    {"CAFTRAIN_WORKER_KEY", ls.key},
    {"CAFTRAIN_WORKER_RUN", st.spec->name},
    {"CAFTRAIN_WORKER_JOB", std::to_string(st.spec->job)},
    {"RANK", std::to_string(ctx.world_rank)},
    {"LOCAL_RANK", std::to_string(ctx.local_rank)},
    {"WORLD_SIZE", std::to_string(ctx.world_size)},
    {"LOCAL_WORLD_SIZE", std::to_string(ctx.local_world_size)},
    {"NODE_RANK", std::to_string(ctx.node_rank)},
    {"CUDA_VISIBLE_DEVICES", visible_devices(self, ctx.local_rank)},
    {"OMP_NUM_THREADS", std::to_string(ctx.num_threads)},
  };
  if (st.cluster) // the worker connects to this driver directly (see worker_process.cpp)
    ls.env["CAFTRAIN_WORKER_DRIVER"] = advertised_host(self->system()) + ":" + std::to_string(st.hub_port);
  // A driver that found its cluster in the environment (a job of `caftrain submit`)
  // passes it on: its program must take the same path to fit in the worker processes.
  for (auto name : {"CAFTRAIN_ADDRESS", "CAFTRAIN_JOB_ID"})
    if (const char* value = std::getenv(name))
      ls.env[name] = value;
  return ls;
}

/// A rank that never ran, or whose process was lost with its node: its end as the
/// trainer records it.
WorkerExit lost_rank(Self self, int64_t rank, const std::string& what) {
  WorkerExit exit;
  exit.rank = rank;
  exit.attempt = self->state.attempt;
  exit.failed = true;
  exit.error = RunError{Errc::worker_failed, what, rank, self->state.attempt};
  return exit;
}

void on_worker_exit(Self self, const WorkerExit& exit);

void launch_on_node(Self self, int64_t attempt, int64_t rank, std::string node, LaunchSpec spec);

/// Starts rank `ws.context.world_rank` as a worker process: here, through a launcher of
/// this actor; on a cluster, through the agent of the rank's node (via the head).
void launch_process(Self self, WorkerSpec ws) {
  auto& st = self->state;
  auto rank = ws.context.world_rank;
  auto spec = launch_spec(self, ws);
  if (!st.cluster) {
    st.workers.push_back(self->spawn<caf::monitored>(launcher_actor, std::move(spec),
                                                     HubAddress{st.hub, "127.0.0.1", st.hub_port, st.spares}));
    return;
  }
  st.workers.emplace_back(); // the launcher, once the node has started it
  launch_on_node(self, st.attempt, rank, st.rank_nodes[static_cast<size_t>(rank)], std::move(spec));
}

/// Calls `then(agent)` with the agent of `node`, connecting to the node directly first
/// (its address from the head) when this driver has not yet: launchers and this trainer
/// then talk without a hop. Calls `give_up(why)` when the node cannot be reached.
void with_agent(Self self, const std::string& node, std::function<void(caf::actor)> then,
                std::function<void(const std::string&)> give_up) {
  auto& st = self->state;
  if (auto agent = st.agents.find(node); agent != st.agents.end())
    return then(agent->second);
  auto timeout = run_config(self).collective_timeout;
  self->request(st.cluster->head, timeout, cluster_status_atom::value)
    .then(
      [=](ClusterStatus& cluster) {
        auto found = std::find_if(cluster.nodes.begin(), cluster.nodes.end(),
                                  [&](const NodeView& n) { return n.id == node; });
        if (found == cluster.nodes.end())
          return give_up("it is not in the cluster any more");
        auto where = found->address;
        std::pair<std::string, uint16_t> address;
        try {
          address = parse_address(where);
        } catch (const Error& e) {
          return give_up(e.what());
        }
        self->request(net::connector(self->system()), timeout, caf::connect_atom::value,
                      address.first, address.second)
          .then(
            [=](const caf::node_id&, caf::strong_actor_ptr& ptr, const std::set<std::string>&) {
              if (!ptr)
                return give_up("its agent at " + where + " is not published");
              auto agent = caf::actor_cast<caf::actor>(ptr);
              self->state.agents[node] = agent;
              then(agent);
            },
            [=](caf::error& err) { give_up("cannot connect to it: " + self->system().render(err)); });
      },
      [=](caf::error& err) { give_up("the head did not answer: " + to_run_error(err).message); });
}

/// Hands rank `rank`'s spec to the agent of `node`.
void launch_on_node(Self self, int64_t attempt, int64_t rank, std::string node, LaunchSpec spec) {
  auto give_up = [=](const std::string& why) {
    auto& st = self->state;
    if (st.result || st.attempt != attempt)
      return;
    on_worker_exit(self, lost_rank(self, rank, "rank " + std::to_string(rank) + ": node '" + node +
                                                 "' did not start its worker process: " + why));
  };
  auto launch = [=](caf::actor agent) mutable {
    auto timeout = run_config(self).collective_timeout;
    self->request(agent, timeout, launch_atom::value, std::move(spec))
      .then(
        [=](caf::actor& launcher) {
          auto& st = self->state;
          if (st.result || st.attempt != attempt || !st.running.count(rank)) {
            self->send_exit(launcher, caf::exit_reason::user_shutdown);
            return;
          }
          self->monitor(launcher);
          st.workers[static_cast<size_t>(rank)] = launcher;
          if (st.stopping)
            self->send_exit(launcher, make_caf_error(Errc::cancelled, "the attempt was stopped"));
        },
        [=](caf::error& err) {
          self->state.agents.erase(node); // connect again next time
          give_up(to_run_error(err).message);
        });
  };
  with_agent(self, node, launch, give_up);
}

/// Has `node` start `count` spares of the run for a node's loss, with CUDA_VISIBLE_DEVICES
/// `devices` (the rest of a spare's variables are its assignment's once claimed).
void start_loss_spares(Self self, int64_t attempt, const std::string& node, const std::string& devices,
                       int64_t count) {
  auto& st = self->state;
  WorkerSpec ws; // a spec like a rank's
  ws.run = st.spec;
  ws.context.world_size = static_cast<int64_t>(st.rank_nodes.size());
  ws.context.local_rank = devices.empty() ? 0 : std::stoll(devices);
  ws.context.attempt = attempt;
  ws.context.run_name = st.spec->name;
  ws.context.run_dir = st.spec->dir;
  ws.context.num_threads = 1;
  std::vector<LaunchSpec> specs;
  for (int64_t i = 0; i < count; ++i) {
    auto spec = launch_spec(self, ws);
    spec.spare_slot = st.spec->name + "/node loss spare " + devices + "#" + std::to_string(i);
    specs.push_back(std::move(spec));
  }
  with_agent(
    self, node,
    [=](caf::actor agent) {
      for (auto& spec : specs)
        self->send(agent, spare_start_atom::value, spec);
    },
    [=](const std::string& why) {
      spdlog::info("caftrain: run {}: no warm spare on node '{}': {}", self->state.spec->name, node, why);
    });
}

/// Warm spares for a node's loss (FailureConfig::warm_spares on a cluster). A rank's own
/// spare is on its node and goes with it; so for each node of the placement this asks
/// the pool where the run would be placed again without that node, and has every other
/// node that would then hold more of the run's ranks than it holds now (per
/// CUDA_VISIBLE_DEVICES) start the difference as spares of the run. A restart's launcher
/// there claims one of them; a worker process takes its rank's variables from its
/// assignment. Spares of a slot already there are not started twice.
void plan_loss_spares(Self self, int64_t attempt) {
  auto& st = self->state;
  if (st.result || st.stopping || st.attempt != attempt || !st.placement || !st.placement_request)
    return;
  auto now = devices_of(self, standings(st.rank_nodes));
  std::set<std::string> lost_nodes(st.rank_nodes.begin(), st.rank_nodes.end());
  for (auto& lost : lost_nodes) {
    self->request(st.pool, run_config(self).collective_timeout, pool_backup_atom::value,
                  *st.placement_request, st.placement->id, lost)
      .then(
        [=](std::vector<std::string>& nodes) {
          auto& st = self->state;
          if (st.result || st.stopping || st.attempt != attempt || nodes.size() != st.rank_nodes.size())
            return; // the run would not fit without that node: nothing to prepare for
          auto then = devices_of(self, standings(nodes));
          std::map<std::pair<std::string, std::string>, int64_t> extra; // (node, devices)
          for (size_t r = 0; r < nodes.size(); ++r) {
            ++extra[{nodes[r], then[r]}];
            --extra[{st.rank_nodes[r], now[r]}];
          }
          for (auto& [where, count] : extra)
            if (count > 0 && where.first != lost)
              start_loss_spares(self, attempt, where.first, where.second, count);
        },
        [](caf::error&) {
          // no prediction (an older head): the restart starts its processes
        });
  }
}

void finish(Self self) {
  auto& st = self->state;
  if (st.result)
    return;
  set_state(self, !st.error                            ? "finished"
                  : st.error->code == Errc::cancelled ? "aborted"
                                                      : "errored");
  if (st.placement && !st.spec->placement) {
    // Before anyone learns the run ended: a run started next is placed after this. A
    // placement the caller made (a Tuner's trial) is the caller's to release.
    self->send(st.pool, pool_release_atom::value, st.placement->id);
  }
  st.placement.reset();
  close_hub(self);
  auto r = build_result(self);
  st.result = r;
  for (auto& w : st.workers) {
    if (!w)
      continue;
    self->demonitor(w);
    self->send_exit(w, caf::exit_reason::user_shutdown);
  }
  st.workers.clear();
  if (!st.persister) {
    write_result_file(r);
    return announce_result(self);
  }
  // result.json is on disk before anyone learns the run ended.
  self->request(st.persister, caf::infinite, result_file_atom::value, r)
    .then([=](bool) { announce_result(self); }, [=](caf::error&) { announce_result(self); });
}

void announce_result(Self self) {
  auto& st = self->state;
  auto& r = *st.result;
  for (auto& cb : run_config(self).callbacks)
    cb->on_finish(r);
  for (auto& p : st.fit_promises)
    p.deliver(r);
  st.fit_promises.clear();
  for (auto& s : st.subscribers)
    self->send(s, done_atom::value, r);
  if (st.persister) {
    auto persister = st.persister;
    st.persister = nullptr;
    self->demonitor(persister);
    self->send(persister, io_done_atom::value); // after the writes already sent
  }
  fail_waiters(self, make_caf_error(Errc::bad_state, "the run has ended"));
  // The actor ends with its run: pending timers and promises would otherwise keep it (and
  // the actor system's shutdown) waiting.
  self->quit();
}

// -- attempts -----------------------------------------------------------------------------

void start_workers(Self self, int64_t attempt, std::optional<Checkpoint> latest);

void request_placement(Self self, int64_t attempt);

void launch_attempt(Self self, int64_t attempt) {
  auto& st = self->state;
  if (st.placement_lost && !st.spec->placement) {
    // A node of the placement is gone: the pool places the run again on what is left.
    st.placement_lost = false;
    st.placement.reset();
    spdlog::info("caftrain: run {} is placed again for attempt {} (a node was lost)", st.spec->name, attempt);
    return request_placement(self, attempt);
  }
  st.attempt = attempt;
  set_state(self, "running");
  st.rounds.clear();
  st.running.clear();
  st.succeeded.clear();
  st.workers.clear();
  // Start from the latest good checkpoint (a corrupt one is skipped), else the initial
  // one. The I/O actor checks them (reading every file is no work for a CAF thread); the
  // workers then trust its check (Checkpoint::validate_once).
  std::vector<Checkpoint> candidates;
  for (auto i = st.manager->kept().rbegin(); i != st.manager->kept().rend(); ++i)
    candidates.push_back(i->first);
  if (candidates.empty() || !st.persister)
    return start_workers(self, attempt, st.manager->latest_valid());
  self->request(st.persister, caf::infinite, validate_atom::value, candidates)
    .then(
      [=](int64_t i) {
        auto& st = self->state;
        if (st.result || st.stopping || st.attempt != attempt)
          return;
        start_workers(self, attempt,
                      i < 0 ? std::nullopt : std::optional<Checkpoint>(candidates[static_cast<size_t>(i)]));
      },
      [=](caf::error&) {
        auto& st = self->state;
        if (st.result || st.stopping || st.attempt != attempt)
          return;
        start_workers(self, attempt, st.manager->latest_valid());
      });
}

/// Spawns the workers of `attempt`, which start from `latest` (the newest checkpoint
/// that validated) or the initial checkpoint.
void start_workers(Self self, int64_t attempt, std::optional<Checkpoint> latest) {
  auto& st = self->state;
  auto& scaling = st.spec->options.scaling;
  std::optional<Checkpoint> start = std::move(latest);
  // A run told to prefer the initial one (a PBT trial exploiting another's checkpoint)
  // starts from that until it has checkpointed anew.
  if (st.initial_checkpoint &&
      (!start || (st.spec->prefer_initial_checkpoint && start->path() == st.adopted_latest)))
    start = st.initial_checkpoint;
  // Reports go on after the checkpoint's own report of this run; from another run's
  // checkpoint, after the history the run had when this actor started (fresh: from 0).
  int64_t first_index = 0;
  if (start && start->committed())
    first_index = start->metadata().run == st.spec->name ? start->metadata().report_index + 1
                                                         : st.adopted_reports;
  // Reports the failed attempt made after that checkpoint are redone by this one.
  while (!st.history.empty() && st.history.back().index >= first_index)
    st.history.pop_back();
  st.next_index = first_index;
  auto n = scaling.num_workers;
  auto cores = static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  auto threads = scaling.resources_per_worker.cpus > 0
                   ? static_cast<int64_t>(scaling.resources_per_worker.cpus)
                   : std::max<int64_t>(1, cores / n);
  // Bundles placed by a caller that runs several jobs at once (a Tuner's trials): each
  // worker uses the CPUs of its bundle, as Ray sets OMP_NUM_THREADS for a trial.
  if (st.spec->placement && scaling.resources_per_worker.cpus <= 0 && !st.placement->bundles.empty())
    threads = std::max<int64_t>(1, static_cast<int64_t>(st.placement->bundles.front().get("CPU")));
  std::vector<std::shared_ptr<LocalCommunicator>> local;
  if (n > 1 && resolve_backend(st.spec->options) == "local")
    local = LocalCommunicator::create_group(static_cast<int>(n), run_config(self).collective_timeout);
  // Where each rank stands: its node, its rank among the node's ranks, the node's rank.
  st.rank_nodes.assign(static_cast<size_t>(n), "local");
  if (st.placement && st.placement->nodes.size() == static_cast<size_t>(n))
    st.rank_nodes = st.placement->nodes;
  auto where = standings(st.rank_nodes);
  for (int64_t rank = 0; rank < n; ++rank) {
    WorkerSpec ws;
    if (!local.empty())
      ws.communicator = local[static_cast<size_t>(rank)];
    ws.run = st.spec;
    ws.trainer = self;
    ws.store = st.store;
    ws.files = st.files;
    ws.checkpoint = start;
    ws.first_report_index = first_index;
    auto& ctx = ws.context;
    auto& stands = where[static_cast<size_t>(rank)];
    ctx.world_rank = rank;
    ctx.local_rank = stands.local_rank;
    ctx.node_rank = stands.node_rank;
    ctx.world_size = n;
    ctx.local_world_size = stands.local_world_size;
    ctx.device = scaling.use_gpu ? "cuda:" + std::to_string(ctx.local_rank) : "cpu";
    ctx.num_threads = threads;
    // On a cluster each worker uses the CPUs of its bundle on its node.
    if (st.cluster && scaling.resources_per_worker.cpus <= 0 && st.placement)
      ctx.num_threads = std::max<int64_t>(1, static_cast<int64_t>(st.placement->bundles[static_cast<size_t>(rank)].get("CPU")));
    ctx.run_name = st.spec->name;
    ctx.run_dir = st.spec->dir;
    ctx.attempt = attempt;
    st.running.insert(rank);
    if (process_mode(self))
      launch_process(self, std::move(ws));
    else
      st.workers.push_back(self->spawn<caf::monitored>(worker_actor, std::move(ws)));
  }
  spdlog::debug("caftrain: run {} attempt {} started {} workers", st.spec->name, attempt, n);
  if (st.cluster && st.spares && process_mode(self))
    self->delayed_send(self, kLossSparesAfter, loss_spares_atom::value, attempt);
}

void fail_waiters(Self self, const caf::error& err) {
  auto& st = self->state;
  for (auto& [index, round] : st.rounds)
    for (auto& p : round.promises)
      if (p.pending())
        p.deliver(err);
  st.rounds.clear();
  self->send(st.store, store_fail_atom::value, err);
}

void complete_stop(Self self) {
  auto& st = self->state;
  st.stopping = false;
  for (auto& w : st.workers) {
    if (!w)
      continue;
    self->demonitor(w);
    self->send_exit(w, caf::exit_reason::user_shutdown);
  }
  st.workers.clear();
  if (st.cause && st.after_stop == AfterStop::decide) {
    auto err = *st.cause;
    st.cause.reset();
    ++st.failures;
    auto max = run_config(self).failure.max_failures;
    bool restart = err.code != Errc::invalid_config && (max < 0 || st.failures <= max);
    spdlog::warn("caftrain: run {} attempt {}: {}{}", st.spec->name, st.attempt, err.message,
                 restart ? " (restarting)" : "");
    for (auto& cb : run_config(self).callbacks)
      cb->on_failure(err.message, st.attempt + 1, restart);
    if (restart) {
      set_state(self, "restarting");
      if (st.persists_in_flight > 0) {
        st.restart_after_persists = true; // on_persisted launches it
        return;
      }
      return launch_attempt(self, st.attempt + 1);
    }
    st.error = err;
  }
  st.restart_after_persists = false;
  finish(self);
}

/// Stops every worker of the current attempt; continues once their threads have exited
/// (or the grace period is over): with a restart-or-finish decision after a failure
/// (`decide`), or by finishing the run (`finish`: cancel, stop criteria).
void stop_attempt(Self self, AfterStop after, const std::string& reason) {
  auto& st = self->state;
  if (st.stopping) {
    if (after == AfterStop::finish)
      st.after_stop = after; // a cancel during a restart ends the run
    return;
  }
  st.stopping = true;
  st.after_stop = after;
  set_state(self, "stopping");
  fail_waiters(self, make_caf_error(Errc::cancelled, reason));
  for (auto& w : st.workers)
    if (w)
      self->send_exit(w, make_caf_error(Errc::cancelled, reason));
  if (st.running.empty())
    return complete_stop(self);
  // Launchers kill their processes after stop_grace and report each end: the trainer's
  // own timer is only the backstop there.
  auto grace = run_config(self).stop_grace;
  if (process_mode(self))
    grace += std::chrono::seconds(5);
  self->delayed_send(self, grace, grace_atom::value, st.attempt);
}

/// How telling a failure is about its cause: a rank whose collective was aborted because
/// a peer closed the group failed as a consequence, not as the cause.
int severity(Errc code) {
  switch (code) {
    case Errc::cancelled: return 0;
    case Errc::collective_aborted: return 1;
    case Errc::collective_timeout:
    case Errc::report_timeout: return 2;
    default: return 3;
  }
}

void worker_failed(Self self, RunError err) {
  auto& st = self->state;
  if (st.result)
    return;
  if (st.stopping) {
    // While the group is torn down, keep the most telling cause seen.
    if (st.cause && severity(err.code) > severity(st.cause->code))
      st.cause = err;
    return;
  }
  st.cause = err;
  stop_attempt(self, AfterStop::decide, err.message);
}

// -- reports --------------------------------------------------------------------------------

bool stop_criteria_reached(const RunConfig& run, const ReportRecord& rec) {
  for (auto& [key, threshold] : run.stop) {
    if (key == "training_iteration" && static_cast<double>(rec.index + 1) >= threshold)
      return true;
    auto it = rec.metrics.find(key);
    if (it != rec.metrics.end() && it->second >= threshold)
      return true;
  }
  return false;
}

void complete_round(Self self, int64_t index);

void record_round(Self self, int64_t index, TrainerState::Round& round, const Checkpoint& ckpt) {
  auto& st = self->state;
  ReportRecord rec;
  rec.run = st.spec->name;
  rec.index = index;
  rec.attempt = st.attempt;
  for (auto& r : round.reports)
    rec.all_metrics.push_back(r->metrics);
  rec.metrics = rec.all_metrics.front();
  rec.checkpoint_path = ckpt.path();
  rec.timestamp = now_seconds();
  if (ckpt.valid())
    serve(self, ckpt);
  st.history.push_back(rec);
  self->send(st.persister, history_atom::value, st.spec->dir, rec);
  for (auto& s : st.subscribers)
    self->send(s, rec);
  for (auto& cb : run_config(self).callbacks)
    cb->on_report(rec);
  for (auto& p : round.promises)
    if (p.pending())
      p.deliver(ack_atom::value, ckpt);
  st.rounds.erase(index);
  st.next_index = index + 1;
  if (!st.stop_criteria_met && stop_criteria_reached(run_config(self), rec)) {
    st.stop_criteria_met = true;
    stop_attempt(self, AfterStop::finish, "stop criteria reached");
    return;
  }
  // Rounds complete in index order; the next one may already be full.
  auto next = st.rounds.find(st.next_index);
  if (next != st.rounds.end() && next->second.arrived == next->second.reports.size() &&
      !next->second.persisting)
    complete_round(self, st.next_index);
}

/// The directory name of round `index`'s checkpoint: the name the reports gave
/// (`train::ReportArgs::checkpoint_dir_name`, rank 0's first), else checkpoint_<index>.
/// Throws `Error(invalid_config)` for a name that is not a plain one or is taken.
std::string checkpoint_dir_name(Self self, int64_t index, const TrainerState::Round& round) {
  auto& st = self->state;
  std::string name;
  for (auto& r : round.reports)
    if (name.empty())
      name = r->checkpoint_dir_name;
  if (name.empty())
    return checkpoint_name(index);
  auto where = "train::report #" + std::to_string(index) + ": checkpoint_dir_name '" + name + "'";
  if (name.find('/') != std::string::npos || name == "." || name == ".." || name.front() == '.')
    throw Error(Errc::invalid_config, where + " is not a plain directory name (no '/', not "
                                              "starting with '.'); use a name like \"epoch_3\"");
  for (auto reserved : {kRunFile, kHistoryFile, kResultFile})
    if (name == reserved)
      throw Error(Errc::invalid_config, where + " is the name of the run's own file; choose another");
  std::error_code ec;
  if (fs::exists(fs::path(st.spec->dir) / name, ec))
    throw Error(Errc::invalid_config,
                where + " already exists in the run directory '" + st.spec->dir +
                  "' (it is left as it is); give every checkpoint its own name, e.g. with the "
                  "epoch or step in it, or leave checkpoint_dir_name empty");
  return name;
}

/// A checkpoint whose attempt was stopped between its round's reports and its commit
/// (a cancel, a failure, the process killed): the round was complete on every rank, so
/// its report counts, once: added to the history from the checkpoint's metadata unless
/// the history has it. A restart and a resumed run both use it.
void record_late_commit(Self self, const Checkpoint& ckpt) {
  auto& st = self->state;
  auto& md = ckpt.metadata();
  if (md.report_index < 0 || st.result)
    return;
  auto at = std::find_if(st.history.begin(), st.history.end(),
                         [&](const ReportRecord& r) { return r.index >= md.report_index; });
  if (at != st.history.end() && at->index == md.report_index)
    return;
  ReportRecord rec{st.spec->name, md.report_index, md.attempt, md.metrics, {md.metrics},
                   ckpt.path(), md.created_at};
  self->send(st.persister, history_atom::value, st.spec->dir, rec);
  st.history.insert(at, std::move(rec));
}

/// A checkpoint left the persister: a restart that waited for the writes starts now.
void on_persisted(Self self) {
  auto& st = self->state;
  if (st.persists_in_flight > 0 || !st.restart_after_persists)
    return;
  st.restart_after_persists = false;
  if (st.result)
    return;
  launch_attempt(self, st.attempt + 1);
}

void complete_round(Self self, int64_t index) {
  auto& st = self->state;
  auto& round = st.rounds.at(index);
  std::vector<std::string> sources;
  for (auto& r : round.reports)
    if (!r->checkpoint_dir.empty())
      sources.push_back(r->checkpoint_dir);
  if (sources.empty())
    return record_round(self, index, round, Checkpoint());
  auto& metrics = round.reports.front()->metrics;
  std::string name;
  try {
    st.manager->check_metrics(metrics);
    name = checkpoint_dir_name(self, index, round);
  } catch (const Error& e) {
    worker_failed(self, RunError{Errc::invalid_config, e.what(), 0, st.attempt});
    return;
  }
  PersistRequest req;
  req.final_path = (fs::path(st.spec->dir) / name).string();
  req.sources = sources;
  auto& meta = req.metadata;
  meta.run = st.spec->name;
  meta.attempt = st.attempt;
  meta.report_index = index;
  meta.metrics = metrics;
  meta.epoch = metrics.count("epoch") ? static_cast<int64_t>(metrics.at("epoch")) : 0;
  meta.global_step = metrics.count("step") ? static_cast<int64_t>(metrics.at("step")) : 0;
  meta.world_size = st.spec->options.scaling.num_workers;
  round.persisting = true;
  ++st.persists_in_flight;
  auto attempt = st.attempt;
  self->request(st.persister, caf::infinite, persist_atom::value, req)
    .then(
      [=](Checkpoint& ckpt) {
        auto& st = self->state;
        --st.persists_in_flight;
        // A committed checkpoint is complete, whatever happened to the attempt meanwhile.
        st.manager->register_checkpoint(ckpt, ckpt.metadata().metrics);
        if (st.attempt != attempt || st.rounds.count(index) == 0)
          record_late_commit(self, ckpt);
        else
          record_round(self, index, st.rounds.at(index), ckpt);
        on_persisted(self);
      },
      [=](caf::error& err) {
        auto& st = self->state;
        --st.persists_in_flight;
        if (st.attempt == attempt && !st.stopping && !st.restart_after_persists)
          worker_failed(self, to_run_error(err, -1, attempt));
        on_persisted(self);
      });
}

caf::response_promise on_report(Self self, WorkerReport& r) {
  auto& st = self->state;
  auto rp = self->make_response_promise();
  if (st.result || st.stopping || r.attempt != st.attempt) {
    rp.deliver(make_caf_error(Errc::cancelled, "the attempt this report belongs to was stopped"));
    return rp;
  }
  auto n = static_cast<size_t>(st.spec->options.scaling.num_workers);
  if (r.index < st.next_index) {
    rp.deliver(make_caf_error(Errc::bad_state, "report #" + std::to_string(r.index) +
                                                 " arrived after it was completed"));
    return rp;
  }
  auto& round = st.rounds[r.index];
  if (round.reports.empty())
    round.reports.resize(n);
  auto rank = static_cast<size_t>(r.rank);
  if (rank >= n || round.reports[rank]) {
    rp.deliver(make_caf_error(Errc::bad_state, "duplicate report"));
    return rp;
  }
  if (round.arrived == 0)
    self->delayed_send(self, run_config(self).report_timeout, report_timeout_atom::value, st.attempt,
                       r.index);
  auto index = r.index;
  round.reports[rank] = std::move(r);
  round.promises.push_back(rp);
  ++round.arrived;
  // A rank that already returned from train_func will never make this report.
  for (auto done : st.succeeded) {
    if (!round.reports[static_cast<size_t>(done)]) {
      worker_failed(self, RunError{Errc::rank_mismatch,
                                   "rank " + std::to_string(done) +
                                     " returned from train_func without report #" +
                                     std::to_string(index) +
                                     " that other ranks made; every rank must call "
                                     "train::report the same number of times",
                                   done, st.attempt});
      return rp;
    }
  }
  if (round.arrived == n && index == st.next_index)
    complete_round(self, index);
  return rp;
}

void on_report_timeout(Self self, int64_t attempt, int64_t index) {
  auto& st = self->state;
  if (attempt != st.attempt || st.stopping || st.rounds.count(index) == 0)
    return;
  auto& round = st.rounds.at(index);
  if (round.arrived == round.reports.size())
    return;
  std::string missing, present;
  int64_t first_missing = -1;
  for (size_t k = 0; k < round.reports.size(); ++k) {
    auto& list = round.reports[k] ? present : missing;
    list += (list.empty() ? "" : ", ") + std::to_string(k);
    if (!round.reports[k] && first_missing < 0)
      first_missing = static_cast<int64_t>(k);
  }
  auto secs = std::chrono::duration<double>(run_config(self).report_timeout).count();
  worker_failed(self, RunError{Errc::report_timeout,
                               "rank " + missing + " did not reach report #" +
                                 std::to_string(index) + " within " + std::to_string(secs) +
                                 " s of rank " + present +
                                 "; every rank must call train::report the same number of times",
                               first_missing, attempt});
}

void on_worker_exit(Self self, const WorkerExit& exit) {
  auto& st = self->state;
  if (exit.attempt != st.attempt)
    return; // a thread of an earlier attempt
  st.running.erase(exit.rank);
  if (st.stopping) {
    if (exit.failed)
      worker_failed(self, exit.error);
    if (st.running.empty())
      complete_stop(self);
    return;
  }
  if (exit.failed)
    return worker_failed(self, exit.error);
  st.succeeded.insert(exit.rank);
  // A rank that is done can no longer report: a round waiting for it never completes.
  for (auto& [index, round] : st.rounds) {
    if (!round.reports[static_cast<size_t>(exit.rank)]) {
      return worker_failed(self,
                           RunError{Errc::rank_mismatch,
                                    "rank " + std::to_string(exit.rank) +
                                      " returned from train_func without report #" +
                                      std::to_string(index) +
                                      " that other ranks made; every rank must call "
                                      "train::report the same number of times",
                                    exit.rank, exit.attempt});
    }
  }
  if (st.running.empty())
    finish(self);
}

/// The pool granted the run's bundles: attempt `attempt` starts.
void placed(Self self, Placement& placement, int64_t attempt) {
  auto& st = self->state;
  st.placing = false;
  st.waiting_reason.clear();
  st.placement = std::move(placement);
  if (attempt == st.first_attempt)
    self->send(st.persister, unresult_atom::value, st.spec->dir); // a resumed run has not ended (yet)
  launch_attempt(self, attempt);
}

/// Asks the pool for the run's bundles; attempt `attempt` starts once they are granted.
/// A run that does not fit beside the others waits (with the pool's reason), one that can
/// never fit ends with the pool's explanation.
void request_placement(Self self, int64_t attempt) {
  auto& st = self->state;
  auto& scaling = st.spec->options.scaling;
  auto bundles = scaling.worker_bundles();
  // worker_bundles shares this machine's cores among more workers than it has; a
  // cluster's workers get a CPU each on their nodes (Ray's default).
  if (st.cluster && scaling.resources_per_worker.cpus <= 0)
    for (size_t i = 0; i < bundles.size(); ++i)
      bundles[i].set("CPU", 1.0 + (i == 0 ? scaling.trainer_resources.cpus : 0.0));
  PlacementRequest request{st.spec->name, std::move(bundles),
                           placement_strategy_from_string(scaling.placement_strategy)};
  st.placement_request = request;
  st.placing = true;
  self->request(st.pool, caf::infinite, pool_request_atom::value, std::move(request))
    .then([=](Placement& p) { placed(self, p, attempt); },
          [=](caf::error& err) {
            auto& st = self->state;
            st.placing = false;
            st.error = to_run_error(err, -1, std::max<int64_t>(attempt, 0));
            st.attempt = std::max<int64_t>(attempt, 0);
            finish(self);
          });
  // Asked after the request, so the pool answers with its decision made.
  self->request(st.pool, caf::infinite, pool_reason_atom::value, st.spec->name)
    .then([=](std::string& why) {
      auto& st = self->state;
      if (!st.placing || why.empty())
        return;
      st.waiting_reason = why;
      spdlog::info("caftrain: run {} is pending: {}", st.spec->name, why);
    },
    [](caf::error&) {
      // no reason to show; the placement itself still answers
    });
}

void start(Self self) {
  auto& st = self->state;
  if (st.attempt >= 0 || st.placing)
    return;
  std::error_code ec;
  fs::create_directories(st.spec->dir, ec);
  if (ec) {
    st.error = RunError{Errc::io_error, "cannot create run directory '" + st.spec->dir + "': " + ec.message()};
    st.attempt = 0;
    return finish(self);
  }
  // Every job of the actor system places its workers through one pool (the cluster's,
  // when the program connected to one).
  st.cluster = cluster_of(self->system());
  st.pool = st.cluster ? st.cluster->pool : local_pool(self->system());
  if (st.cluster)
    self->send(st.cluster->head, run_register_atom::value,
               RunView{st.spec->name, process_label(), caf::actor_cast<caf::actor>(self)});
  if (process_mode(self) && !open_hub(self)) {
    st.attempt = 0;
    return finish(self);
  }
  if (process_mode(self))
    st.storage_id = transfer::mark_storage(st.spec->dir);
  if (st.spec->placement) {
    auto given = *st.spec->placement;
    return placed(self, given, st.first_attempt);
  }
  request_placement(self, st.first_attempt);
}

/// The pool lost a node of this run's placement (a cluster's node died or stopped
/// answering): its ranks there are gone with it, and the next attempt is placed anew.
void placement_lost(Self self, uint64_t id, const std::string& node) {
  auto& st = self->state;
  if (!st.placement || st.placement->id != id || st.result)
    return;
  st.placement_lost = true;
  st.agents.erase(node);
  for (size_t rank = 0; rank < st.rank_nodes.size(); ++rank) {
    auto r = static_cast<int64_t>(rank);
    if (st.rank_nodes[rank] == node && st.running.count(r))
      on_worker_exit(self, lost_rank(self, r, "rank " + std::to_string(r) + ": node '" + node +
                                                "' was lost (its process ended or stopped "
                                                "answering) and its worker process with it"));
  }
}

} // namespace

caf::behavior trainer_actor(caf::stateful_actor<TrainerState>* self, std::shared_ptr<RunSpec> spec) {
  auto& st = self->state;
  st.spec = std::move(spec);
  auto& opts = st.spec->options;
  // The run's I/O actor, on its own thread; it ends after the run's last write, or with
  // this actor.
  st.persister = self->spawn<caf::detached + caf::monitored>(persister_actor);
  self->attach_functor([persister = st.persister] {
    caf::anon_send_exit(persister, caf::exit_reason::user_shutdown);
  });
  // The run's rendezvous store: an actor of its own, so that an attempt's rendezvous
  // never waits behind reports and checkpoint pieces in this mailbox. It ends with this
  // actor.
  st.store = self->spawn(store_server);
  self->attach_functor([store = st.store] { caf::anon_send_exit(store, caf::exit_reason::user_shutdown); });
  // Checkpoint files that travel as messages pass by the trainer's mailbox.
  st.files = self->spawn(file_gate, st.persister, st.spec->dir);
  self->attach_functor([files = st.files] { caf::anon_send_exit(files, caf::exit_reason::user_shutdown); });
  st.manager = std::make_unique<CheckpointManager>(
    RetentionPolicy{opts.run.checkpoint.num_to_keep, opts.run.checkpoint.checkpoint_score_attribute,
                    opts.run.checkpoint.checkpoint_score_order},
    [self](const std::string& path) {
      // Checkpoints are registered only while the I/O actor lives.
      if (auto& persister = self->state.persister)
        self->send(persister, remove_atom::value, path);
    });
  // Restoring: adopt what the run directory already holds.
  std::vector<std::pair<Checkpoint, Metrics>> existing;
  for (auto& c : find_checkpoints(st.spec->dir, st.spec->name))
    existing.emplace_back(c, c.metadata().metrics);
  st.manager->adopt(existing);
  if (auto latest = st.manager->latest())
    st.adopted_latest = latest->path();
  st.history = read_history(st.spec->dir, st.spec->name);
  // A checkpoint committed while its attempt was being stopped (a cancel or a failure
  // between the commit and the record) has no report in the history; its metadata holds
  // that report, so the resumed run neither loses it nor redoes it.
  for (auto& item : existing)
    record_late_commit(self, item.first);
  st.adopted_reports = st.history.empty() ? 0 : st.history.back().index + 1;
  // Attempts keep counting: past the last that reported, and those of an ended run.
  for (auto& rec : st.history)
    st.first_attempt = std::max(st.first_attempt, rec.attempt + 1);
  if (auto ended = read_result_file(st.spec->dir, st.spec->name))
    st.first_attempt = std::max(st.first_attempt, ended->attempts);
  if (!opts.resume_from_checkpoint.empty())
    st.initial_checkpoint = Checkpoint::from_directory(opts.resume_from_checkpoint);
  self->set_down_handler([=](caf::down_msg& dm) {
    auto& st = self->state;
    if (st.persister && dm.source == st.persister.address()) {
      st.persister = nullptr;
      if (!st.result)
        worker_failed(self, RunError{Errc::io_error, "the checkpoint persister stopped: " +
                                                       self->system().render(dm.reason)});
      return;
    }
    for (size_t rank = 0; rank < st.workers.size(); ++rank) {
      if (!st.workers[rank] || st.workers[rank].address() != dm.source)
        continue;
      auto r = static_cast<int64_t>(rank);
      if (process_mode(self)) {
        // A launcher reports its rank's end before it ends; one that vanished without
        // (its node lost) leaves the rank ended with its process.
        if (st.running.count(r) && !st.result)
          on_worker_exit(self, lost_rank(self, r, "rank " + std::to_string(r) + ": the launcher of its worker process on node '" +
                                                    st.rank_nodes[rank] + "' is gone (" +
                                                    self->system().render(dm.reason) + ")"));
        return;
      }
      if (!st.stopping && st.running.count(r) && !st.result)
        worker_failed(self, RunError{Errc::worker_failed,
                                     "the worker actor of rank " + std::to_string(r) +
                                       " died: " + self->system().render(dm.reason),
                                     r, st.attempt});
      return;
    }
    remove_subscriber(st.subscribers, dm.source);
  });
  return {
    // -- callers --
    [=](fit_atom) {
      auto rp = promise_result(self, self->state.result, self->state.fit_promises);
      start(self);
      return rp;
    },
    [=](start_atom) { start(self); },
    [=](subscribe_atom, caf::actor& subscriber) {
      add_subscriber(self, std::move(subscriber), self->state.result, self->state.subscribers);
    },
    [=](unsubscribe_atom, const caf::actor& subscriber) {
      remove_subscriber(self->state.subscribers, subscriber.address());
    },
    [=](status_atom) { return status_of(self); },
    [=](cancel_atom) {
      auto& st = self->state;
      if (st.result)
        return;
      st.error = RunError{Errc::cancelled, "the run was cancelled", -1, std::max<int64_t>(st.attempt, 0)};
      if (st.attempt < 0) {
        st.attempt = 0;
        return finish(self);
      }
      stop_attempt(self, AfterStop::finish, "the run was cancelled");
    },
    // -- workers --
    [=](report_atom, WorkerReport& r) { return on_report(self, r); },
    [=](worker_exit_atom, const WorkerExit& exit) { on_worker_exit(self, exit); },
    [=](pool_lost_atom, uint64_t id, const std::string& node) { placement_lost(self, id, node); },
    [=](stalled_atom, int64_t rank, int64_t attempt, double seconds) {
      if (attempt != self->state.attempt || !self->state.running.count(rank))
        return;
      worker_failed(self, RunError{Errc::worker_failed,
                                   "rank " + std::to_string(rank) + " made no progress for " +
                                     std::to_string(static_cast<int64_t>(seconds)) +
                                     " s (heartbeat missed; RunConfig.heartbeat_timeout)",
                                   rank, attempt});
    },
    [=](report_timeout_atom, int64_t attempt, int64_t index) {
      on_report_timeout(self, attempt, index);
    },
    [=](loss_spares_atom, int64_t attempt) { plan_loss_spares(self, attempt); },
    [=](grace_atom, int64_t attempt) {
      auto& st = self->state;
      if (st.stopping && st.attempt == attempt) {
        spdlog::warn("caftrain: {} worker thread(s) of attempt {} did not stop within the grace "
                     "period; continuing without them",
                     st.running.size(), attempt);
        st.running.clear();
        abandon_worker_threads(st.spec->name, attempt);
        complete_stop(self);
      }
    },
  };
}

caf::behavior file_gate(caf::stateful_actor<FileGateState>* self, caf::actor persister, std::string dir) {
  self->state.persister = std::move(persister);
  self->state.dir = std::move(dir);
  // Hands the current request to the persister, which answers it.
  auto pass = [self](auto&&... xs) {
    auto rp = self->make_response_promise();
    rp.delegate(self->state.persister, std::forward<decltype(xs)>(xs)...);
    return rp;
  };
  return {
    [=](serve_files_atom, const std::string& path, const std::vector<std::string>& files) {
      self->state.served[path].insert(files.begin(), files.end());
    },
    [=](transfer::upload_atom a, std::string& name, std::string& file, uint64_t offset, std::string& bytes) {
      return pass(a, self->state.dir, std::move(name), std::move(file), offset, std::move(bytes));
    },
    [=](transfer::upload_atom a, std::string& name, std::string& file, uint64_t size, uint32_t crc) {
      return pass(a, self->state.dir, std::move(name), std::move(file), size, crc);
    },
    [=](transfer::upload_atom a, std::string& name) { return pass(a, self->state.dir, std::move(name)); },
    [=](transfer::fetch_atom a, const std::string& path, const std::string& file, uint64_t offset) {
      auto& served = self->state.served;
      auto i = served.find(path);
      if (i == served.end() || i->second.count(file) == 0 || !transfer::safe_relative(file)) {
        auto rp = self->make_response_promise();
        rp.deliver(make_caf_error(Errc::invalid_argument,
                                  "'" + file + "' of '" + path + "' is not a file of a checkpoint this run "
                                  "handed to its workers"));
        return rp;
      }
      return pass(a, (fs::path(path) / file).string(), offset);
    },
  };
}

caf::behavior persister_actor(caf::event_based_actor* self) {
  lower_thread_priority(); // detached: this thread is the persister's alone
  // Checkpoint files of worker processes that do not see the storage.
  auto uploads = std::make_shared<transfer::Receiver>();
  // An Error as the caf::error a requester gets.
  auto failed = [](const std::exception& e) {
    if (auto* err = dynamic_cast<const Error*>(&e))
      return make_caf_error(err->code(), err->what());
    return make_caf_error(Errc::io_error, e.what());
  };
  return {
    [=](transfer::upload_atom, const std::string& dir, const std::string& name, const std::string& file,
        uint64_t offset, const std::string& bytes) -> caf::result<uint64_t> {
      try {
        return uploads->write(dir, name, file, offset, bytes);
      } catch (const std::exception& e) {
        return failed(e);
      }
    },
    [=](transfer::upload_atom, const std::string& dir, const std::string& name, const std::string& file,
        uint64_t size, uint32_t crc) -> caf::result<bool> {
      try {
        uploads->finish_file(dir, name, file, size, crc);
        return true;
      } catch (const std::exception& e) {
        return failed(e);
      }
    },
    [=](transfer::upload_atom, const std::string& dir, const std::string& name) -> caf::result<std::string> {
      try {
        return uploads->finish(dir, name);
      } catch (const std::exception& e) {
        return failed(e);
      }
    },
    [=](transfer::fetch_atom, const std::string& path, uint64_t offset) -> caf::result<std::string> {
      try {
        return transfer::read_chunk(path, offset);
      } catch (const std::exception& e) {
        return failed(e);
      }
    },
    [=](persist_atom, PersistRequest& req) -> caf::result<Checkpoint> {
      try {
        CheckpointWriter writer(req.final_path);
        for (auto& src : req.sources) {
          auto state = fs::path(src) / "trainer_state.json";
          std::error_code ec;
          if (req.metadata.strategy.empty() && fs::exists(state, ec)) {
            auto bytes = read_file(state.string());
            auto j = nlohmann::json::parse(bytes.begin(), bytes.end(), nullptr, false);
            if (j.is_object())
              req.metadata.strategy = j.value("strategy", "");
          }
          writer.move_directory(src);
        }
        return writer.commit(req.metadata);
      } catch (const Error& e) {
        return make_caf_error(e.code(), e.what());
      } catch (const std::exception& e) {
        return make_caf_error(Errc::io_error, e.what());
      }
    },
    [=](history_atom, const std::string& dir, const ReportRecord& rec) {
      try {
        append_history(dir, rec);
      } catch (const std::exception& e) {
        spdlog::warn("caftrain: run {}: report #{} not added to the history: {}", rec.run,
                     rec.index, e.what());
      }
    },
    [=](remove_atom, const std::string& path) {
      std::error_code ec;
      fs::remove_all(path, ec);
      if (ec)
        spdlog::warn("caftrain: cannot delete checkpoint '{}': {}", path, ec.message());
    },
    [=](validate_atom, const std::vector<Checkpoint>& candidates) -> int64_t {
      for (size_t i = 0; i < candidates.size(); ++i) {
        try {
          candidates[i].validate();
          return static_cast<int64_t>(i);
        } catch (const Error& e) {
          spdlog::warn("caftrain: skipping checkpoint: {}", e.what()); // the one before it
        }
      }
      return -1;
    },
    [=](result_file_atom, const Result& r) {
      try {
        write_result_file(r);
      } catch (const std::exception& e) {
        spdlog::warn("caftrain: cannot write the result of run in '{}': {}", r.path, e.what());
      }
      return true;
    },
    [=](unresult_atom, const std::string& dir) { remove_result_file(dir); },
    [=](io_done_atom) { self->quit(); },
  };
}

} // namespace caftrain
