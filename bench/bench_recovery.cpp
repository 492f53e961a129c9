// Time to recover from a worker failure, against the 1 s target.
//
//   build/bench/bench_recovery --repeats 5
//   build/bench/bench_recovery --fail-step 25 --checkpoint-every 10 --batch 128
//
// Each repeat trains the seed's MLP (784-1024-1024-10) on Fashion-MNIST, batch 128, with
// DDP on 2 local workers, reporting a checkpoint every --checkpoint-every steps. Rank 1
// throws before step --fail-step + 1 of the first attempt (max_failures = 1); the group is
// stopped and a new attempt resumes from the latest checkpoint. Recovery is the time from
// a steady_clock stamp taken just before the throw to the end of the new attempt's first
// training step (rank 0). Prints every repeat, the phases of the median one, the median,
// the undisturbed step time measured in the same runs, and the ratio against the target.
// No Ray is installed here to measure its own restart time, hence a fixed 1 s anchor.
//
//   build/bench/bench_recovery --processes --repeats 5
//
// runs the workers as processes (this program started again per rank, gloo) and the
// failure is a SIGKILL of rank 1's process, as the OOM killer sends it; the workers stamp
// their moments into a file (steady_clock is one clock for every process of a machine).
//
//   build/bench/bench_recovery --spares --repeats 5
//
// as --processes, with FailureConfig::warm_spares: a spare process per rank is started
// while the attempt trains (rank 1 waits 3 s before it dies, so that they are loaded),
// and the restart takes them over instead of starting processes.
//
//   build/bench/bench_recovery --cluster [--spares] --repeats 5
//
// starts a cluster on this machine (`caftrain head` and 3 `caftrain node --cpus 1`), runs
// the 2 workers on its nodes, and the failure is a SIGKILL of rank 1's node (its worker
// process dies with it): recovery is then from the kill to the first step of the new
// attempt on the nodes left. A fresh node replaces the killed one before the next repeat.
// With --spares the nodes keep warm spares: each rank's own, and on the free node one for
// the loss of either node (rank 1 waits 3 s before its node dies, so that they are loaded).
#include <torch/torch.h>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <caf/all.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.hpp"
#include "caftrain.hpp"
#include "core/subprocess.hpp"

namespace {

using caftrain::bench::median;

using Clock = std::chrono::steady_clock;

/// The target recovery time, in ms.
constexpr double kTargetMs = 1000;

struct Flags {
  int64_t workers = 2;
  int64_t batch = 128;
  int64_t fail_step = 25;
  int64_t checkpoint_every = 10;
  int64_t steps_after = 5;
  int64_t repeats = 5;
  bool processes = false;
  bool spares = false;
  bool cluster = false;
  std::string dir = "/tmp/caftrain_bench";
};

/// Moments of one run, stamped by the workers' threads and the trainer actor (first stamp
/// of each name wins), and the undisturbed step times of rank 0.
class Marks {
 public:
  void stamp(const std::string& name) {
    auto now = Clock::now();
    if (!file_.empty())
      return append(name + " " + std::to_string(now.time_since_epoch().count()));
    std::lock_guard<std::mutex> guard(mtx_);
    marks_.emplace(name, now);
  }

  void add_step(double ms) {
    if (!file_.empty())
      return append("step " + std::to_string(ms));
    std::lock_guard<std::mutex> guard(mtx_);
    steps_.push_back(ms);
  }

  /// In a worker process: stamps go to `file` (one line each, appended), for the driver.
  void write_to(std::string file) {
    file_ = std::move(file);
  }

  /// In the driver: takes the stamps the worker processes wrote to `file`.
  void read(const std::string& file) {
    std::ifstream in(file);
    std::string name;
    std::lock_guard<std::mutex> guard(mtx_);
    for (std::string value; in >> name >> value;) {
      if (name == "step")
        steps_.push_back(std::stod(value));
      else
        marks_.emplace(name, Clock::time_point(Clock::duration(std::stoll(value))));
    }
  }

  /// Milliseconds from mark `from` to mark `to`; throws when one is missing.
  double between(const std::string& from, const std::string& to) const {
    std::lock_guard<std::mutex> guard(mtx_);
    for (auto* name : {&from, &to})
      if (!marks_.count(*name))
        throw std::runtime_error("no '" + *name + "' mark was taken");
    return std::chrono::duration<double, std::milli>(marks_.at(to) - marks_.at(from)).count();
  }

  std::vector<double> steps() const {
    std::lock_guard<std::mutex> guard(mtx_);
    return steps_;
  }

  void clear() {
    std::lock_guard<std::mutex> guard(mtx_);
    marks_.clear();
    steps_.clear();
  }

 private:
  void append(const std::string& line) {
    std::lock_guard<std::mutex> guard(mtx_);
    std::ofstream(file_, std::ios::app) << line << "\n" << std::flush;
  }

  std::string file_;
  mutable std::mutex mtx_;
  std::map<std::string, Clock::time_point> marks_;
  std::vector<double> steps_;
};

/// Thread workers stamp one shared object; worker processes their own, into a file.
Marks& marks() {
  static Marks instance;
  return instance;
}

class Classifier : public caftrain::LightningModule {
 public:
  Classifier() {
    model = register_module("model", caftrain::models::MLP());
  }
  torch::Tensor training_step(const caftrain::Batch& b, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(model->forward(b.data), b.target);
    log("loss", loss);
    return loss;
  }
  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-3));
  }
  caftrain::models::MLP model{nullptr};
};

/// Throws on `rank` before step `step` + 1 of the first attempt; stamps the new attempt's
/// progress on rank 0 and times rank 0's undisturbed steps (the batch, not the report).
class Probe : public caftrain::Callback {
 public:
  Probe(int64_t rank, int64_t step, bool cluster, int64_t warm_ms)
    : rank_(rank), step_(step), cluster_(cluster), warm_ms_(warm_ms) {}

  void setup(caftrain::Trainer&, caftrain::LightningModule&, caftrain::Stage) override {
    if (watching())
      marks().stamp("setup");
  }
  void on_fit_start(caftrain::Trainer&, caftrain::LightningModule&) override {
    if (watching())
      marks().stamp("restored");
  }
  void on_train_batch_start(caftrain::Trainer& t, caftrain::LightningModule&,
                            const caftrain::Batch&, int64_t) override {
    auto& ctx = caftrain::train::get_context();
    if (ctx.attempt == 0 && ctx.world_rank == rank_ && t.global_step() == step_) {
      // With warm spares: time for them to start and load before the failure.
      std::this_thread::sleep_for(std::chrono::milliseconds(warm_ms_));
      if (auto stuck = caftrain::train::get_context().run_dir + ".stuck"; cluster_) {
        // The driver kills this rank's node (stamping "throw"); wait for it.
        std::ofstream(stuck + ".tmp") << ::getppid() << "\n";
        std::filesystem::rename(stuck + ".tmp", stuck);
        for (;;)
          std::this_thread::sleep_for(std::chrono::seconds(1));
      }
      marks().stamp("throw");
      if (caftrain::is_worker_process())
        ::raise(SIGKILL); // the process dies as the OOM killer ends it
      throw std::runtime_error("injected failure");
    }
    start_ = Clock::now();
  }
  void on_train_batch_end(caftrain::Trainer& t, caftrain::LightningModule&, const at::Tensor&,
                          const caftrain::Batch&, int64_t) override {
    auto& ctx = caftrain::train::get_context();
    if (ctx.world_rank != 0)
      return;
    if (ctx.attempt == 0 && t.global_step() > 3) // after a warm-up
      marks().add_step(std::chrono::duration<double, std::milli>(Clock::now() - start_).count());
    if (ctx.attempt == 1)
      marks().stamp("first_step");
  }

 private:
  static bool watching() {
    auto& ctx = caftrain::train::get_context();
    return ctx.attempt == 1 && ctx.world_rank == 0;
  }

  int64_t rank_;
  int64_t step_;
  bool cluster_;
  int64_t warm_ms_;
  Clock::time_point start_;
};

void train_func(const caftrain::Config& c) {
  if (caftrain::is_worker_process())
    marks().write_to(c.get<std::string>("marks"));
  auto& ctx = caftrain::train::get_context();
  bool watching = ctx.attempt == 1 && ctx.world_rank == 0;
  if (watching)
    marks().stamp("entered");
  auto data = caftrain::data::FashionMNIST::train();
  if (watching)
    marks().stamp("data");
  auto model = caftrain::with_seed(0, [] { return std::make_shared<Classifier>(); });
  caftrain::Trainer trainer(
    {.max_steps = c.get<int64_t>("steps"),
     .strategy = caftrain::DDPStrategy(),
     .plugins = {caftrain::ActorEnvironment()},
     .callbacks = {Probe(1, c.get<int64_t>("fail_step"), c.get<bool>("cluster", false),
                         c.get<int64_t>("warm_ms", 0)),
                   caftrain::ReportCallback({.every_n_epochs = 0,
                                             .every_n_steps = c.get<int64_t>("checkpoint_every")})},
     .logger = false,
     .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  auto checkpoint = caftrain::train::get_checkpoint();
  trainer.fit(model, data->loader({.batch_size = c.get<int64_t>("batch"), .shuffle = true}),
              std::nullopt, checkpoint ? checkpoint->path() : "");
}

/// Stamps the moment the trainer actor decides to restart: the old group has stopped.
class FailureStamp : public caftrain::RunCallback {
 public:
  void on_failure(const std::string&, int64_t, bool) override {
    marks().stamp("stopped");
  }
};

struct Sample {
  double recovery_ms;
  std::vector<std::pair<const char*, double>> phases;
};

/// A head and nodes of the `caftrain` command on this machine (--cluster).
class LocalCluster {
 public:
  LocalCluster(caf::actor_system& sys, const std::string& dir) : sys_(sys), dir_(dir) {
    token_ = dir + "/token";
    std::ofstream(token_) << "bench-token\n";
    ::chmod(token_.c_str(), 0600);
    auto address_file = dir + "/head-address";
    std::filesystem::remove(address_file);
    pids_.push_back(caftrain::spawn_process(CAFTRAIN_CLI, {CAFTRAIN_CLI, "head", "--host", "127.0.0.1", "--port", "0",
                                                           "--token-file", token_, "--address-file", address_file},
                                            {}));
    for (int i = 0; i < 300 && address_.empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::ifstream(address_file) >> address_;
    }
    if (address_.empty())
      throw std::runtime_error("the head did not start");
    caftrain::connect(sys, address_, {.token_file = token_});
  }
  ~LocalCluster() {
    for (auto pid : pids_)
      ::kill(pid, SIGKILL);
    for (auto pid : pids_)
      caftrain::wait_process(pid);
  }
  /// Starts nodes of 1 CPU until the head lists `n`.
  void keep_nodes(size_t n) {
    auto head = caftrain::cluster_of(sys_)->head;
    caf::scoped_actor self{sys_};
    for (int tries = 0; tries < 600; ++tries) {
      size_t have = 0;
      self->request(head, std::chrono::seconds(5), caftrain::cluster_status_atom::value)
        .receive([&](caftrain::ClusterStatus& st) { have = st.nodes.size(); }, [](caf::error&) {});
      if (have >= n)
        return;
      if (have + starting_ < n) {
        ++starting_;
        pids_.push_back(caftrain::spawn_process(
          CAFTRAIN_CLI, {CAFTRAIN_CLI, "node", "--head", address_, "--cpus", "1", "--name",
                         "node-" + std::to_string(pids_.size()), "--token-file", token_},
          {}));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    throw std::runtime_error("the nodes did not join");
  }
  void joined() {
    starting_ = 0;
  }

 private:
  caf::actor_system& sys_;
  std::string dir_, token_, address_;
  std::vector<pid_t> pids_;
  size_t starting_ = 0;
};

Sample run_once(caf::actor_system& sys, const Flags& f, int64_t repeat) {
  marks().clear();
  caftrain::TorchTrainerOptions o;
  o.train_loop_config = {{"batch", f.batch},
                         {"fail_step", f.fail_step},
                         {"checkpoint_every", f.checkpoint_every},
                         {"steps", f.fail_step + f.steps_after}};
  o.scaling.num_workers = f.workers;
  o.scaling.worker_mode = f.processes ? "process" : "thread";
  o.run.storage_path = f.dir;
  o.run.name = "recovery_" + std::to_string(::getpid()) + "_" + std::to_string(repeat);
  o.run.failure.max_failures = 1;
  o.run.failure.warm_spares = f.spares;
  o.train_loop_config.set("warm_ms", int64_t{f.spares ? 3000 : 0});
  o.run.callbacks = {std::make_shared<FailureStamp>()};
  auto marks_file = f.dir + "/" + o.run.name + ".marks";
  o.train_loop_config.set("marks", marks_file);
  o.train_loop_config.set("cluster", f.cluster);
  if (f.cluster)
    o.scaling.placement_strategy = "SPREAD";
  caftrain::TorchTrainer trainer(sys, train_func, o);
  if (f.cluster && !caftrain::is_worker_process()) {
    trainer.start(); // a worker process runs its rank here and ends
    auto stuck = trainer.path() + ".stuck";
    for (int i = 0; i < 6000 && !std::filesystem::exists(stuck); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::string node;
    std::ifstream(stuck) >> node;
    if (node.empty())
      throw std::runtime_error("rank 1 did not reach the failure step");
    marks().stamp("throw");
    ::kill(std::stoi(node), SIGKILL);
    std::filesystem::remove(stuck);
  }
  auto result = trainer.fit();
  if (caftrain::is_worker_process())
    return {}; // a worker process of a later repeat passes this one by
  marks().read(marks_file);
  std::error_code ec;
  std::filesystem::remove_all(result.path, ec);
  std::filesystem::remove(marks_file, ec);
  if (!result.ok())
    throw std::runtime_error("the run failed: " + result.error->message);
  if (result.attempts != 2)
    throw std::runtime_error("expected 2 attempts, got " + std::to_string(result.attempts));
  auto& m = marks();
  return {m.between("throw", "first_step"),
          {{"stop of the old group (throw -> restart decided)", m.between("throw", "stopped")},
           {"spawn of the new workers (-> train_func entered)", m.between("stopped", "entered")},
           {"train_func: data loading", m.between("entered", "data")},
           {"model, Trainer, DDP setup", m.between("data", "setup")},
           {"checkpoint restore", m.between("setup", "restored")},
           {"first training step", m.between("restored", "first_step")}}};
}


Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--workers")
      f.workers = std::stoll(next());
    else if (a == "--batch")
      f.batch = std::stoll(next());
    else if (a == "--fail-step")
      f.fail_step = std::stoll(next());
    else if (a == "--checkpoint-every")
      f.checkpoint_every = std::stoll(next());
    else if (a == "--repeats")
      f.repeats = std::stoll(next());
    else if (a == "--dir")
      f.dir = next();
    else if (a == "--processes")
      f.processes = true;
    else if (a == "--spares")
      f.spares = f.processes = true;
    else if (a == "--cluster")
      f.cluster = f.processes = true;
    else {
      std::cerr << "unknown flag " << a << "\n"
                << "flags: --workers N --batch N --fail-step N --checkpoint-every N --repeats N "
                   "--dir DIR --processes --spares --cluster\n";
      std::exit(2);
    }
  }
  if (f.workers < 2 || f.repeats < 1 || f.checkpoint_every < 1 || f.fail_step <= f.checkpoint_every) {
    std::cerr << "need --workers >= 2, --repeats >= 1 and --fail-step > --checkpoint-every >= 1\n";
    std::exit(2);
  }
  return f;
}

} // namespace

int main(int argc, char** argv) {
  auto f = parse(argc, argv);
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  std::optional<LocalCluster> cluster;
  if (f.cluster && !caftrain::is_worker_process()) {
    std::filesystem::create_directories(f.dir);
    cluster.emplace(sys, f.dir);
  }
  std::vector<Sample> samples;
  std::vector<double> recoveries, steps;
  for (int64_t r = 0; r < f.repeats; ++r) {
    if (cluster) {
      cluster->keep_nodes(3); // a fresh node replaces the one killed
      cluster->joined();
    }
    samples.push_back(run_once(sys, f, r));
    if (caftrain::is_worker_process())
      continue; // on its way to its own repeat
    recoveries.push_back(samples.back().recovery_ms);
    auto s = marks().steps();
    steps.insert(steps.end(), s.begin(), s.end());
    std::printf("repeat %lld: recovery %.1f ms (undisturbed step %.1f ms)\n",
                static_cast<long long>(r), recoveries.back(), median(s));
  }
  auto med = median(recoveries);
  auto& typical = *std::min_element(samples.begin(), samples.end(), [&](auto& a, auto& b) {
    return std::abs(a.recovery_ms - med) < std::abs(b.recovery_ms - med);
  });
  std::printf("workers=%lld (%s) model=mlp batch=%lld checkpoint every %lld steps, failure (%s) "
              "before step %lld (resumes from step %lld)\n",
              static_cast<long long>(f.workers), f.cluster ? "processes on 3 nodes" : f.spares ? "processes, warm spares" : f.processes ? "processes" : "threads", static_cast<long long>(f.batch),
              static_cast<long long>(f.checkpoint_every),
              f.cluster ? "SIGKILL of rank 1's node" : f.processes ? "SIGKILL of rank 1's process" : "rank 1 throws",
              static_cast<long long>(f.fail_step + 1),
              static_cast<long long>(f.fail_step / f.checkpoint_every * f.checkpoint_every));
  std::printf("phases of the median repeat (rank 0 of the new attempt):\n");
  for (auto& [name, ms] : typical.phases)
    std::printf("  %-50s %8.1f ms\n", name, ms);
  // A node's loss has the 2 s target of issue 11; a worker's failure the 1 s one.
  auto target = f.cluster ? 2 * kTargetMs : kTargetMs;
  std::printf("median recovery: %.1f ms; undisturbed step (median): %.1f ms\n", med, median(steps));
  std::printf("ratio recovery / %.0f s target: %.3f\n", target / 1000, med / target);
}
