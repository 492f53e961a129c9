// Worker processes: each rank its own process (this test binary started again for the
// test case being run); a crash, a kill or a hang of one is a failure the run restarts
// from, ending with the weights of an undisturbed run, and nothing is left behind.
//
// The code of a test case runs in every worker process too, up to the TorchTrainer the
// process was started for (see actors/worker_process.hpp): so each case first makes all
// its runs and checks their results only afterwards.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "core/subprocess.hpp"
#include "helpers.hpp"
#include "process_tree.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;
using System = test::ActorSystem;
using test::Classifier;
using test::process_exists;

/// On rank 1 of attempt 0, at global step `step`: "kill" (SIGKILL, as the OOM killer),
/// "segv" (SIGSEGV), "abort", "hang" (sleeps without heartbeat), "freeze" (SIGSTOP: the
/// whole process stops answering), or nothing ("").
class Fault : public Callback {
 public:
  Fault(std::string kind, int64_t step, int64_t delay_ms = 0)
    : kind_(std::move(kind)), step_(step), delay_ms_(delay_ms) {}
  void on_train_batch_start(Trainer& t, LightningModule&, const Batch&, int64_t) override {
    auto& ctx = train::get_context();
    if (kind_.empty() || ctx.world_rank != 1 || ctx.attempt != 0 || t.global_step() != step_)
      return;
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
    if (kind_ == "kill")
      ::raise(SIGKILL);
    if (kind_ == "segv")
      ::raise(SIGSEGV);
    if (kind_ == "abort")
      std::abort();
    if (kind_ == "freeze")
      ::raise(SIGSTOP);
    if (kind_ == "hang")
      for (;;)
        std::this_thread::sleep_for(std::chrono::seconds(1));
  }

 private:
  std::string kind_;
  int64_t step_;
  int64_t delay_ms_;
};

/// The Classifier with randomness of each rank's own, as data augmentation draws: noise
/// on its inputs, dropout, and rank 1 draws more numbers than rank 0, so that the ranks'
/// generators part ways.
class NoisyClassifier : public Classifier {
 public:
  at::Tensor training_step(const Batch& batch, int64_t) override {
    if (train::get_context().world_rank == 1)
      (void)torch::rand({7});
    auto x = batch.data + 0.1 * torch::randn_like(batch.data);
    auto hidden = torch::dropout(torch::relu(fc1->forward(x)), 0.3, true);
    auto loss = torch::nn::functional::cross_entropy(fc2->forward(hidden), batch.target);
    log("loss", loss);
    return loss;
  }
};

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

/// 2 epochs of 6 steps on each of 2 ranks, a report every step and a checkpoint every
/// third. Each worker writes where it ran (pid, torch's variables, its context) to
/// `<out>/a<attempt>-r<rank>`.
void train_func(const Config& c) {
  auto& ctx = train::get_context();
  if (auto out = c.get<std::string>("out", ""); !out.empty()) {
    std::ofstream f(out + "/a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank));
    f << ::getpid() << " " << env_or("RANK", "-") << " " << env_or("LOCAL_RANK", "-") << " "
      << env_or("WORLD_SIZE", "-") << " " << env_or("LOCAL_WORLD_SIZE", "-") << " "
      << env_or("NODE_RANK", "-") << " " << env_or("MASTER_ADDR", "-") << " "
      << env_or("MASTER_PORT", "-") << " [" << env_or("CUDA_VISIBLE_DEVICES", "unset") << "] "
      << ctx.world_rank << " " << ctx.world_size << " " << ctx.local_rank << "\n";
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
  auto model = with_seed(0, [&]() -> std::shared_ptr<Classifier> {
    if (c.get<bool>("noisy", false))
      return std::make_shared<NoisyClassifier>();
    return std::make_shared<Classifier>();
  });
  Trainer trainer({.max_epochs = 2,
                   .strategy = DDPStrategy({.broadcast_buffers = false}),
                   .plugins = {ActorEnvironment()},
                   .callbacks = {Fault(c.get<std::string>("fault", ""), c.get<int64_t>("fault_step", 7),
                                       c.get<int64_t>("fault_delay_ms", 0)),
                                 ReportCallback({.every_n_epochs = 0, .every_n_steps = 1, .checkpoint_every = 3})},
                   .logger = false,
                   .enable_progress_bar = false});
  trainer = prepare_trainer(std::move(trainer));
  auto ckpt = train::get_checkpoint();
  trainer.fit(model, data::DataLoader(data, {.batch_size = 16, .shuffle = true, .seed = 9}),
              std::nullopt, ckpt ? ckpt->path() : "");
}

TorchTrainerOptions options(const test::TempDir& dir, const std::string& name, const std::string& mode,
                            const std::string& fault = "") {
  TorchTrainerOptions o;
  auto out = dir / ("where-" + name);
  o.train_loop_config = {{"fault", fault}, {"out", out}};
  o.scaling.num_workers = 2;
  o.scaling.worker_mode = mode;
  o.torch_config.backend = "gloo";
  o.run.name = name;
  o.run.storage_path = dir.path();
  o.run.failure.max_failures = fault.empty() ? 0 : 1;
  o.run.stop_grace = std::chrono::seconds(2);
  // Long enough for a rank that waits for a slow-starting peer on a loaded machine.
  o.run.heartbeat_timeout = std::chrono::seconds(6);
  return o;
}

Result run(caf::actor_system& sys, const TorchTrainerOptions& o) {
  if (!is_worker_process())
    fs::create_directories(o.train_loop_config.get<std::string>("out"));
  return TorchTrainer(sys, train_func, o).fit();
}

using test::check_same_weights;

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
  for (auto& entry : fs::directory_iterator(o.train_loop_config.get<std::string>("out"))) {
    std::ifstream f(entry.path());
    std::string pid;
    f >> pid;
    CAPTURE(entry.path().string(), pid);
    CHECK_FALSE(process_exists(pid));
  }
}

} // namespace

TEST_CASE("Worker processes train as their own processes with torch's variables and end with the weights of thread workers", "[worker_process]") {
  test::TempDir dir;
  System s;
  auto threads = options(dir, "threads", "thread");
  auto processes = options(dir, "processes", "process");
  auto by_threads = run(s.sys, threads);
  auto by_processes = run(s.sys, processes);
  INFO((by_processes.error ? by_processes.error->message : ""));
  REQUIRE(by_threads.ok());
  REQUIRE(by_processes.ok());
  REQUIRE(by_processes.metrics_history.size() == 12);
  check_same_weights(by_threads, by_processes);
  auto r0 = where(processes, 0, 0), r1 = where(processes, 0, 1);
  REQUIRE(r0.size() == 12);
  REQUIRE(r1.size() == 12);
  CHECK(r0[0] != std::to_string(::getpid()));
  CHECK(r1[0] != std::to_string(::getpid()));
  CHECK(r0[0] != r1[0]);
  // RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE NODE_RANK MASTER_ADDR MASTER_PORT
  // [CUDA_VISIBLE_DEVICES], then the context's world rank, world size and local rank.
  CHECK(std::vector<std::string>(r1.begin() + 1, r1.begin() + 7) ==
        std::vector<std::string>{"1", "1", "2", "2", "0", "127.0.0.1"});
  CHECK(r1[8] == "[]"); // CPU workers see no GPU
  CHECK(std::vector<std::string>(r1.begin() + 9, r1.end()) == std::vector<std::string>{"1", "2", "1"});
  CHECK(r0[1] == "0");
  CHECK(r0[7] == r1[7]); // one MASTER_PORT
  // Thread workers are this process, without torch's variables.
  auto t1 = where(threads, 0, 1);
  REQUIRE(t1.size() == 12);
  CHECK(t1[0] == std::to_string(::getpid()));
  check_none_left(processes);
}

TEST_CASE("A worker process killed by SIGKILL, SIGSEGV or abort mid-run is restarted from the latest checkpoint and ends like an undisturbed run", "[worker_process]") {
  test::TempDir dir;
  System s;
  auto clean_options = options(dir, "clean", "thread");
  std::vector<std::string> kinds = {"kill", "segv", "abort"};
  std::vector<TorchTrainerOptions> faulty_options;
  for (auto& kind : kinds)
    faulty_options.push_back(options(dir, kind, "process", kind));
  // The failure is named by the launcher: rank, pid and signal.
  std::string failure;
  struct Listener : RunCallback {
    std::string* out;
    explicit Listener(std::string* out) : out(out) {}
    void on_failure(const std::string& error, int64_t, bool) override { *out = error; }
  };
  auto named = options(dir, "named", "process", "segv");
  named.run.failure.max_failures = 0;
  named.run.callbacks = {std::make_shared<Listener>(&failure)};
  auto clean = run(s.sys, clean_options);
  std::vector<Result> faulty;
  for (auto& o : faulty_options)
    faulty.push_back(run(s.sys, o));
  auto failed = run(s.sys, named);
  REQUIRE(clean.ok());
  std::vector<std::string> signals = {"signal 9", "signal 11", "signal 6"};
  for (size_t k = 0; k < kinds.size(); ++k) {
    CAPTURE(kinds[k]);
    auto& r = faulty[k];
    INFO((r.error ? r.error->message : ""));
    REQUIRE(r.ok());
    CHECK(r.attempts == 2);
    REQUIRE(r.metrics_history.size() == 12);
    for (size_t i = 0; i < 12; ++i)
      CHECK(r.metrics_history[i].attempt == (i < 6 ? 0 : 1));
    check_same_weights(clean, r);
    check_none_left(faulty_options[k]);
  }
  REQUIRE_FALSE(failed.ok());
  CHECK(failed.error->code == Errc::worker_failed);
  CHECK_THAT(failed.error->message, Contains("rank 1: worker process") && Contains("signal 11"));
  CHECK(failure == failed.error->message);
}

TEST_CASE("With warm spares a SIGKILLed worker process's run restarts on spare processes started while it trained, ends like an undisturbed run and leaves no spare behind", "[worker_process][spares]") {
  test::TempDir dir;
  System s;
  auto clean_options = options(dir, "clean", "thread");
  auto o = options(dir, "spares", "process", "kill");
  o.run.failure.warm_spares = true;
  o.train_loop_config.set("fault_delay_ms", int64_t{2500}); // spares start 1 s into a rank's run
  auto stamps = dir / "stamps";
  o.train_loop_config.set("stamps", stamps);
  if (!is_worker_process())
    fs::create_directories(stamps);
  auto clean = run(s.sys, clean_options);
  auto r = run(s.sys, o);
  REQUIRE(clean.ok());
  INFO((r.error ? r.error->message : ""));
  REQUIRE(r.ok());
  CHECK(r.attempts == 2);
  REQUIRE(r.metrics_history.size() == 12);
  check_same_weights(clean, r);
  // Attempt 0 started processes; attempt 1 took over the spares (one per rank).
  for (int attempt : {0, 1})
    for (int rank : {0, 1}) {
      std::ifstream f(stamps + "/a" + std::to_string(attempt) + "-r" + std::to_string(rank));
      std::string pid, spare;
      f >> pid >> spare;
      CAPTURE(attempt, rank, pid);
      CHECK(spare == (attempt == 0 ? "0" : "1"));
    }
  check_none_left(o);
  // The spares kept for attempt 1's ranks went with the run.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!test::children_of(::getpid()).empty() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(test::children_of(::getpid()).empty());
  // Spares are for worker processes.
  auto threads = options(dir, "spare-threads", "thread");
  threads.run.failure.warm_spares = true;
  if (!is_worker_process()) {
    try {
      TorchTrainer(s.sys, train_func, threads);
      FAIL("warm spares were accepted for thread workers");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::invalid_config);
      CHECK_THAT(e.what(), Contains("worker_mode = \"process\""));
    }
  }
}

TEST_CASE("Each worker process saves and restores its own random generator: a run whose ranks draw different numbers, killed mid-run, ends like an undisturbed one", "[worker_process]") {
  test::TempDir dir;
  System s;
  auto clean_options = options(dir, "noisy-clean", "process");
  auto killed_options = options(dir, "noisy-killed", "process", "kill");
  for (auto* o : {&clean_options, &killed_options})
    o->train_loop_config.set("noisy", true);
  auto clean = run(s.sys, clean_options);
  auto killed = run(s.sys, killed_options);
  INFO((clean.error ? clean.error->message : ""));
  INFO((killed.error ? killed.error->message : ""));
  REQUIRE(clean.ok());
  REQUIRE(killed.ok());
  CHECK(killed.attempts == 2);
  // Rank 1's generator came back as rank 1 left it, not as rank 0's.
  REQUIRE(killed.checkpoint);
  CHECK(killed.checkpoint->has_file("rng_rank_1.pt"));
  check_same_weights(clean, killed);
}

TEST_CASE("A hung or frozen worker process is killed after its timeout and the run restarts without leaving it behind", "[worker_process]") {
  test::TempDir dir;
  System s;
  auto clean = run(s.sys, options(dir, "clean", "thread"));
  // "hang": the training thread sleeps (the rank's heartbeat stops; the process is
  // stopped, does not stop within stop_grace, and is killed). "freeze": SIGSTOP (the
  // whole process is silent; its launcher kills it).
  auto hang_options = options(dir, "hang", "process", "hang");
  auto freeze_options = options(dir, "freeze", "process", "freeze");
  auto started = std::chrono::steady_clock::now();
  auto hang = run(s.sys, hang_options);
  auto hang_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  auto freeze = run(s.sys, freeze_options);
  REQUIRE(clean.ok());
  for (auto* r : {&hang, &freeze}) {
    INFO((r->error ? r->error->message : ""));
    REQUIRE(r->ok());
    CHECK(r->attempts == 2);
    check_same_weights(clean, *r);
  }
  // heartbeat 6 s + stop grace 2 s, plus the two attempts' own work (a few seconds).
  CHECK(hang_seconds < 60);
  check_none_left(hang_options);
  check_none_left(freeze_options);
}

TEST_CASE("Worker processes are refused for a local backend and an unknown worker_mode, naming the fix", "[worker_process]") {
  TorchTrainerOptions o;
  o.scaling.worker_mode = "fork";
  CHECK_THROWS_WITH(validate(o), Contains("worker_mode 'fork' is unknown"));
  o.scaling.worker_mode = "process";
  o.torch_config.backend = "local";
  CHECK_THROWS_WITH(validate(o), Contains("worker processes use \"gloo\""));
  o.torch_config.backend = "auto";
  CHECK(resolve_backend(o) == "gloo");
}

TEST_CASE("GLOO_SOCKET_IFNAME picks the interface worker processes bind gloo to, and an unknown one is a clear error", "[worker_process]") {
  test::TempDir dir;
  System s;
  auto on_lo = options(dir, "on_lo", "process");
  auto on_nothing = options(dir, "on_nothing", "process");
  // Set in this process before the workers start: they inherit it, as from a shell.
  ::setenv("GLOO_SOCKET_IFNAME", "lo", 1);
  auto good = run(s.sys, on_lo);
  ::setenv("GLOO_SOCKET_IFNAME", "nosuchif0", 1);
  auto bad = run(s.sys, on_nothing);
  ::unsetenv("GLOO_SOCKET_IFNAME");
  INFO((good.error ? good.error->message : ""));
  CHECK(good.ok());
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.error->code == Errc::invalid_config);
  CHECK_THAT(bad.error->message, Contains("GLOO_SOCKET_IFNAME 'nosuchif0'") && Contains("lo"));
}

TEST_CASE("Worker processes die with their driver when it is killed", "[worker_process]") {
  test::TempDir dir;
  auto out = dir / "out";
  fs::create_directories(out);
  auto driver = spawn_process(CAFTRAIN_DRIVER_CHILD, {CAFTRAIN_DRIVER_CHILD, dir.path(), out}, {});
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::vector<std::string> pids;
  while (pids.size() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pids.clear();
    for (int rank = 0; rank < 2; ++rank) {
      std::ifstream f(out + "/worker-" + std::to_string(rank));
      std::string pid;
      if (f >> pid)
        pids.push_back(pid);
    }
  }
  REQUIRE(pids.size() == 2);
  for (auto& pid : pids)
    CHECK(process_exists(pid));
  ::kill(driver, SIGKILL);
  CHECK(describe_exit(wait_process(driver)) == "was killed by signal 9 (Killed)");
  // The kernel ends them with the driver (PR_SET_PDEATHSIG): nothing to clean up.
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  auto alive = [&] {
    return std::count_if(pids.begin(), pids.end(), [](auto& pid) { return process_exists(pid); });
  };
  while (alive() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(alive() == 0);
}
