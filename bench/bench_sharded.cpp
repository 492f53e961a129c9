// Memory and step time of the sharded strategies against DDP (the anchor).
//
//   build/bench/bench_sharded                        # ~53.6M parameters, Adam, 2 workers
//   build/bench/bench_sharded --hidden 2048 --layers 3 --steps 4 --repeats 1
//   build/bench/bench_sharded --load                 # also: peak of a sharded load
//
// Trains an MLP of 784 -> hidden x layers -> 10 (default 784-4096-4096-4096-4096-10,
// 53.6M parameters) with Adam on random data, on 2 local workers, once per strategy:
// ddp, zero_stage_1, zero_stage_2, fsdp (FULL_SHARD). Each run is a child process of its
// own (this binary with --child), so that its peak RSS (VmHWM, both ranks' threads
// together: local workers share one process) is its own. Prints per strategy: the median
// step time, the peak RSS, the bytes the strategy reports for rank 0 (parameters,
// gradients, optimizer state at rest, peak transient), and each as a ratio of DDP's,
// measured in the same invocation. Targets: ZeRO step time <= 1.1x DDP's, FSDP <= 1.5x.
// With --load, each sharded run then saves a sharded checkpoint and loads it into a fresh
// model and Trainer; it prints the largest saved shard a rank held while loading
// (ShardedStrategy::last_load_peak_bytes) against rank 0's parameter and optimizer bytes
// at rest (what a load must restore), as a ratio: consolidating every shard on every
// rank, as loads did before, holds world-size times that and more.
#include <torch/torch.h>

#include <unistd.h>

#include <caf/all.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.hpp"
#include "caftrain.hpp"

namespace {

using caftrain::bench::median;

using Clock = std::chrono::steady_clock;

struct Flags {
  int64_t workers = 2;
  int64_t threads = 1;
  int64_t batch = 32;
  int64_t hidden = 4096;
  int64_t layers = 4;
  int64_t steps = 5;
  int64_t warmup = 2;
  int64_t repeats = 2;
  std::string backend = "auto";
  bool load = false;
  std::vector<std::string> strategies = {"ddp", "zero_stage_1", "zero_stage_2", "fsdp"};
  std::string child; // internal: run this strategy and print one RESULT line
};

/// 784 -> hidden x layers -> 10, one top-level child per layer (FSDP's units).
class Wide : public caftrain::LightningModule {
 public:
  Wide(int64_t hidden, int64_t layers) {
    int64_t in = 784;
    for (int64_t i = 0; i < layers; ++i) {
      fcs.push_back(register_module("fc" + std::to_string(i), torch::nn::Linear(in, hidden)));
      in = hidden;
    }
    head = register_module("head", torch::nn::Linear(in, 10));
  }

  torch::Tensor training_step(const caftrain::Batch& b, int64_t) override {
    auto x = b.data;
    for (auto& fc : fcs)
      x = torch::relu(fc->forward(x));
    return torch::nn::functional::cross_entropy(head->forward(x), b.target);
  }

  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-4));
  }

  std::vector<torch::nn::Linear> fcs;
  torch::nn::Linear head{nullptr};
};

/// What rank 0 measured, shared by the worker threads of the child process.
struct Measured {
  std::mutex mtx;
  std::vector<double> step_ms;
  caftrain::MemoryStats stats;
  int64_t parameters = 0;
  int64_t load_peak = -1;
};

Measured& measured() {
  static Measured m;
  return m;
}

/// Times each step from one batch start to the next (everything a step does, the
/// optimizer's gather included) after the warm-up, and takes the strategy's byte counts at
/// the end of training.
class Probe : public caftrain::Callback {
 public:
  explicit Probe(int64_t warmup) : warmup_(warmup) {}

  void on_train_batch_start(caftrain::Trainer& t, caftrain::LightningModule&,
                            const caftrain::Batch&, int64_t) override {
    auto now = Clock::now();
    if (t.global_step() > warmup_ && caftrain::train::get_context().world_rank == 0) {
      std::lock_guard<std::mutex> guard(measured().mtx);
      measured().step_ms.push_back(std::chrono::duration<double, std::milli>(now - last_).count());
    }
    last_ = now;
  }

  void on_train_end(caftrain::Trainer& t, caftrain::LightningModule& module) override {
    auto now = Clock::now();
    auto stats = t.strategy().memory_stats();
    if (caftrain::train::get_context().world_rank != 0)
      return;
    std::lock_guard<std::mutex> guard(measured().mtx);
    measured().step_ms.push_back(std::chrono::duration<double, std::milli>(now - last_).count());
    measured().stats = stats;
    for (auto& p : module.parameters())
      measured().parameters += p.numel();
  }

 private:
  int64_t warmup_;
  Clock::time_point last_;
};

void train_func(const caftrain::Config& c) {
  auto hidden = c.get<int64_t>("hidden");
  auto layers = c.get<int64_t>("layers");
  auto batch = c.get<int64_t>("batch");
  auto warmup = c.get<int64_t>("warmup");
  auto steps = c.get<int64_t>("steps");
  auto model = caftrain::with_seed(0, [&] { return std::make_shared<Wide>(hidden, layers); });
  auto& ctx = caftrain::train::get_context();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  auto n = batch * ctx.world_size * (warmup + steps); // sharded over the ranks by the Trainer
  auto data = std::make_shared<caftrain::data::TensorDataset>(torch::randn({n, 784}, gen),
                                                              torch::randint(0, 10, {n}, gen));
  caftrain::Trainer trainer({.max_steps = warmup + steps,
                             .strategy = c.get<std::string>("strategy"),
                             .plugins = {caftrain::ActorEnvironment()},
                             .callbacks = {std::make_shared<Probe>(warmup)},
                             .logger = false,
                             .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  trainer.fit(model, caftrain::data::DataLoader(data, {.batch_size = batch}));
  if (!c.get<bool>("load", false) || !dynamic_cast<caftrain::ShardedStrategy*>(&trainer.strategy()))
    return;
  // Save (collective), then load into a fresh model and Trainer: the fit restores and
  // stops at once (max_steps reached).
  auto path = ctx.run_dir + "/load_probe";
  trainer.save_checkpoint(path);
  auto fresh = caftrain::with_seed(1, [&] { return std::make_shared<Wide>(hidden, layers); });
  caftrain::Trainer loader({.max_steps = warmup + steps,
                            .strategy = c.get<std::string>("strategy"),
                            .plugins = {caftrain::ActorEnvironment()},
                            .logger = false,
                            .enable_progress_bar = false});
  loader = caftrain::prepare_trainer(std::move(loader));
  loader.fit(fresh, caftrain::data::DataLoader(data, {.batch_size = batch}), std::nullopt, path);
  if (ctx.world_rank == 0) {
    std::lock_guard<std::mutex> guard(measured().mtx);
    measured().load_peak = dynamic_cast<caftrain::ShardedStrategy&>(loader.strategy()).last_load_peak_bytes();
  }
}

int64_t peak_rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0)
      return std::stoll(line.substr(6));
  return -1;
}


int run_child(const Flags& f) {
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  caftrain::TorchTrainerOptions o;
  o.train_loop_config = {{"strategy", f.child}, {"hidden", f.hidden}, {"layers", f.layers},
                         {"batch", f.batch},    {"warmup", f.warmup}, {"steps", f.steps},
                         {"load", f.load}};
  o.torch_config.backend = f.backend;
  o.scaling.num_workers = f.workers;
  o.scaling.resources_per_worker.cpus = static_cast<double>(f.threads);
  o.run.storage_path = "/tmp/caftrain_bench";
  o.run.name = "sharded_" + f.child + "_" + std::to_string(::getpid());
  o.run.collective_timeout = std::chrono::seconds(300);
  auto result = caftrain::TorchTrainer(sys, train_func, o).fit();
  if (!result.ok()) {
    std::cerr << "bench_sharded: " << f.child << ": " << result.error->message << "\n";
    return 1;
  }
  auto& m = measured();
  auto& s = m.stats;
  std::printf("RESULT %s %.3f %lld %lld %lld %lld %lld %lld %lld\n", f.child.c_str(), median(m.step_ms),
              static_cast<long long>(peak_rss_kib()), static_cast<long long>(s.parameter_bytes),
              static_cast<long long>(s.gradient_bytes),
              static_cast<long long>(s.optimizer_state_bytes),
              static_cast<long long>(s.peak_transient_bytes), static_cast<long long>(m.parameters),
              static_cast<long long>(m.load_peak));
  return 0;
}

struct Row {
  std::vector<double> step_ms, rss_kib;
  double params = 0, grads = 0, optim = 0, peak = 0, load_peak = -1;
  long long parameters = 0;
};

void run_parent_child(const std::string& self, const Flags& f, const std::string& strategy,
                      Row& row) {
  std::ostringstream cmd;
  cmd << self << " --child " << strategy << " --workers " << f.workers << " --threads "
      << f.threads << " --batch " << f.batch << " --hidden " << f.hidden << " --layers "
      << f.layers << " --steps " << f.steps << " --warmup " << f.warmup << " --backend "
      << f.backend << (f.load ? " --load" : "") << " 2>&1";
  auto out = caftrain::bench::capture(cmd.str());
  std::smatch m;
  std::regex re("RESULT (\\S+) ([0-9.]+) ([0-9-]+) ([0-9-]+) ([0-9-]+) ([0-9-]+) ([0-9-]+) ([0-9-]+) ([0-9-]+)");
  if (!std::regex_search(out, m, re))
    throw std::runtime_error(strategy + ": the child printed no result:\n" + out);
  row.step_ms.push_back(std::stod(m[2]));
  row.rss_kib.push_back(std::stod(m[3]));
  row.params = std::stod(m[4]);
  row.grads = std::stod(m[5]);
  row.optim = std::stod(m[6]);
  row.peak = std::stod(m[7]);
  row.parameters = std::stoll(m[8]);
  row.load_peak = std::stod(m[9]);
}

Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--workers")
      f.workers = std::stoll(next());
    else if (a == "--threads")
      f.threads = std::stoll(next());
    else if (a == "--batch")
      f.batch = std::stoll(next());
    else if (a == "--hidden")
      f.hidden = std::stoll(next());
    else if (a == "--layers")
      f.layers = std::stoll(next());
    else if (a == "--steps")
      f.steps = std::stoll(next());
    else if (a == "--warmup")
      f.warmup = std::stoll(next());
    else if (a == "--repeats")
      f.repeats = std::stoll(next());
    else if (a == "--backend")
      f.backend = next();
    else if (a == "--load")
      f.load = true;
    else if (a == "--strategies") {
      f.strategies.clear();
      std::stringstream ss(next());
      std::string s;
      while (std::getline(ss, s, ','))
        f.strategies.push_back(s);
    } else if (a == "--child")
      f.child = next();
    else {
      std::cerr << "unknown flag " << a << "\n";
      std::exit(2);
    }
  }
  if (f.strategies.empty() || f.strategies.front() != "ddp")
    f.strategies.insert(f.strategies.begin(), "ddp"); // the anchor
  return f;
}

} // namespace

int main(int argc, char** argv) {
  auto f = parse(argc, argv);
  if (!f.child.empty())
    return run_child(f);
  std::string self = "/proc/" + std::to_string(::getpid()) + "/exe";
  std::map<std::string, Row> rows;
  for (int64_t r = 0; r < f.repeats; ++r) {
    // Interleaved, so that drift of the machine hits every strategy alike.
    for (auto& s : f.strategies) {
      run_parent_child(self, f, s, rows[s]);
      std::printf("repeat %lld %-13s %8.1f ms/step, peak RSS %7.1f MiB\n", static_cast<long long>(r),
                  s.c_str(), rows[s].step_ms.back(), rows[s].rss_kib.back() / 1024);
      std::fflush(stdout);
    }
  }
  auto& ddp = rows["ddp"];
  constexpr double MiB = 1024.0 * 1024.0;
  std::printf("model: MLP 784-%lldx%lld-10, %.1fM parameters, Adam; %lld workers x %lld threads, "
              "batch %lld/worker, %lld steps after %lld warm-up, median of %lld\n",
              static_cast<long long>(f.hidden), static_cast<long long>(f.layers),
              static_cast<double>(ddp.parameters) / 1e6, static_cast<long long>(f.workers),
              static_cast<long long>(f.threads), static_cast<long long>(f.batch),
              static_cast<long long>(f.steps), static_cast<long long>(f.warmup),
              static_cast<long long>(f.repeats));
  std::printf("%-13s %9s %6s %9s %6s | rank 0 at rest, MiB: %8s %8s %8s %6s | %8s\n", "strategy",
              "ms/step", "ratio", "RSS MiB", "ratio", "params", "grads", "optim", "ratio",
              "peak tr.");
  for (auto& s : f.strategies) {
    auto& row = rows[s];
    double step = median(row.step_ms), rss = median(row.rss_kib) / 1024;
    double total = row.params + row.grads + row.optim;
    double ddp_total = ddp.params + ddp.grads + ddp.optim;
    std::printf("%-13s %9.1f %6.3f %9.1f %6.3f | %29.1f %8.1f %8.1f %6.3f | %8.1f\n", s.c_str(), step,
                step / median(ddp.step_ms), rss, rss / (median(ddp.rss_kib) / 1024),
                row.params / MiB, row.grads / MiB, row.optim / MiB, total / ddp_total,
                row.peak / MiB);
  }
  if (f.load) {
    std::printf("sharded load, rank 0: %-13s %14s %14s %8s\n", "", "load peak MiB", "at rest MiB",
                "ratio");
    for (auto& s : f.strategies) {
      auto& row = rows[s];
      if (row.load_peak < 0)
        continue;
      double at_rest = row.params + row.optim;
      std::printf("                      %-13s %14.1f %14.1f %8.3f\n", s.c_str(),
                  row.load_peak / MiB, at_rest / MiB, row.load_peak / at_rest);
    }
  }
  std::printf("targets: zero_stage_1/2 step time <= 1.1x ddp's, fsdp <= 1.5x\n");
  return 0;
}
