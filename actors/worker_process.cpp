#include "actors/worker_process.hpp"

#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <iostream>
#include <map>
#include <mutex>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/checkpoint_transfer.hpp"
#include "actors/cluster.hpp"
#include "actors/network.hpp"
#include "actors/process_launcher.hpp"
#include "actors/run_files.hpp"
#include "actors/torch_trainer.hpp"
#include "core/error.hpp"
#include "core/process_role.hpp"
#include "core/subprocess.hpp"

namespace caftrain {

namespace {

std::mutex command_mtx;
std::vector<std::string> arguments_override;
bool arguments_set = false;

std::optional<detail::WorkerProcessEnv>& env_slot() {
  static std::optional<detail::WorkerProcessEnv> slot;
  return slot;
}

/// Ends a worker process that cannot do its part, saying why on stderr (the driver's).
[[noreturn]] void give_up(const std::string& why) {
  std::fprintf(stderr, "caftrain worker process %d: %s\n", static_cast<int>(::getpid()), why.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

std::string take_env(const char* name) {
  const char* value = std::getenv(name);
  std::string result = value ? value : "";
  ::unsetenv(name); // programs this worker starts are not workers
  return result;
}

} // namespace

bool is_worker_process() noexcept {
  // Before caftrain::init has read them, the variables say it.
  return env_slot().has_value() || std::getenv("CAFTRAIN_WORKER_HUB") != nullptr;
}

void set_worker_arguments(std::vector<std::string> args) {
  std::lock_guard<std::mutex> guard(command_mtx);
  arguments_override = std::move(args);
  arguments_set = true;
}

std::vector<std::string> worker_command() {
  auto argv = own_command_line();
  if (argv.empty())
    argv.emplace_back("caftrain-worker");
  std::lock_guard<std::mutex> guard(command_mtx);
  if (arguments_set) {
    argv.resize(1);
    argv.insert(argv.end(), arguments_override.begin(), arguments_override.end());
  }
  return argv;
}

namespace detail {

void detect_worker_process(caf::actor_system_config& cfg) {
  static std::once_flag once;
  std::call_once(once, [] {
    if (!std::getenv("CAFTRAIN_WORKER_HUB"))
      return;
    auto hub = take_env("CAFTRAIN_WORKER_HUB");
    WorkerProcessEnv env;
    auto colon = hub.rfind(':');
    env.key = take_env("CAFTRAIN_WORKER_KEY");
    env.run_name = take_env("CAFTRAIN_WORKER_RUN");
    auto job = take_env("CAFTRAIN_WORKER_JOB");
    auto parent = take_env("CAFTRAIN_WORKER_PARENT");
    env.spare = take_env("CAFTRAIN_WORKER_SPARE") == "1";
    try {
      if (colon == std::string::npos)
        throw std::invalid_argument("no port");
      env.hub_host = hub.substr(0, colon);
      env.hub_port = static_cast<uint16_t>(std::stoi(hub.substr(colon + 1)));
      env.job = std::stoll(job);
    } catch (const std::exception&) {
      give_up("CAFTRAIN_WORKER_HUB '" + hub + "' / CAFTRAIN_WORKER_JOB '" + job +
              "' are not valid; these variables are set by caftrain for the worker processes "
              "it starts, and must not be set by hand");
    }
    // A worker process ends with its driver, whatever kills the driver.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (!parent.empty() && std::to_string(::getppid()) != parent)
      give_up("the driver (pid " + parent + ") is gone already");
    env_slot() = std::move(env);
  });
  // The driver publishes each process-mode run's hub, and its workers connect to it.
  cfg.load<caf::io::middleman>();
}

const std::optional<WorkerProcessEnv>& worker_process_env() noexcept {
  return env_slot();
}

std::atomic<int64_t> job_counter{0};

int64_t next_job() {
  return job_counter++;
}

void restart_job_numbering() {
  job_counter = 0;
}

bool is_my_job(const RunSpec& spec) noexcept {
  auto& env = env_slot();
  return env && spec.job == env->job;
}

void run_worker_process(caf::actor_system& system, const RunSpec& spec) {
  auto& env = *env_slot();
  set_single_rank_process(); // this rank's libtorch generator is its own (checkpoints save it)
  // On a cluster the driver is another machine: connect to it directly, so that reports
  // and the rendezvous store reach its trainer actor without passing through the node.
  if (auto driver = take_env("CAFTRAIN_WORKER_DRIVER"); !driver.empty()) {
    std::string why;
    try {
      auto [host, port] = parse_address(driver);
      if (auto reached = net::remote_actor(system, host, port); !reached)
        why = system.render(reached.error()) + tls_hint(system);
    } catch (const Error& e) {
      why = e.what();
    }
    if (!why.empty())
      give_up("cannot reach the driver at '" + driver + "': " + why +
              " (a driver on another machine sets ClusterOptions::host to an address nodes reach)");
  }
  auto hub = net::remote_actor(system, env.hub_host, env.hub_port);
  if (!hub)
    give_up("cannot reach the run's hub at " + env.hub_host + ":" + std::to_string(env.hub_port) +
            ": " + system.render(hub.error()));
  caf::scoped_actor self{system};
  ProcessAssignment a;
  bool assigned = false;
  // A spare waits for a restart as long as the run lasts (the run's end kills it).
  auto hello_timeout = env.spare ? caf::duration(caf::infinite) : caf::duration(std::chrono::seconds(60));
  self->request(*hub, hello_timeout, hello_atom::value, env.key)
    .receive([&](ProcessAssignment& x) {
               a = std::move(x);
               assigned = true;
             },
             [&](caf::error& err) { give_up("the run refused this worker: " + system.render(err)); });
  if (!assigned)
    give_up("no assignment from the run");
  // A warm spare was started before it knew which rank it would be (for another rank, or
  // for a node's loss): torch's variables follow the assignment, as a rank's own process
  // had them from the start. Set before the training function runs (no thread of ours
  // reads the environment meanwhile).
  auto& c = a.context;
  for (auto& [name, value] : std::initializer_list<std::pair<const char*, int64_t>>{
         {"RANK", c.world_rank}, {"LOCAL_RANK", c.local_rank}, {"WORLD_SIZE", c.world_size},
         {"LOCAL_WORLD_SIZE", c.local_world_size}, {"NODE_RANK", c.node_rank}, {"OMP_NUM_THREADS", c.num_threads}})
    ::setenv(name, std::to_string(value).c_str(), 1);
  // This process's train function, with the driver's view of the run.
  auto run = std::make_shared<RunSpec>();
  run->train_func = spec.train_func;
  run->options = spec.options;
  run->name = a.context.run_name;
  run->dir = a.context.run_dir;
  run->job = spec.job;
  auto& o = run->options;
  o.train_loop_config = config_from_json(a.train_loop_config);
  o.torch_config.backend = a.backend;
  o.run.report_timeout = std::chrono::milliseconds(a.report_timeout_ms);
  o.run.collective_timeout = std::chrono::milliseconds(a.collective_timeout_ms);
  o.run.heartbeat_timeout = std::chrono::milliseconds(a.heartbeat_timeout_ms);
  WorkerSpec ws;
  ws.run = run;
  ws.context = a.context;
  ws.trainer = a.trainer;
  ws.store = a.store;
  ws.files = a.files;
  ws.checkpoint = a.checkpoint;
  ws.first_report_index = a.first_report_index;
  ws.watchdog = a.launcher;
  ws.shared_storage = transfer::sees_storage(a.context.run_dir, a.storage_id);
  if (!ws.shared_storage)
    spdlog::info("caftrain: rank {}: the run's storage '{}' is not visible on this machine; "
                 "checkpoints travel to the driver as messages",
                 a.context.world_rank, a.context.run_dir);
  auto ended = std::make_shared<std::promise<WorkerExit>>();
  auto result = ended->get_future();
  ws.on_exit = [ended](const WorkerExit& exit) { ended->set_value(exit); };
  auto worker = system.spawn(worker_actor, std::move(ws));
  self->send(a.launcher, started_atom::value, worker);
  auto exit = result.get();
  // The launcher holds the rank's end before this process is gone (it then reports it,
  // once it has seen the process exit).
  self->request(a.launcher, std::chrono::seconds(10), worker_exit_atom::value, exit)
    .receive([](bool) {}, [](caf::error&) {});
  join_worker_threads(run->name, std::chrono::seconds(1));
  std::error_code ec;
  std::filesystem::remove_all(transfer::local_root(), ec); // checkpoints staged or fetched
  spdlog::default_logger()->flush();
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(exit.failed ? 1 : 0);
}

} // namespace detail

} // namespace caftrain
