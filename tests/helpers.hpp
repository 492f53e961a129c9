// Shared fixtures of the tests: temporary directories, small models and data sets.
#pragma once

#include <torch/torch.h>

#include <caf/all.hpp>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "caftrain.hpp"

namespace caftrain::test {

/// A fresh directory under /tmp, removed with everything in it when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const noexcept {
    return path_;
  }

  std::string operator/(const std::string& name) const {
    return (std::filesystem::path(path_) / name).string();
  }

 private:
  std::string path_;
};

/// Trainer options for quiet tests: no progress bar, no sanity check, no logger, root
/// under `dir`.
TrainerOptions quiet_options(const TempDir& dir);

/// Regression data y = x·w + b + noise: `n` examples of `features` inputs, seeded.
std::shared_ptr<data::TensorDataset> regression_data(int64_t n, int64_t features = 4,
                                                     uint64_t seed = 0);

/// A linear model with MSE loss and SGD, which logs "train_loss" (on_step and on_epoch)
/// and, in validation, "val_loss".
class LinearModule : public LightningModule {
 public:
  explicit LinearModule(int64_t features = 4, double lr = 0.05, bool with_validation = true);

  at::Tensor training_step(const Batch& batch, int64_t batch_idx) override;
  void validation_step(const Batch& batch, int64_t batch_idx) override;
  Optimizers configure_optimizers() override;

  torch::nn::Linear linear{nullptr};
  double lr;
  bool with_validation;
  int64_t validation_batches = 0;
};

/// Counts every hook a Trainer calls.
class CountingCallback : public Callback {
 public:
  void on_fit_start(Trainer&, LightningModule&) override { ++fit_start; }
  void on_fit_end(Trainer&, LightningModule&) override { ++fit_end; }
  void on_train_epoch_start(Trainer&, LightningModule&) override { ++epoch_start; }
  void on_train_epoch_end(Trainer&, LightningModule&) override { ++epoch_end; }
  void on_train_batch_end(Trainer&, LightningModule&, const at::Tensor&, const Batch&,
                          int64_t) override {
    ++batch_end;
  }
  void on_validation_end(Trainer& t, LightningModule&) override {
    if (t.sanity_checking())
      ++sanity_runs;
    else
      ++validation_runs;
  }
  void on_exception(Trainer&, LightningModule&, const std::exception&) override { ++exceptions; }

  int fit_start = 0, fit_end = 0, epoch_start = 0, epoch_end = 0, batch_end = 0;
  int validation_runs = 0, sanity_runs = 0, exceptions = 0;
};

/// An 8 -> 16 -> 3 classifier with cross-entropy and Adam(1e-2), which logs "loss": the
/// model of the worker-process and cluster tests.
class Classifier : public LightningModule {
 public:
  Classifier();
  at::Tensor training_step(const Batch& batch, int64_t batch_idx) override;
  Optimizers configure_optimizers() override;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

/// True while process `pid` runs (a zombie, dead and waiting to be reaped by whoever
/// inherited it, does not count).
bool process_exists(const std::string& pid);

/// Largest absolute difference between two modules' parameters (same architecture).
double max_param_diff(const torch::nn::Module& a, const torch::nn::Module& b);

/// Path of Debian's Python with torch, or "" when it is not installed.
std::string python_with_torch();

/// Runs `script` with Python; returns its exit code and fills `output` with stdout.
int run_python(const std::string& script, std::string& output);

/// Checks (with Catch) that the latest checkpoints of two runs hold the same model
/// weights, to 1e-6: a disturbed run ended as the undisturbed one did.
void check_same_weights(const Result& a, const Result& b);

/// An actor system with caftrain's message types registered (`caftrain::init`).
struct ActorSystem {
  ActorSystem() : sys(init_cfg(cfg)) {}
  static caf::actor_system_config& init_cfg(caf::actor_system_config& cfg) {
    init(cfg);
    return cfg;
  }
  caf::actor_system_config cfg;
  caf::actor_system sys;
};

/// Runs `fn(rank)` for every rank on its own thread and rethrows the first rank's
/// exception once all have ended (Catch's assertions are not thread-safe: ranks only
/// compute, the test thread checks).
inline void run_ranks(int size, const std::function<void(int)>& fn) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < size; ++rank)
    threads.emplace_back([&, rank] {
      try {
        fn(rank);
      } catch (...) {
        errors[static_cast<size_t>(rank)] = std::current_exception();
      }
    });
  for (auto& thread : threads)
    thread.join();
  for (auto& error : errors)
    if (error)
      std::rethrow_exception(error);
}

/// Runs `fn(rank, communicator)` on `world` threads joined by gloo over loopback (one
/// intra-op thread each, 20 s collective timeout); rethrows the first failure.
template <class F>
void run_gloo_ranks(int world, F fn) {
  auto store = std::make_shared<InMemoryStore>();
  run_ranks(world, [&](int r) {
    torch::set_num_threads(1);
    auto comm = GlooCommunicator::create(std::make_shared<PrefixStore>("test", store), r, world,
                                         {.timeout = std::chrono::seconds(20)});
    fn(r, comm);
  });
}

} // namespace caftrain::test
