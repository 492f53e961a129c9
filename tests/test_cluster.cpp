// Clusters on one machine: a real `caftrain head` and `caftrain node` processes on
// loopback, this test binary as the driver, and its worker processes started by the
// nodes (this binary again, for the running test case).
//
// The code of a test case runs in every worker process too, up to the TorchTrainer the
// process was started for: so the head and nodes are started by the driver only.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include "actors/cluster.hpp"
#include "core/subprocess.hpp"
#include "helpers.hpp"
#include "local_cluster.hpp"
#include "process_tree.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;
using System = test::ActorSystem;
using test::Classifier;
using test::process_exists;
using test::write_token;
using Cluster = test::LocalCluster;
using Clock = std::chrono::steady_clock;

/// Rank 1 of attempt 0, at global step 7, writes its node's pid (its parent) to
/// `<out>/stuck` and waits there: the test kills that node.
class WaitForNodeKill : public Callback {
 public:
  explicit WaitForNodeKill(std::string marker) : marker_(std::move(marker)) {}
  void on_train_batch_start(Trainer& t, LightningModule&, const Batch&, int64_t) override {
    auto& ctx = train::get_context();
    if (marker_.empty() || ctx.world_rank != 1 || ctx.attempt != 0 || t.global_step() != 7)
      return;
    {
      std::ofstream f(marker_ + ".tmp");
      f << ::getppid() << "\n";
    }
    fs::rename(marker_ + ".tmp", marker_);
    for (;;)
      std::this_thread::sleep_for(std::chrono::seconds(1));
  }

 private:
  std::string marker_;
};

/// Rank 1 of attempt 0, at global step `step`, after `delay_ms`, SIGKILLs its own
/// process (as the OOM killer would); `step` < 0: never.
class KillRank1 : public Callback {
 public:
  KillRank1(int64_t step, int64_t delay_ms) : step_(step), delay_ms_(delay_ms) {}
  void on_train_batch_start(Trainer& t, LightningModule&, const Batch&, int64_t) override {
    auto& ctx = train::get_context();
    if (step_ < 0 || ctx.world_rank != 1 || ctx.attempt != 0 || t.global_step() != step_)
      return;
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
    ::raise(SIGKILL);
  }

 private:
  int64_t step_;
  int64_t delay_ms_;
};

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

/// 2 epochs of 6 steps on each of 2 ranks, a report every step and a checkpoint every
/// third. Each worker writes where it ran (pid, its node's pid, torch's variables) to
/// `<out>/a<attempt>-r<rank>`.
void train_func(const Config& c) {
  auto& ctx = train::get_context();
  auto out = c.get<std::string>("out", "");
  if (!out.empty()) {
    std::ofstream f(out + "/a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank));
    f << ::getpid() << " " << ::getppid() << " " << env_or("RANK", "-") << " " << env_or("LOCAL_RANK", "-")
      << " " << env_or("WORLD_SIZE", "-") << " " << env_or("LOCAL_WORLD_SIZE", "-") << " "
      << env_or("NODE_RANK", "-") << " " << ctx.node_rank << " " << ctx.local_rank << "\n";
  }
  // Whether this process started as a warm spare (FailureConfig::warm_spares).
  if (auto stamps = c.get<std::string>("stamps", ""); !stamps.empty()) {
    auto& env = caftrain::detail::worker_process_env();
    std::ofstream(stamps + "/a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank))
      << ::getpid() << " " << (env && env->spare) << "\n";
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  auto data = std::make_shared<data::TensorDataset>(torch::randn({192, 8}, gen),
                                                    torch::randint(0, 3, {192}, gen));
  auto model = with_seed(0, [] { return std::make_shared<Classifier>(); });
  std::shared_ptr<Strategy> strategy;
  if (c.get<std::string>("strategy", "ddp") == "fsdp")
    strategy = std::make_shared<FSDPStrategy>();
  else
    strategy = std::make_shared<DDPStrategy>(DDPOptions{.broadcast_buffers = false});
  Trainer trainer({.max_epochs = 2,
                   .strategy = strategy,
                   .plugins = {ActorEnvironment()},
                   .callbacks = {WaitForNodeKill(c.get<bool>("wait_for_kill", false) ? out + "/stuck" : ""),
                                 KillRank1(c.get<int64_t>("kill_at_step", -1), c.get<int64_t>("kill_delay_ms", 0)),
                                 ReportCallback({.every_n_epochs = 0, .every_n_steps = 1, .checkpoint_every = 3})},
                   .logger = false,
                   .enable_progress_bar = false});
  trainer = prepare_trainer(std::move(trainer));
  auto ckpt = train::get_checkpoint();
  // Whether this rank sees the run's storage, and where the checkpoint it resumes from is.
  if (auto seen = c.get<std::string>("storage_out", ""); !seen.empty()) {
    std::ofstream f(seen + "/a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank));
    f << fs::exists(fs::path(ctx.run_dir) / "run.json") << " " << (ckpt ? ckpt->path() : "-") << "\n";
  }
  trainer.fit(model, data::DataLoader(data, {.batch_size = 16, .shuffle = true, .seed = 9}),
              std::nullopt, ckpt ? ckpt->path() : "");
  // Which rank shards of a sharded checkpoint the rank's copy holds after its load.
  if (auto seen = c.get<std::string>("storage_out", ""); !seen.empty() && ckpt) {
    std::ofstream f(seen + "/a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank) + ".shards");
    std::error_code ec;
    for (auto& e : fs::directory_iterator(fs::path(ckpt->path()) / "shards", ec))
      f << e.path().filename().string() << "\n";
  }
}

TorchTrainerOptions options(const test::TempDir& dir, const std::string& name, const std::string& mode) {
  TorchTrainerOptions o;
  o.train_loop_config = {{"out", dir / ("where-" + name)}};
  o.scaling.num_workers = 2;
  o.scaling.worker_mode = mode;
  o.scaling.placement_strategy = "SPREAD";
  o.torch_config.backend = "gloo";
  o.run.name = name;
  o.run.storage_path = dir.path();
  o.run.stop_grace = std::chrono::seconds(2);
  o.run.heartbeat_timeout = std::chrono::seconds(20);
  return o;
}

/// What worker `rank` of `attempt` wrote of where it ran.
std::vector<std::string> where(const TorchTrainerOptions& o, int attempt, int rank) {
  std::ifstream f(o.train_loop_config.get<std::string>("out") + "/a" + std::to_string(attempt) + "-r" +
                  std::to_string(rank));
  std::vector<std::string> words;
  for (std::string w; f >> w;)
    words.push_back(w);
  return words;
}

/// Every worker process that wrote a file in `o`'s out directory is gone.
void check_none_left(const TorchTrainerOptions& o) {
  auto deadline = Clock::now() + std::chrono::seconds(5);
  for (auto& entry : fs::directory_iterator(o.train_loop_config.get<std::string>("out"))) {
    if (entry.path().filename() == "stuck")
      continue;
    std::ifstream f(entry.path());
    std::string pid;
    f >> pid;
    while (process_exists(pid) && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CAPTURE(entry.path().string(), pid);
    CHECK_FALSE(process_exists(pid));
  }
}

/// Waits for the rank that WaitForNodeKill holds to write its node's pid, SIGKILLs that
/// node and returns its pid.
std::string kill_stuck_node(const TorchTrainerOptions& o) {
  auto marker = o.train_loop_config.get<std::string>("out") + "/stuck";
  auto deadline = Clock::now() + std::chrono::seconds(120);
  while (!fs::exists(marker) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE(fs::exists(marker));
  std::string node_pid;
  std::ifstream(marker) >> node_pid;
  REQUIRE(::kill(std::stoi(node_pid), SIGKILL) == 0);
  return node_pid;
}

/// The run of `o` on threads of this process (a system connected to no cluster).
Result run_on_threads(const TorchTrainerOptions& o) {
  System local;
  if (!is_worker_process())
    fs::create_directories(o.train_loop_config.get<std::string>("out"));
  return TorchTrainer(local.sys, train_func, o).fit();
}

/// In the driver (not in its worker processes): a head and `nodes` of 1 CPU each into
/// `cluster`, `s` connected to it, and `o`'s out directory.
void start_nodes(std::optional<Cluster>& cluster, const test::TempDir& dir, System& s,
                 const TorchTrainerOptions& o, const std::vector<std::string>& nodes = {"node-a", "node-b"}) {
  if (is_worker_process())
    return;
  cluster.emplace(dir);
  REQUIRE_FALSE(cluster->address.empty());
  for (auto& name : nodes)
    cluster->add_node(name, 1);
  REQUIRE(cluster->connect_and_wait(s.sys, nodes.size()));
  fs::create_directories(o.train_loop_config.get<std::string>("out"));
}

/// Fits `trainer`, whose run fails once, and checks that it ends as `undisturbed` did:
/// in 2 attempts, with all 12 reports and the same weights.
Result fit_recovered(TorchTrainer& trainer, const Result& undisturbed) {
  auto result = trainer.fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(undisturbed.ok());
  REQUIRE(result.ok());
  CHECK(result.attempts == 2);
  REQUIRE(result.metrics_history.size() == 12);
  test::check_same_weights(undisturbed, result);
  return result;
}

} // namespace

TEST_CASE("A head and two nodes run a 2-worker DDP run across both nodes and end with the weights of thread workers", "[cluster]") {
  test::TempDir dir;
  auto threads = options(dir, "threads", "thread");
  auto spread = options(dir, "spread", "process");
  auto by_threads = run_on_threads(threads);
  std::optional<Cluster> cluster;
  System s;
  start_nodes(cluster, dir, s, spread);
  auto by_cluster = TorchTrainer(s.sys, train_func, spread).fit();
  INFO((by_cluster.error ? by_cluster.error->message : ""));
  REQUIRE(by_threads.ok());
  REQUIRE(by_cluster.ok());
  REQUIRE(by_cluster.metrics_history.size() == 12);
  test::check_same_weights(by_threads, by_cluster);
  // pid, node pid, RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE NODE_RANK, context's
  // node rank and local rank: one rank on each node.
  auto r0 = where(spread, 0, 0), r1 = where(spread, 0, 1);
  REQUIRE(r0.size() == 9);
  REQUIRE(r1.size() == 9);
  std::vector<std::string> nodes = {r0[1], r1[1]};
  std::sort(nodes.begin(), nodes.end());
  std::vector<std::string> expected = {std::to_string(cluster->node_pid("node-a")),
                                       std::to_string(cluster->node_pid("node-b"))};
  std::sort(expected.begin(), expected.end());
  CHECK(nodes == expected);
  CHECK(std::vector<std::string>(r0.begin() + 2, r0.end()) ==
        std::vector<std::string>{"0", "0", "2", "1", "0", "0", "0"});
  CHECK(std::vector<std::string>(r1.begin() + 2, r1.end()) ==
        std::vector<std::string>{"1", "0", "2", "1", "1", "1", "0"});
  check_none_left(spread);
  // The run gave its resources back.
  auto status = cluster->status(s.sys);
  REQUIRE(status.nodes.size() == 2);
  for (auto& n : status.nodes)
    CHECK(n.available.get("CPU") == n.total.get("CPU"));
}

TEST_CASE("A node SIGKILLed mid-run is detected at once and the run ends on the remaining nodes with the weights of an undisturbed run", "[cluster]") {
  test::TempDir dir;
  auto clean = options(dir, "clean", "thread");
  auto faulty = options(dir, "faulty", "process");
  faulty.train_loop_config.set("wait_for_kill", true);
  faulty.run.failure.max_failures = 1;
  Result undisturbed;
  {
    System local;
    if (!is_worker_process())
      fs::create_directories(clean.train_loop_config.get<std::string>("out"));
    undisturbed = TorchTrainer(local.sys, train_func, clean).fit();
  }
  // The run notices the loss when it starts stopping the attempt (on_failure comes only
  // once the surviving ranks have stopped).
  struct FailureTime : RunCallback {
    std::atomic<int64_t> at_ns{0};
    std::string error;
    void on_state(const RunStatus& status) override {
      if (status.state == "stopping" && at_ns == 0)
        at_ns = Clock::now().time_since_epoch().count();
    }
    void on_failure(const std::string& e, int64_t, bool) override {
      error = e;
    }
  };
  auto failure = std::make_shared<FailureTime>();
  faulty.run.callbacks = {failure};
  std::optional<Cluster> cluster;
  System s;
  start_nodes(cluster, dir, s, faulty, {"node-a", "node-b", "node-c"});
  TorchTrainer trainer(s.sys, train_func, faulty);
  trainer.start(); // a worker process runs its rank here and ends
  auto node_pid = kill_stuck_node(faulty);
  auto killed_at = Clock::now();
  auto result = trainer.fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(undisturbed.ok());
  REQUIRE(result.ok());
  CHECK(result.attempts == 2);
  CHECK_THAT(failure->error, Contains("was lost") || Contains("is gone"));
  auto detected = std::chrono::duration<double>(Clock::duration(failure->at_ns.load()) - killed_at.time_since_epoch()).count();
  // The target is 2 s (bench_recovery --cluster measures it); the test only checks that
  // the loss is not left to CAF's own timeouts, with room for a loaded CI machine.
  CAPTURE(detected);
  CHECK(detected < 5.0);
  REQUIRE(result.metrics_history.size() == 12);
  for (size_t i = 0; i < 12; ++i)
    CHECK(result.metrics_history[i].attempt == (i < 6 ? 0 : 1));
  test::check_same_weights(undisturbed, result);
  // Attempt 1 ran on the two nodes that were left.
  auto r0 = where(faulty, 1, 0), r1 = where(faulty, 1, 1);
  REQUIRE(r0.size() == 9);
  REQUIRE(r1.size() == 9);
  CHECK(r0[1] != node_pid);
  CHECK(r1[1] != node_pid);
  CHECK(r0[1] != r1[1]);
  check_none_left(faulty);
  CHECK(cluster->status(s.sys).nodes.size() == 2);
}

TEST_CASE("With warm spares a node SIGKILLed mid-run is replaced by a spare the free node started for that loss; "
          "the spare takes its rank's variables and the run ends like an undisturbed run", "[cluster][spares]") {
  test::TempDir dir;
  auto clean = options(dir, "clean", "thread");
  auto faulty = options(dir, "faulty", "process");
  faulty.train_loop_config.set("wait_for_kill", true);
  faulty.run.failure.max_failures = 1;
  faulty.run.failure.warm_spares = true;
  auto stamps = dir / "stamps";
  faulty.train_loop_config.set("stamps", stamps);
  auto undisturbed = run_on_threads(clean);
  std::optional<Cluster> cluster;
  System s;
  start_nodes(cluster, dir, s, faulty, {"node-a", "node-b", "node-c"});
  if (!is_worker_process())
    fs::create_directories(stamps);
  TorchTrainer trainer(s.sys, train_func, faulty);
  trainer.start(); // a worker process runs its rank here and ends
  // Rank 1 waits at step 7; the node without a rank starts a spare for either node's loss.
  auto marker = faulty.train_loop_config.get<std::string>("out") + "/stuck";
  auto deadline = Clock::now() + std::chrono::seconds(120);
  while (!fs::exists(marker) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE(fs::exists(marker));
  std::set<std::string> used = {where(faulty, 0, 0).at(1), where(faulty, 0, 1).at(1)};
  std::string free_node;
  for (auto name : {"node-a", "node-b", "node-c"})
    if (!used.count(std::to_string(cluster->node_pid(name))))
      free_node = name;
  REQUIRE_FALSE(free_node.empty());
  deadline = Clock::now() + std::chrono::seconds(60);
  while (test::children_of(cluster->node_pid(free_node)).empty() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  REQUIRE(test::children_of(cluster->node_pid(free_node)).size() == 1); // one spare, not one per loss
  auto node_pid = kill_stuck_node(faulty);
  auto result = fit_recovered(trainer, undisturbed);
  // Attempt 1 ran on the two nodes left, both ranks on spares (the free node's, started
  // for this loss, and the surviving rank's own), each with its rank's variables:
  // RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE NODE_RANK as the context says.
  bool on_free_node = false;
  for (int rank : {0, 1}) {
    auto w = where(faulty, 1, rank);
    REQUIRE(w.size() == 9);
    CAPTURE(rank, w);
    CHECK(w[1] != node_pid);
    on_free_node = on_free_node || w[1] == std::to_string(cluster->node_pid(free_node));
    CHECK(w[2] == std::to_string(rank));
    CHECK(w[3] == w[8]);
    CHECK(w[4] == "2");
    CHECK(w[5] == "1");
    CHECK(w[6] == w[7]);
    std::ifstream f(stamps + "/a1-r" + std::to_string(rank));
    std::string pid, spare;
    f >> pid >> spare;
    CHECK(spare == "1");
  }
  CHECK(on_free_node);
  check_none_left(faulty);
  // No spare outlives the run.
  deadline = Clock::now() + std::chrono::seconds(5);
  auto left = [&] {
    std::vector<std::string> all;
    for (auto name : {"node-a", "node-b", "node-c"})
      if (std::to_string(cluster->node_pid(name)) != node_pid) {
        auto c = test::children_of(cluster->node_pid(name));
        all.insert(all.end(), c.begin(), c.end());
      }
    return all;
  };
  while (!left().empty() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(left().empty());
}

TEST_CASE("With warm spares a worker process SIGKILLed on a node restarts on the spare its node started, ends like an undisturbed run, and no spare outlives the run", "[cluster][spares]") {
  test::TempDir dir;
  auto threads = options(dir, "threads", "thread");
  auto spared = options(dir, "spared", "process");
  spared.run.failure.warm_spares = true;
  spared.run.failure.max_failures = 1;
  spared.train_loop_config.set("kill_at_step", int64_t{7});
  spared.train_loop_config.set("kill_delay_ms", int64_t{2500}); // a node starts spares 1 s into a rank's run
  auto stamps = dir / "stamps";
  spared.train_loop_config.set("stamps", stamps);
  auto by_threads = run_on_threads(threads);
  std::optional<Cluster> cluster;
  System s;
  start_nodes(cluster, dir, s, spared);
  if (!is_worker_process())
    fs::create_directories(stamps);
  auto r = TorchTrainer(s.sys, train_func, spared).fit();
  REQUIRE(by_threads.ok());
  INFO((r.error ? r.error->message : ""));
  REQUIRE(r.ok());
  CHECK(r.attempts == 2);
  REQUIRE(r.metrics_history.size() == 12);
  test::check_same_weights(by_threads, r);
  // Each rank ran on the same node in both attempts, and attempt 1 took over the spare
  // that node had started for it.
  for (int rank : {0, 1}) {
    auto before = where(spared, 0, rank), after = where(spared, 1, rank);
    REQUIRE(before.size() == 9);
    REQUIRE(after.size() == 9);
    CAPTURE(rank);
    CHECK(before[1] == after[1]);
    for (int attempt : {0, 1}) {
      std::ifstream f(stamps + "/a" + std::to_string(attempt) + "-r" + std::to_string(rank));
      std::string pid, spare;
      f >> pid >> spare;
      CAPTURE(attempt, pid);
      CHECK(spare == (attempt == 0 ? "0" : "1"));
    }
  }
  check_none_left(spared);
  // The spares the nodes started for attempt 1's ranks went when the run ended.
  auto deadline = Clock::now() + std::chrono::seconds(5);
  auto left = [&] {
    auto a = test::children_of(cluster->node_pid("node-a")), b = test::children_of(cluster->node_pid("node-b"));
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  while (!left().empty() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(left().empty());
}

TEST_CASE("Nodes that do not see the driver's storage send their checkpoints as messages and fetch the one they resume from (of a sharded one, only their own shard); after a node's loss the run ends with the weights of an undisturbed run", "[cluster][storage]") {
  test::TempDir dir;
  auto storage = dir / "storage";
  auto seen = dir / "storage-seen";
  auto clean = options(dir, "clean", "thread");
  auto faulty = options(dir, "faulty", "process");
  faulty.run.storage_path = storage;
  faulty.train_loop_config.set("wait_for_kill", true);
  faulty.train_loop_config.set("storage_out", seen);
  // FSDP: the checkpoint is sharded, and each rank fetches only its own shard.
  for (auto* o : {&clean, &faulty})
    o->train_loop_config.set("strategy", std::string("fsdp"));
  faulty.run.failure.max_failures = 1;
  Result undisturbed;
  {
    System local;
    if (!is_worker_process())
      fs::create_directories(clean.train_loop_config.get<std::string>("out"));
    undisturbed = TorchTrainer(local.sys, train_func, clean).fit();
  }
  std::optional<Cluster> cluster;
  System s;
  bool hidden = false;
  if (!is_worker_process()) {
    for (auto& d : {storage, seen, faulty.train_loop_config.get<std::string>("out")})
      fs::create_directories(d);
    // The nodes run in mount namespaces of their own with an empty file system over the
    // storage path: a cluster without a shared filesystem, on one machine.
    hidden = Cluster::can_hide(storage);
    if (!hidden)
      WARN("this machine cannot hide a directory from a process (no mount namespace): the "
           "nodes are told CAFTRAIN_SHARED_STORAGE=0 instead");
    cluster.emplace(dir);
    REQUIRE_FALSE(cluster->address.empty());
    for (std::string name : {"node-a", "node-b", "node-c"}) {
      auto tmp = dir / ("tmp-" + name); // each node's own TMPDIR: its local copies
      fs::create_directories(tmp);
      std::map<std::string, std::string> env{{"TMPDIR", tmp}};
      if (!hidden)
        env["CAFTRAIN_SHARED_STORAGE"] = "0";
      cluster->add_node(name, 1, "", {}, "", env, hidden ? storage : "");
    }
    REQUIRE(cluster->connect_and_wait(s.sys, 3));
  }
  TorchTrainer trainer(s.sys, train_func, faulty);
  trainer.start(); // a worker process runs its rank here and ends
  kill_stuck_node(faulty);
  auto result = fit_recovered(trainer, undisturbed);
  // Every rank ran where the run directory is not visible; attempt 1 resumed from a copy
  // of the driver's checkpoint fetched into its node's TMPDIR.
  for (int attempt : {0, 1})
    for (int rank : {0, 1}) {
      std::ifstream f(seen + "/a" + std::to_string(attempt) + "-r" + std::to_string(rank));
      std::string sees, from;
      f >> sees >> from;
      CAPTURE(attempt, rank, sees, from);
      if (hidden)
        CHECK(sees == "0");
      if (attempt == 0) {
        CHECK(from == "-");
      } else {
        CHECK_THAT(from, Contains(dir / "tmp-node-") && Contains("/caftrain-worker-") &&
                           Contains("/checkpoints/checkpoint_"));
        CHECK_FALSE(fs::exists(from)); // the worker process removed its copies when it ended
        // Of the sharded checkpoint's rank shards, the copy held only the rank's own:
        // the other rank's shard never travelled (transfer::Fetch::shards_on_demand).
        std::ifstream shards(seen + "/a1-r" + std::to_string(rank) + ".shards");
        std::vector<std::string> held;
        for (std::string name; shards >> name;)
          held.push_back(name);
        CHECK(held == std::vector<std::string>{"rank_" + std::to_string(rank) + ".pt"});
      }
    }
  // What the driver committed is complete (every file's size and CRC), and no upload is
  // left in the run directory once the run's I/O actor ended.
  REQUIRE_FALSE(result.best_checkpoints.empty());
  for (auto& [ckpt, metrics] : result.best_checkpoints)
    CHECK_NOTHROW(ckpt.validate());
  auto staging = fs::path(storage) / "faulty" / ".staging";
  auto uploads_left = [&] {
    size_t n = 0;
    std::error_code ec;
    for (auto& e : fs::directory_iterator(staging, ec))
      n += e.path().filename().string().rfind("upload-", 0) == 0;
    return n;
  };
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while (uploads_left() > 0 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(uploads_left() == 0);
  check_none_left(faulty);
}

TEST_CASE("A Tuner connected to a cluster runs its trials' worker processes on the nodes; a thread-mode Tuner is refused there", "[cluster][tuner]") {
  test::TempDir dir;
  auto out = dir / "where";
  std::optional<Cluster> cluster;
  System s;
  std::set<std::string> nodes;
  if (!is_worker_process()) {
    fs::create_directories(out);
    cluster.emplace(dir);
    REQUIRE_FALSE(cluster->address.empty());
    for (auto name : {"node-a", "node-b"})
      nodes.insert(std::to_string(cluster->add_node(name, 1)));
    REQUIRE(cluster->connect_and_wait(s.sys, 2));
  }
  tune::TunerOptions o;
  o.run_config.name = "exp";
  o.run_config.storage_path = dir.path();
  o.verbose = 0;
  o.param_space = {{"x", tune::grid_search({0.1, 0.3, 0.8, 0.5})}, {"out", out}};
  o.tune_config = {.metric = "loss", .mode = "min"};
  if (!is_worker_process()) {
    try {
      tune::Tuner(s.sys, [](const Config&) {}, o);
      FAIL("a thread-mode Tuner was accepted on a cluster");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::invalid_config);
      CHECK_THAT(e.what(), Contains("worker_mode = \"process\""));
    }
  }
  o.scaling.worker_mode = "process";
  // Each trial's worker process writes its node (its parent), then reports (x - 0.3)^2.
  auto trainable = [](const Config& c) {
    std::ofstream(c.get<std::string>("out") + "/" + train::get_context().run_name) << ::getppid();
    auto x = c.get<double>("x");
    for (int i = 0; i < 2; ++i)
      train::report({{"loss", (x - 0.3) * (x - 0.3)}});
  };
  tune::Tuner tuner(s.sys, trainable, o);
  auto grid = tuner.fit(); // a worker process runs its trial's rank here and ends
  REQUIRE(grid.size() == 4);
  CHECK_FALSE(grid.error());
  std::set<std::string> used;
  for (auto& t : grid) {
    INFO(t.trial_id << ": " << (t.error ? t.error->message : ""));
    CHECK(t.ok());
    CHECK(t.metrics_history.size() == 2);
    std::string parent;
    std::ifstream(out + "/" + t.trial_id) >> parent;
    CHECK(nodes.count(parent) == 1); // started by a node agent, not by this driver
    used.insert(parent);
  }
  CHECK(used.size() == 2); // 4 trials of one CPU each on two nodes of one CPU
  CHECK(grid.get_best_result().config.get<double>("x") == Approx(0.3));
  // The nodes have their CPUs back.
  auto deadline = Clock::now() + std::chrono::seconds(5);
  auto free_cpus = [&] {
    double n = 0;
    for (auto& node : cluster->status(s.sys).nodes)
      n += node.available.get("CPU");
    return n;
  };
  while (free_cpus() < 2 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(free_cpus() == 2);
}

TEST_CASE("A cluster refuses a wrong token, and a run it can never hold, naming the problem", "[cluster]") {
  test::TempDir dir;
  Cluster cluster(dir);
  REQUIRE_FALSE(cluster.address.empty());
  cluster.add_node("good", 1);
  auto wrong = dir / "wrong-token";
  write_token(wrong, "not-the-token");
  auto intruder = cluster.add_node("intruder", 4, wrong);
  CHECK(describe_exit(wait_process(intruder)) == "exited with status 2");
  System s;
  {
    System other;
    CHECK_THROWS_WITH(connect(other.sys, cluster.address, {.token_file = wrong}),
                      Contains("refused") && Contains("token does not match"));
    CHECK_FALSE(cluster_of(other.sys).has_value());
    CHECK_THROWS_WITH(connect(other.sys, cluster.address, {.token_file = dir / "missing"}),
                      Contains("token file") && Contains("does not exist"));
    auto open_token = dir / "open-token";
    std::ofstream(open_token) << "x\n";
    ::chmod(open_token.c_str(), 0644);
    CHECK_THROWS_WITH(connect(other.sys, cluster.address, {.token_file = open_token}),
                      Contains("chmod 600"));
  }
  REQUIRE(cluster.connect_and_wait(s.sys, 1));
  auto status = cluster.status(s.sys);
  REQUIRE(status.nodes.size() == 1);
  CHECK(status.nodes[0].id == "good");
  CHECK(status.nodes[0].total.get("CPU") == 1);
  // Two workers of a CPU each on STRICT_PACK cannot fit a cluster of one 1-CPU node.
  auto o = options(dir, "too_big", "process");
  o.scaling.placement_strategy = "STRICT_PACK";
  o.scaling.resources_per_worker.cpus = 1;
  auto result = TorchTrainer(s.sys, train_func, o).fit();
  REQUIRE_FALSE(result.ok());
  CHECK(result.error->code == Errc::invalid_config);
  // Thread workers cannot run on a cluster's nodes.
  CHECK_THROWS_WITH(TorchTrainer(s.sys, train_func, options(dir, "threads", "thread")),
                    Contains("worker_mode = \"process\""));
  // The command line tool sees the same cluster.
  auto status_rc = wait_process(spawn_process(CAFTRAIN_CLI, {CAFTRAIN_CLI, "status", "--head", cluster.address,
                                                             "--token-file", cluster.token_file},
                                              {}));
  CHECK(describe_exit(status_rc) == "exited with status 0");
  auto refused_rc = wait_process(spawn_process(CAFTRAIN_CLI, {CAFTRAIN_CLI, "status", "--head", cluster.address,
                                                              "--token-file", wrong},
                                               {}));
  CHECK(describe_exit(refused_rc) == "exited with status 2");
}

TEST_CASE("A driver that dies takes its run's worker processes on the cluster's nodes with it", "[cluster]") {
  test::TempDir dir;
  Cluster cluster(dir);
  REQUIRE_FALSE(cluster.address.empty());
  cluster.add_node("node-a", 1);
  cluster.add_node("node-b", 1);
  System s;
  REQUIRE(cluster.connect_and_wait(s.sys, 2));
  auto out = dir / "out";
  fs::create_directories(out);
  auto driver = spawn_process(CAFTRAIN_DRIVER_CHILD, {CAFTRAIN_DRIVER_CHILD, dir.path(), out, cluster.address,
                                                      cluster.token_file},
                              {});
  auto deadline = Clock::now() + std::chrono::seconds(60);
  std::vector<std::string> pids;
  while (pids.size() < 2 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pids.clear();
    for (int rank = 0; rank < 2; ++rank) {
      std::string pid;
      if (std::ifstream(out + "/worker-" + std::to_string(rank)) >> pid)
        pids.push_back(pid);
    }
  }
  REQUIRE(pids.size() == 2);
  for (auto& pid : pids)
    CHECK(process_exists(pid));
  CHECK(cluster.status(s.sys).runs.size() == 1);
  ::kill(driver, SIGKILL);
  wait_process(driver);
  // The head sees the driver's connection close and tells the nodes, which stop the
  // run's processes (the workers ignore nothing: they are killed after stop_grace).
  deadline = Clock::now() + std::chrono::seconds(20);
  auto alive = [&] {
    return std::count_if(pids.begin(), pids.end(), [](auto& pid) { return process_exists(pid); });
  };
  while (alive() > 0 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(alive() == 0);
  CHECK(cluster.status(s.sys).runs.empty());
  // The nodes got their CPUs back.
  for (auto& n : cluster.status(s.sys).nodes)
    CHECK(n.available.get("CPU") == n.total.get("CPU"));
}

TEST_CASE("A node of another protocol version is refused by name", "[cluster]") {
  test::TempDir dir;
  Cluster cluster(dir);
  REQUIRE_FALSE(cluster.address.empty());
  System s;
  connect(s.sys, cluster.address, {.token_file = cluster.token_file});
  JoinRequest join;
  join.protocol = kClusterProtocol + 1;
  join.token = "the-cluster-token";
  join.name = "future";
  join.resources.set("CPU", 1);
  caf::scoped_actor self{s.sys};
  join.agent = caf::actor_cast<caf::actor>(self);
  std::string refused;
  self->request(cluster_of(s.sys)->head, std::chrono::seconds(5), join_atom::value, join)
    .receive([](std::string&) {}, [&](caf::error& err) { refused = to_run_error(err).message; });
  CHECK_THAT(refused, Contains("protocol " + std::to_string(kClusterProtocol + 1)) &&
                        Contains("same caftrain version"));
  CHECK(cluster.status(s.sys).nodes.empty());
}

TEST_CASE("A node that stops answering is dropped within seconds, and a node that joins again under its name is used again", "[cluster]") {
  test::TempDir dir;
  std::optional<Cluster> cluster;
  System s;
  if (!is_worker_process()) {
    cluster.emplace(dir);
    REQUIRE_FALSE(cluster->address.empty());
    cluster->add_node("node-a", 1);
    auto b = cluster->add_node("node-b", 1);
    REQUIRE(cluster->connect_and_wait(s.sys, 2));
    // Frozen, as a machine whose network is gone: its sockets stay open, it says nothing.
    REQUIRE(::kill(b, SIGSTOP) == 0);
    auto stopped_at = Clock::now();
    REQUIRE(cluster->wait_for_nodes(s.sys, 1));
    auto dropped = std::chrono::duration<double>(Clock::now() - stopped_at).count();
    // The head's connection timeout is 1.5 s (heartbeats every 250 ms); the bound leaves
    // room for a loaded CI machine.
    CAPTURE(dropped);
    CHECK(dropped < 5.0);
    CHECK(cluster->status(s.sys).nodes[0].id == "node-a");
    ::kill(b, SIGKILL);
    wait_process(b);
    // The same machine back under its name: a run that needs both nodes gets them.
    cluster->add_node("node-b", 1);
    REQUIRE(cluster->wait_for_nodes(s.sys, 2));
  }
  auto o = test::two_node_run(dir, "rejoined");
  auto result = TorchTrainer(s.sys, [](const Config&) {
    for (int step = 0; step < 3; ++step)
      train::report({{"step", static_cast<double>(step)}, {"node", static_cast<double>(train::get_context().node_rank)}});
  }, o).fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  REQUIRE(result.metrics_history.size() == 3);
  REQUIRE(result.metrics_history[0].all_metrics.size() == 2);
  CHECK(result.metrics_history[0].all_metrics[1].at("node") == 1.0); // one rank on each node
}
