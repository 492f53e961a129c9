// Fault tolerance: a run that loses a worker mid-training ends exactly as if it had not.
//
//   build/examples/fault_tolerance                     # rank 1 throws after step 12 of 20
//   build/examples/fault_tolerance --fail-rank 0 --fail-step 3 --checkpoint-every 2
//   build/examples/fault_tolerance --strategy fsdp       # sharded checkpoints, same story
//
// Trains a small MLP on Fashion-MNIST with DDP on 2 local workers, twice in this process:
// undisturbed, then with an exception thrown by one rank at one step of the first attempt
// (FailureConfig.max_failures = 1). Every step is reported; every few reports carry a
// checkpoint. The failed group is stopped and a new attempt resumes from the latest
// checkpoint, redoing the reports made after it. Takes a few seconds; prints
//
//   undisturbed:  1 attempt(s), final metrics: epoch = 0, loss = 0.774068, step = 20
//     attempt 0 reported 0-19
//   [...] [warning] caftrain: run with_failure_... attempt 0: rank 1: injected failure ...
//   with failure: 2 attempt(s), final metrics: epoch = 0, loss = 0.774068, step = 20
//     attempt 0 reported 0-11, kept 0-9
//     attempt 1 reported 10-19, kept 10-19
//     failure: rank 1: injected failure before step 13 (attempt 0) -> restarted as attempt 1
//   final weights identical: yes (largest difference 0)
//   runs: runs/fault_tolerance/undisturbed_<pid>_<time>
//         runs/fault_tolerance/with_failure_<pid>_<time>
//
// and exits 1 when the two runs end differently.
#include <torch/torch.h>

#include <unistd.h>

#include <caf/all.hpp>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "caftrain.hpp"

namespace {

/// A small MLP (784 -> 128 -> 10) with Adam.
class Classifier : public caftrain::LightningModule {
 public:
  Classifier() {
    model = register_module("model", caftrain::models::MLP(784, 128, 10));
  }

  torch::Tensor training_step(const caftrain::Batch& batch, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(model->forward(batch.data), batch.target);
    log("loss", loss);
    return loss;
  }

  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-3));
  }

  caftrain::models::MLP model{nullptr};
};

/// Throws on rank `rank` before the batch of step `step` + 1 (after `step` optimizer
/// steps), on the first attempt only: the restarted attempt passes the same point.
class FailureInjector : public caftrain::Callback {
 public:
  FailureInjector(int64_t rank, int64_t step) : rank_(rank), step_(step) {}

  void on_train_batch_start(caftrain::Trainer& trainer, caftrain::LightningModule&,
                            const caftrain::Batch&, int64_t) override {
    auto& ctx = caftrain::train::get_context();
    if (ctx.attempt == 0 && ctx.world_rank == rank_ && trainer.global_step() == step_)
      throw std::runtime_error("injected failure before step " + std::to_string(step_ + 1) +
                               " (attempt 0)");
  }

 private:
  int64_t rank_;
  int64_t step_;
};

/// Runs on every worker, on every attempt.
void train_func(const caftrain::Config& config) {
  auto data = caftrain::data::FashionMNIST::train();
  auto model = caftrain::with_seed(0, [] { return std::make_shared<Classifier>(); });
  caftrain::Trainer trainer(
    {.max_steps = config.get<int64_t>("steps"),
     .strategy = config.get<std::string>("strategy"), // "ddp", "zero_stage_2", "fsdp", ...
     .plugins = {caftrain::ActorEnvironment()},
     .callbacks = {FailureInjector(config.get<int64_t>("fail_rank"), config.get<int64_t>("fail_step")),
                   caftrain::ReportCallback({.every_n_epochs = 0,
                                             .every_n_steps = 1,
                                             .checkpoint_every = config.get<int64_t>("checkpoint_every")})},
     .logger = false,
     .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  // After a restart: the latest checkpoint, from which fit resumes model, optimizer, step
  // and data order.
  auto checkpoint = caftrain::train::get_checkpoint();
  trainer.fit(model, data->loader({.batch_size = 64, .shuffle = true}), std::nullopt,
              checkpoint ? checkpoint->path() : "");
}

/// Watches a run: every report as it completes (also those a restart redoes) and failures.
class Observer : public caftrain::RunCallback {
 public:
  void on_report(const caftrain::ReportRecord& record) override {
    std::lock_guard<std::mutex> guard(mtx_);
    reported[record.attempt].push_back(record.index);
  }

  void on_failure(const std::string& error, int64_t next_attempt, bool restarting) override {
    std::lock_guard<std::mutex> guard(mtx_);
    failures.push_back(error + (restarting ? " -> restarted as attempt " + std::to_string(next_attempt)
                                           : " -> the run ends"));
  }

  /// Report indices by the attempt that made them.
  std::map<int64_t, std::vector<int64_t>> reported;
  std::vector<std::string> failures;

 private:
  std::mutex mtx_;
};

struct Flags {
  int64_t fail_rank = 1;
  int64_t fail_step = 12;
  int64_t steps = 20;
  int64_t checkpoint_every = 5;
  int64_t workers = 2;
  std::string output = "runs/fault_tolerance";
  std::string strategy = "ddp";
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "fault_tolerance: " << problem << "\n"
            << "flags: --fail-rank N (default 1)  --fail-step N (default 12: after 12 steps)\n"
            << "       --steps N (default 20)  --checkpoint-every N reports (default 5)\n"
            << "       --workers N (default 2)  --output DIR (default runs/fault_tolerance)\n"
            << "       --strategy NAME (default ddp; zero_stage_1, zero_stage_2, fsdp)\n";
  std::exit(2);
}

Flags parse(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc)
        usage(a + " needs a value");
      return argv[++i];
    };
    auto number = [&]() -> int64_t {
      auto v = value();
      try {
        return std::stoll(v);
      } catch (...) {
        usage(a + " needs a number, got '" + v + "'");
      }
    };
    if (a == "--fail-rank")
      f.fail_rank = number();
    else if (a == "--fail-step")
      f.fail_step = number();
    else if (a == "--steps")
      f.steps = number();
    else if (a == "--checkpoint-every")
      f.checkpoint_every = number();
    else if (a == "--workers")
      f.workers = number();
    else if (a == "--output")
      f.output = value();
    else if (a == "--strategy")
      f.strategy = value();
    else
      usage("unknown flag " + a);
  }
  if (f.workers < 1)
    usage("--workers must be at least 1");
  if (f.steps < 1)
    usage("--steps must be at least 1");
  if (f.checkpoint_every < 1)
    usage("--checkpoint-every must be at least 1");
  if (f.fail_rank < 0 || f.fail_rank >= f.workers)
    usage("--fail-rank must be a rank in [0, " + std::to_string(f.workers) + ")");
  if (f.fail_step < 0 || f.fail_step >= f.steps)
    usage("--fail-step must be in [0, " + std::to_string(f.steps) + ") to fail during the run");
  return f;
}

/// "0-9, 12" for {0, 1, ..., 9, 12}.
std::string ranges(const std::vector<int64_t>& indices) {
  std::string out;
  for (size_t i = 0; i < indices.size();) {
    size_t j = i;
    while (j + 1 < indices.size() && indices[j + 1] == indices[j] + 1)
      ++j;
    out += (out.empty() ? "" : ", ") + std::to_string(indices[i]) +
           (j > i ? "-" + std::to_string(indices[j]) : "");
    i = j + 1;
  }
  return out.empty() ? "nothing" : out;
}

struct Run {
  caftrain::Result result;
  std::shared_ptr<Observer> observer;
};

Run run(caf::actor_system& sys, const Flags& f, const std::string& label, bool inject) {
  auto observer = std::make_shared<Observer>();
  auto stamp = std::to_string(::getpid()) + "_" +
               std::to_string(std::chrono::system_clock::now().time_since_epoch().count());
  caftrain::TorchTrainer trainer(
    sys, train_func,
    {.train_loop_config = {{"steps", f.steps},
                           {"strategy", f.strategy},
                           {"checkpoint_every", f.checkpoint_every},
                           {"fail_rank", inject ? f.fail_rank : int64_t{-1}},
                           {"fail_step", inject ? f.fail_step : int64_t{-1}}},
     .scaling = {.num_workers = f.workers},
     .run = {.name = label + "_" + stamp,
             .storage_path = f.output,
             .failure = {.max_failures = inject ? 1 : 0},
             .callbacks = {observer}}});
  return {trainer.fit(), observer};
}

void print(const std::string& label, const Run& r) {
  auto& result = r.result;
  std::cout << label << result.attempts << " attempt(s), final metrics:";
  std::string sep = " ";
  for (auto& [name, value] : result.metrics) {
    std::cout << sep << name << " = " << value;
    sep = ", ";
  }
  std::cout << "\n";
  std::map<int64_t, std::vector<int64_t>> kept;
  for (auto& rec : result.metrics_history)
    kept[rec.attempt].push_back(rec.index);
  for (int64_t attempt = 0; attempt < result.attempts; ++attempt) {
    std::cout << "  attempt " << attempt << " reported " << ranges(r.observer->reported[attempt]);
    if (result.attempts > 1)
      std::cout << ", kept " << ranges(kept[attempt]);
    std::cout << "\n";
  }
  for (auto& failure : r.observer->failures)
    std::cout << "  failure: " << failure << "\n";
  if (result.error)
    std::cout << "  the run failed: " << result.error->message << "\n";
}

/// The largest absolute difference between the final weights of two runs; -1 when their
/// tensors do not even match by name and shape.
double weight_difference(const caftrain::Result& a, const caftrain::Result& b) {
  if (!a.checkpoint || !b.checkpoint)
    return -1;
  auto wa = a.checkpoint->model_state_dict();
  auto wb = b.checkpoint->model_state_dict();
  if (wa.size() != wb.size())
    return -1;
  double largest = 0;
  for (auto& item : wa) {
    auto other = wb.find(item.key());
    if (!other || !other->sizes().equals(item.value().sizes()))
      return -1;
    largest = std::max(largest, (item.value() - *other).abs().max().item<double>());
  }
  return largest;
}

} // namespace

int main(int argc, char** argv) {
  auto flags = parse(argc, argv);
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  try {
    auto clean = run(sys, flags, "undisturbed", false);
    print("undisturbed:  ", clean);
    auto faulty = run(sys, flags, "with_failure", true);
    print("with failure: ", faulty);
    if (!clean.result.ok() || !faulty.result.ok())
      return 1;
    auto diff = weight_difference(clean.result, faulty.result);
    bool same = diff == 0 && clean.result.metrics == faulty.result.metrics;
    std::cout << "final weights identical: " << (diff == 0 ? "yes" : "no");
    if (diff >= 0)
      std::cout << " (largest difference " << diff << ")";
    std::cout << "\nruns: " << clean.result.path << "\n      " << faulty.result.path << std::endl;
    return same ? 0 : 1;
  } catch (const caftrain::Error& e) {
    std::cerr << "fault_tolerance: " << e.what() << std::endl;
    return 1;
  }
}
