// Checkpoint cost: the slowdown of training with checkpoints (target < 5%), and the write
// throughput of committing one against dd on the same disk.
//
//   build/bench/bench_checkpoint                                # ResNet18, batch 64
//   build/bench/bench_checkpoint --model mlp --batch 128 --every 5 --steps 40
//
// (a) After one untimed fit (a process's first is slower), fits --warmup + --steps steps
//     on 2 local workers with DDP, reporting every --every steps, three ways: reports without checkpoints (the baseline), reports with async
//     checkpoints (ReportOptions.async_checkpoint: written on a background thread while
//     training goes on), and with blocking checkpoints (Ray's default). The time of the
//     steps after the warm-up, until every checkpoint is durable, is taken on rank 0
//     between barriers; prints ms/step of each and the slowdowns against the baseline.
// (b) Commits checkpoints with CheckpointWriter whose files have the sizes of the model's
//     checkpoint from (a) (model.pt, optimizer.pt, ...), and runs
//     `dd if=/dev/zero of=<dir>/ddtest bs=1M count=<same MiB> conv=fsync` in the same
//     directory; prints MB/s of both and the ratio ours/dd (dd's own figure).
// (c) Times what one checkpoint of the model of (a) costs the training thread: serializing
//     it in memory (before snapshots) against taking the snapshot (copies into warm
//     buffers), and the background thread's serialization and write of the snapshot.
#include <torch/torch.h>

#include <unistd.h>

#include <caf/all.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "bench/bench_models.hpp"
#include "bench/bench_util.hpp"
#include "caftrain.hpp"

namespace {

using caftrain::bench::median;

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Flags {
  std::string model = "resnet18";
  int64_t workers = 2;
  int64_t batch = 64;
  int64_t warmup = 2;
  int64_t steps = 20;
  int64_t every = 10;
  int64_t repeats = 2;
  int64_t write_repeats = 3;
  std::string dir = "/tmp/caftrain_bench";
};

using caftrain::bench::Classifier;

/// Times the steps after the warm-up until the end of training, between barriers; the end
/// waits for background checkpoint reports, so async checkpoints are counted until durable.
class Timer : public caftrain::Callback {
 public:
  explicit Timer(int64_t warmup) : warmup_(warmup) {}
  void on_train_batch_end(caftrain::Trainer& t, caftrain::LightningModule&, const at::Tensor&,
                          const caftrain::Batch&, int64_t) override {
    if (t.global_step() == warmup_) {
      t.strategy().barrier();
      start_ = Clock::now();
    }
  }
  void on_train_end(caftrain::Trainer& t, caftrain::LightningModule&) override {
    caftrain::train::session().flush();
    t.strategy().barrier();
    seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  }
  double seconds = 0;

 private:
  int64_t warmup_;
  Clock::time_point start_;
};

/// Config: model, batch, warmup, steps, every, mode ("none", "async" or "sync").
void train_func(const caftrain::Config& c) {
  auto kind = c.get<std::string>("model");
  auto mode = c.get<std::string>("mode");
  auto data = caftrain::data::FashionMNIST::train();
  auto model = caftrain::with_seed(0, [&] { return std::make_shared<Classifier>(kind); });
  auto warmup = c.get<int64_t>("warmup");
  auto steps = c.get<int64_t>("steps");
  auto timer = std::make_shared<Timer>(warmup);
  caftrain::Trainer trainer({.max_steps = warmup + steps,
                             .strategy = caftrain::DDPStrategy(),
                             .plugins = {caftrain::ActorEnvironment()},
                             .callbacks = {timer,
                                           caftrain::ReportCallback({.every_n_epochs = 0,
                                                                     .every_n_steps = c.get<int64_t>("every"),
                                                                     .checkpoint = mode != "none",
                                                                     .async_checkpoint = mode == "async"})},
                             .logger = false,
                             .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  auto& ctx = caftrain::train::get_context();
  trainer.fit(model, data->loader({.batch_size = c.get<int64_t>("batch"),
                                   .shuffle = true,
                                   .seed = static_cast<uint64_t>(ctx.world_rank)}));
  caftrain::train::report({{"step_ms", 1e3 * timer->seconds / static_cast<double>(steps)}});
}

struct FitResult {
  double step_ms = 0;
  /// File sizes of the run's last checkpoint (empty without checkpoints).
  std::map<std::string, uint64_t> files;
};

FitResult run_fit(caf::actor_system& sys, const Flags& f, const std::string& mode, int64_t repeat) {
  caftrain::TorchTrainerOptions o;
  o.train_loop_config = {{"model", f.model}, {"batch", f.batch}, {"warmup", f.warmup},
                         {"steps", f.steps}, {"every", f.every}, {"mode", mode}};
  o.scaling.num_workers = f.workers;
  o.run.storage_path = f.dir;
  o.run.name = "checkpoint_" + mode + "_" + std::to_string(::getpid()) + "_" + std::to_string(repeat);
  auto result = caftrain::TorchTrainer(sys, train_func, o).fit();
  FitResult out;
  if (result.ok()) {
    out.step_ms = result.metrics.at("step_ms");
    if (result.checkpoint)
      for (auto& [name, digest] : result.checkpoint->metadata().files)
        out.files[name] = digest.size;
  }
  std::error_code ec;
  fs::remove_all(result.path, ec);
  if (!result.ok())
    throw std::runtime_error("the " + mode + " run failed: " + result.error->message);
  return out;
}

/// Seconds to commit a checkpoint of `files` (name -> bytes) under `dir`.
double commit_seconds(const std::map<std::string, std::vector<char>>& files, const std::string& dir,
                      int64_t repeat) {
  auto path = (fs::path(dir) / ("write_test_" + std::to_string(::getpid()) + "_" +
                                std::to_string(repeat)))
                .string();
  auto start = Clock::now();
  {
    caftrain::CheckpointWriter writer(path);
    for (auto& [name, bytes] : files)
      writer.add_file(name, bytes);
    writer.commit(caftrain::CheckpointMetadata{});
  }
  auto seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::error_code ec;
  fs::remove_all(path, ec);
  return seconds;
}

/// dd's own figure for writing `mib` MiB with a final fsync into `dir`, in seconds.
double dd_seconds(const std::string& dir, uint64_t mib) {
  auto target = (fs::path(dir) / "ddtest").string();
  auto cmd = "dd if=/dev/zero of=" + target + " bs=1M count=" + std::to_string(mib) +
             " conv=fsync 2>&1";
  auto out = caftrain::bench::capture(cmd);
  std::error_code ec;
  fs::remove(target, ec);
  std::smatch m;
  if (!std::regex_search(out, m, std::regex("copied, ([0-9.eE+-]+) s")))
    throw std::runtime_error("dd printed no time: " + out);
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
    else if (a == "--batch")
      f.batch = std::stoll(next());
    else if (a == "--warmup")
      f.warmup = std::stoll(next());
    else if (a == "--steps")
      f.steps = std::stoll(next());
    else if (a == "--every")
      f.every = std::stoll(next());
    else if (a == "--repeats")
      f.repeats = std::stoll(next());
    else if (a == "--write-repeats")
      f.write_repeats = std::stoll(next());
    else if (a == "--dir")
      f.dir = next();
    else {
      std::cerr << "unknown flag " << a << "\n"
                << "flags: --model resnet18|mlp --workers N --batch N --warmup N --steps N "
                   "--every N --repeats N --write-repeats N --dir DIR\n";
      std::exit(2);
    }
  }
  if (f.model != "resnet18" && f.model != "mlp") {
    std::cerr << "--model must be resnet18 or mlp\n";
    std::exit(2);
  }
  if (f.every < 1 || f.steps < f.every || f.repeats < 1 || f.write_repeats < 1) {
    std::cerr << "need --steps >= --every >= 1 and repeats >= 1\n";
    std::exit(2);
  }
  return f;
}

} // namespace

int main(int argc, char** argv) {
  auto f = parse(argc, argv);
  fs::create_directories(f.dir);
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};

  // -- (a) training with and without checkpoints ------------------------------------
  std::map<std::string, std::vector<double>> step_ms;
  std::map<std::string, uint64_t> sizes;
  const char* modes[] = {"none", "async", "sync"};
  {
    // The first fit of a process is slower (its first allocations, the data's first
    // decode): one of --every steps, not timed, so that it does not land on a mode.
    auto first = f;
    first.steps = f.every;
    run_fit(sys, first, "none", -1);
  }
  for (int64_t r = 0; r < f.repeats; ++r) {
    std::printf("repeat %lld:", static_cast<long long>(r));
    for (auto* mode : modes) {
      auto fit = run_fit(sys, f, mode, r);
      step_ms[mode].push_back(fit.step_ms);
      if (!fit.files.empty())
        sizes = fit.files;
      std::printf(" %s %.1f ms/step%s", mode, fit.step_ms, mode == modes[2] ? "\n" : ",");
      std::fflush(stdout);
    }
  }
  uint64_t total = 0;
  for (auto& [name, size] : sizes)
    total += size;
  auto none = median(step_ms["none"]);
  auto async = median(step_ms["async"]);
  auto sync = median(step_ms["sync"]);
  std::printf("model=%s workers=%lld batch=%lld steps=%lld (after %lld warm-up), a report every "
              "%lld steps, checkpoint %.1f MiB\n",
              f.model.c_str(), static_cast<long long>(f.workers), static_cast<long long>(f.batch),
              static_cast<long long>(f.steps), static_cast<long long>(f.warmup),
              static_cast<long long>(f.every), static_cast<double>(total) / (1 << 20));
  std::printf("median ms/step: no checkpoints %.1f, async checkpoints %.1f, blocking checkpoints "
              "%.1f\n",
              none, async, sync);
  std::printf("slowdown async checkpoints: %+.1f%% (target < 5%%)\n", 100 * (async / none - 1));
  std::printf("slowdown blocking checkpoints: %+.1f%%\n", 100 * (sync / none - 1));

  // -- (b) write throughput against dd --------------------------------------------------
  std::map<std::string, std::vector<char>> files;
  std::mt19937 gen(7);
  for (auto& [name, size] : sizes) {
    std::vector<char> bytes(size);
    for (auto& b : bytes)
      b = static_cast<char>(gen());
    files[name] = std::move(bytes);
  }
  auto mib = (total + (1 << 20) - 1) >> 20;
  std::vector<double> ours, dd;
  for (int64_t r = 0; r < f.write_repeats; ++r) {
    dd.push_back(static_cast<double>(mib << 20) / dd_seconds(f.dir, mib));
    ours.push_back(static_cast<double>(total) / commit_seconds(files, f.dir, r));
    std::printf("write %lld: CheckpointWriter %.1f MB/s, dd %.1f MB/s\n", static_cast<long long>(r),
                ours.back() / 1e6, dd.back() / 1e6);
  }
  std::printf("checkpoint of %zu files, %.1f MiB, into %s\n", files.size(),
              static_cast<double>(total) / (1 << 20), f.dir.c_str());
  std::printf("median MB/s: CheckpointWriter %.1f, dd conv=fsync %.1f\n", median(ours) / 1e6,
              median(dd) / 1e6);
  std::printf("ratio ours/dd: %.3f\n", median(ours) / median(dd));

  // -- (c) what one checkpoint costs the training thread ------------------------------
  // The model and Adam state of (a), after one step: serializing both in memory (what
  // the training thread did before snapshots) against the snapshot (copies into the warm
  // buffers of the previous one), and the snapshot's serialization and write as the
  // background thread does it (write_staged_files, fsynced).
  auto model = caftrain::with_seed(0, [&] { return std::make_shared<Classifier>(f.model); });
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  {
    auto batch = f.model == "resnet18" ? torch::randn({8, 1, 28, 28}) : torch::randn({8, 784});
    optimizer->zero_grad();
    auto out = model->resnet ? model->resnet->forward(batch) : model->mlp->forward(batch);
    out.sum().backward();
    optimizer->step();
  }
  std::vector<std::shared_ptr<torch::optim::Optimizer>> optimizers{optimizer};
  caftrain::TensorCopies copies;
  std::vector<double> serialize_ms, snapshot_ms, write_ms;
  for (int64_t r = 0; r <= f.write_repeats; ++r) { // the first snapshot warms the buffers
    auto start = Clock::now();
    auto model_bytes = caftrain::serialize_state_dict(caftrain::state_dict(*model));
    auto optimizer_bytes = caftrain::optimizers_bytes(optimizers);
    auto serialized = Clock::now();
    caftrain::CheckpointFiles snapshot;
    caftrain::StateDict copy;
    for (auto& item : caftrain::state_dict(*model))
      copy.insert(item.key(), copies.copy("model/" + item.key(), item.value()));
    snapshot["model.pt"] = caftrain::state_dict_source(std::move(copy));
    snapshot["optimizer.pt"] = caftrain::optimizers_source(optimizers, copies);
    auto snapped = Clock::now();
    auto dir = (fs::path(f.dir) / ("snapshot_" + std::to_string(::getpid()) + "_" + std::to_string(r))).string();
    fs::create_directories(dir);
    caftrain::write_staged_files(dir, snapshot, true);
    auto written = Clock::now();
    snapshot.clear();
    fs::remove_all(dir);
    if (r == 0)
      continue;
    auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
    serialize_ms.push_back(ms(start, serialized));
    snapshot_ms.push_back(ms(serialized, snapped));
    write_ms.push_back(ms(snapped, written));
    std::printf("snapshot %lld: serialize in memory %.1f ms, snapshot %.1f ms, serialize+write %.1f ms\n",
                static_cast<long long>(r), serialize_ms.back(), snapshot_ms.back(), write_ms.back());
  }
  std::printf("median training-thread ms per checkpoint: serialize in memory %.1f, snapshot %.1f "
              "(the background thread's serialize+write: %.1f)\n",
              median(serialize_ms), median(snapshot_ms), median(write_ms));
  std::printf("ratio snapshot/serialize: %.3f\n", median(snapshot_ms) / median(serialize_ms));
}
