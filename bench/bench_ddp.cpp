// DDP training throughput against Python PyTorch DDP (the anchor), and scaling efficiency.
//
//   build/bench/bench_ddp --model mlp --workers 2 --threads 1 --steps 30 --repeats 3
//   build/bench/bench_ddp --model resnet18 --steps 20
//
// Each repeat runs ../shared/anchors/torch_ddp_baseline.py (same libtorch, same model,
// batch, threads and steps) and then caftrain's TorchTrainer + DDPStrategy on the same
// random batches of Fashion-MNIST; prints samples/s of both and the ratio of the medians.
// With --scaling it also runs caftrain on one worker: efficiency = samples/s(N) / (N *
// samples/s(1)). --backend gloo|local picks the process group (default auto = local).
// With --processes it also runs caftrain with worker processes (gloo; this program started
// again per rank) and prints their samples/s against thread workers and the anchor.
// With --in-wait it also runs the local backend with reduction on arrival turned off (all
// its work inside wait(), CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL=0) and prints the ratio.
#include <torch/torch.h>

#include <caf/all.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <regex>
#include <string>
#include <vector>

#include "bench/bench_models.hpp"
#include "bench/bench_util.hpp"
#include "caftrain.hpp"

namespace {

using caftrain::bench::median;

struct Flags {
  std::string model = "mlp";
  int64_t workers = 2;
  int64_t threads = 1;
  int64_t batch = 128;
  int64_t steps = 30;
  int64_t warmup = 3;
  int64_t repeats = 3;
  bool scaling = false;
  bool processes = false;
  bool in_wait = false;   // --in-wait: also the local backend with all its work in wait()
  std::string backend = "auto";
  std::string anchor = "../shared/anchors/torch_ddp_baseline.py";
};

using caftrain::bench::Classifier;

/// Times the steps after the warm-up, between two barriers, as the anchor does.
class Timer : public caftrain::Callback {
 public:
  explicit Timer(int64_t warmup) : warmup_(warmup) {}
  void on_train_batch_end(caftrain::Trainer& t, caftrain::LightningModule&, const at::Tensor&,
                          const caftrain::Batch&, int64_t) override {
    if (t.global_step() == warmup_) {
      t.strategy().barrier();
      start_ = std::chrono::steady_clock::now();
    }
  }
  void on_train_end(caftrain::Trainer& t, caftrain::LightningModule&) override {
    t.strategy().barrier();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  double seconds = 0;

 private:
  int64_t warmup_;
  std::chrono::steady_clock::time_point start_;
};

void train_func(const caftrain::Config& c) {
  auto model_kind = c.get<std::string>("model");
  auto data = caftrain::data::FashionMNIST::train();
  auto model = caftrain::with_seed(0, [&] { return std::make_shared<Classifier>(model_kind); });
  auto warmup = c.get<int64_t>("warmup");
  auto steps = c.get<int64_t>("steps");
  auto timer = std::make_shared<Timer>(warmup);
  caftrain::Trainer trainer({.max_steps = warmup + steps,
                             .strategy = caftrain::DDPStrategy(),
                             .plugins = {caftrain::ActorEnvironment()},
                             .callbacks = {timer},
                             .logger = false,
                             .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  auto& ctx = caftrain::train::get_context();
  // Random batches of the whole set on every rank, like the anchor's randint sampling.
  trainer.fit(model, data->loader({.batch_size = c.get<int64_t>("batch"),
                                   .shuffle = true,
                                   .seed = static_cast<uint64_t>(ctx.world_rank)}));
  auto samples = static_cast<double>(ctx.world_size * c.get<int64_t>("batch") * steps);
  caftrain::train::report({{"samples_per_s", samples / timer->seconds},
                           {"step_ms", 1e3 * timer->seconds / static_cast<double>(steps)}});
}

double run_ours(caf::actor_system& sys, const Flags& f, int64_t workers,
                const std::string& mode = "thread") {
  caftrain::TorchTrainerOptions o;
  o.train_loop_config = {{"model", f.model},  {"batch", f.batch}, {"steps", f.steps},
                         {"warmup", f.warmup}};
  o.torch_config.backend = mode == "process" && f.backend == "local" ? "gloo" : f.backend;
  o.scaling.num_workers = workers;
  o.scaling.worker_mode = mode;
  o.scaling.resources_per_worker.cpus = static_cast<double>(f.threads);
  o.run.storage_path = "/tmp/caftrain_bench";
  o.run.name = "ddp_" + f.model + "_" + std::to_string(::getpid()) + "_" +
               std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
  auto result = caftrain::TorchTrainer(sys, train_func, o).fit();
  if (caftrain::is_worker_process())
    return 0; // a worker process of a later run passes this one by
  if (!result.ok())
    throw std::runtime_error(result.error->message);
  return result.metrics.at("samples_per_s");
}

double run_anchor(const Flags& f) {
  auto cmd = "/usr/bin/python3 " + f.anchor + " --model " + f.model + " --workers " +
             std::to_string(f.workers) + " --threads " + std::to_string(f.threads) +
             " --batch " + std::to_string(f.batch) + " --steps " + std::to_string(f.steps) +
             " --warmup " + std::to_string(f.warmup) + " 2>/dev/null";
  auto out = caftrain::bench::capture(cmd);
  std::smatch m;
  if (!std::regex_search(out, m, std::regex("\"samples_per_s\": ([0-9.eE+-]+)")))
    throw std::runtime_error("the anchor printed no samples_per_s: " + out);
  return std::stod(m[1]);
}


Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--model")
      f.model = next();
    else if (a == "--workers")
      f.workers = std::stoll(next());
    else if (a == "--threads")
      f.threads = std::stoll(next());
    else if (a == "--batch")
      f.batch = std::stoll(next());
    else if (a == "--steps")
      f.steps = std::stoll(next());
    else if (a == "--warmup")
      f.warmup = std::stoll(next());
    else if (a == "--repeats")
      f.repeats = std::stoll(next());
    else if (a == "--anchor")
      f.anchor = next();
    else if (a == "--backend")
      f.backend = next();
    else if (a == "--scaling")
      f.scaling = true;
    else if (a == "--processes")
      f.processes = true;
    else if (a == "--in-wait")
      f.in_wait = true;
    else {
      std::cerr << "unknown flag " << a << "\n";
      std::exit(2);
    }
  }
  return f;
}

} // namespace

int main(int argc, char** argv) {
  auto f = parse(argc, argv);
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  std::vector<double> anchor, ours, single, processes, in_wait;
  for (int64_t r = 0; r < f.repeats; ++r) {
    // Worker processes run this program up to their run: they do not time the anchor.
    anchor.push_back(caftrain::is_worker_process() ? 0 : run_anchor(f));
    ours.push_back(run_ours(sys, f, f.workers));
    if (f.scaling)
      single.push_back(run_ours(sys, f, 1));
    if (f.processes)
      processes.push_back(run_ours(sys, f, f.workers, "process"));
    if (f.in_wait) {
      // The local backend without reduction on arrival: all the work in wait().
      ::setenv("CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL", "0", 1);
      in_wait.push_back(run_ours(sys, f, f.workers));
      ::unsetenv("CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL");
    }
    if (caftrain::is_worker_process())
      continue; // on its way to its own repeat
    if (f.processes) {
      std::printf("repeat %lld: caftrain worker processes %.1f samples/s\n",
                  static_cast<long long>(r), processes.back());
    }
    if (f.in_wait)
      std::printf("repeat %lld: caftrain reducing in wait() only %.1f samples/s\n",
                  static_cast<long long>(r), in_wait.back());
    std::printf("repeat %lld: anchor %.1f samples/s, caftrain %.1f samples/s%s\n",
                static_cast<long long>(r), anchor.back(), ours.back(),
                f.scaling ? (", caftrain 1 worker " + std::to_string(single.back())).c_str() : "");
  }
  std::printf("model=%s backend=%s workers=%lld threads/worker=%lld batch=%lld steps=%lld\n",
              f.model.c_str(), caftrain::resolve_backend([&] {
                caftrain::TorchTrainerOptions o;
                o.torch_config.backend = f.backend;
                return o;
              }()).c_str(),
              static_cast<long long>(f.workers), static_cast<long long>(f.threads),
              static_cast<long long>(f.batch), static_cast<long long>(f.steps));
  std::printf("median samples/s: anchor (PyTorch DDP) %.1f, caftrain %.1f\n", median(anchor),
              median(ours));
  std::printf("ratio caftrain/anchor: %.3f\n", median(ours) / median(anchor));
  if (f.processes)
    std::printf("median samples/s: worker processes %.1f; ratio processes/threads: %.3f, "
                "processes/anchor: %.3f\n",
                median(processes), median(processes) / median(ours),
                median(processes) / median(anchor));
  if (f.in_wait)
    std::printf("median samples/s: reducing in wait() only %.1f (ratio to anchor %.3f); ratio "
                "on arrival/in wait: %.3f\n",
                median(in_wait), median(in_wait) / median(anchor), median(ours) / median(in_wait));
  if (f.scaling)
    std::printf("scaling efficiency (%lld workers vs %lld x 1 worker): %.3f\n",
                static_cast<long long>(f.workers), static_cast<long long>(f.workers),
                median(ours) / (static_cast<double>(f.workers) * median(single)));
}
