// The seed's Tune search: an MLP classifier on Fashion-MNIST whose layer sizes, learning
// rate and batch size Tune samples, with ASHA stopping the poor trials early.
//
//   build/examples/tune_fashion_mnist                      # 8 trials of 1 worker each
//   build/examples/tune_fashion_mnist --workers 2          # distributed trials: DDP on 2 ranks
//   build/examples/tune_fashion_mnist --checkpoint         # TuneReportCheckpointCallback
//   build/examples/tune_fashion_mnist --num-samples 20 --epochs 4 --limit-train-batches -1
//   build/examples/tune_fashion_mnist --processes          # each rank its own process
//   build/examples/tune_fashion_mnist --address 127.0.0.1:6380  # trials on a cluster's nodes
//
// Every trial is a TorchTrainer run placed through the process's resource pool (one CPU
// per worker by default): on 2 cores, two 1-worker trials run at once. Prints the trial
// table as trials start, report and end, then the best config and where the results are.
#include <torch/torch.h>

#include <unistd.h>

#include <caf/all.hpp>

#include <cstdlib>
#include <iostream>
#include <string>

#include "caftrain.hpp"

namespace {

/// The seed's MNISTClassifier: 28*28 -> layer_1 -> layer_2 -> 10, ReLU, Adam(lr).
class MNISTClassifier : public caftrain::LightningModule {
 public:
  explicit MNISTClassifier(const caftrain::Config& config) : lr(config.get<double>("lr")) {
    auto l1 = config.get<int64_t>("layer_1");
    auto l2 = config.get<int64_t>("layer_2");
    layer_1 = register_module("layer_1", torch::nn::Linear(28 * 28, l1));
    layer_2 = register_module("layer_2", torch::nn::Linear(l1, l2));
    layer_3 = register_module("layer_3", torch::nn::Linear(l2, 10));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x.view({x.size(0), -1});
    h = torch::relu(layer_1->forward(h));
    h = torch::relu(layer_2->forward(h));
    return layer_3->forward(h);
  }

  torch::Tensor training_step(const caftrain::Batch& batch, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(forward(batch.data), batch.target);
    log("ptl/train_loss", loss);
    return loss;
  }

  void validation_step(const caftrain::Batch& batch, int64_t) override {
    auto logits = forward(batch.data);
    log("ptl/val_loss", torch::nn::functional::cross_entropy(logits, batch.target), {.sync_dist = true});
    log("ptl/val_accuracy", logits.argmax(1).eq(batch.target).to(torch::kFloat).mean(),
        {.sync_dist = true});
  }

  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(lr));
  }

  double lr;
  torch::nn::Linear layer_1{nullptr}, layer_2{nullptr}, layer_3{nullptr};
};

struct Flags {
  int64_t num_samples = 8;
  int64_t epochs = 2;
  int64_t limit_train_batches = 60;
  int64_t limit_val_batches = 10;
  int64_t workers = 1;
  bool checkpoint = false;
  std::string data = caftrain::data::FashionMNIST::default_root;
  std::string output = "runs/tune_fashion_mnist";
  bool processes = false;
  // A job of `caftrain submit` finds its cluster in $CAFTRAIN_ADDRESS.
  std::string address = caftrain::default_address();
  std::string token_file;
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "tune_fashion_mnist: " << problem << "\n"
            << "flags: --num-samples N  --epochs N  --limit-train-batches N (-1: all)\n"
            << "       --limit-val-batches N (-1: all)  --workers N (ranks per trial)\n"
            << "       --checkpoint (TuneReportCheckpointCallback)  --data DIR  --output DIR\n"
            << "       --processes (each rank of a trial its own process of this program)\n"
            << "       --address HOST:PORT (trials on the nodes of the cluster whose head is there;\n"
            << "                            default $CAFTRAIN_ADDRESS)  --token-file F\n";
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
    if (a == "--num-samples")
      f.num_samples = number();
    else if (a == "--epochs")
      f.epochs = number();
    else if (a == "--limit-train-batches")
      f.limit_train_batches = number();
    else if (a == "--limit-val-batches")
      f.limit_val_batches = number();
    else if (a == "--workers")
      f.workers = number();
    else if (a == "--checkpoint")
      f.checkpoint = true;
    else if (a == "--data")
      f.data = value();
    else if (a == "--output")
      f.output = value();
    else if (a == "--processes")
      f.processes = true;
    else if (a == "--address")
      f.address = value();
    else if (a == "--token-file")
      f.token_file = value();
    else
      usage("unknown flag " + a);
  }
  if (f.workers < 1)
    usage("--workers must be at least 1");
  return f;
}

caftrain::BatchLimit limit(int64_t n) {
  return n < 0 ? caftrain::BatchLimit(1.0) : caftrain::BatchLimit(n);
}

/// The seed's train_mnist(config): runs on every rank of a trial.
void train_mnist(const caftrain::Config& config) {
  auto root = config.get<std::string>("data");
  auto train = caftrain::data::FashionMNIST::train(root);
  auto val = caftrain::data::FashionMNIST::test(root);
  auto model = caftrain::with_seed(0, [&] { return std::make_shared<MNISTClassifier>(config); });
  std::map<std::string, std::string> metrics{{"loss", "ptl/val_loss"}, {"acc", "ptl/val_accuracy"}};
  caftrain::Handle<caftrain::Callback> report =
    config.get<bool>("checkpoint")
      ? caftrain::Handle<caftrain::Callback>(caftrain::TuneReportCheckpointCallback(metrics, "validation_end"))
      : caftrain::Handle<caftrain::Callback>(caftrain::TuneReportCallback(metrics, "validation_end"));
  caftrain::Trainer trainer({.max_epochs = config.get<int64_t>("epochs"),
                             .plugins = {caftrain::ActorEnvironment()},
                             .callbacks = {report},
                             .logger = false,
                             .limit_train_batches = limit(config.get<int64_t>("limit_train_batches")),
                             .limit_val_batches = limit(config.get<int64_t>("limit_val_batches")),
                             .enable_progress_bar = false});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  // A paused or restarted trial continues from its latest checkpoint.
  auto checkpoint = caftrain::train::get_checkpoint();
  trainer.fit(model,
              train->loader({.batch_size = config.get<int64_t>("batch_size"), .shuffle = true}),
              val->loader({.batch_size = 256}), checkpoint ? checkpoint->path() : "");
}

} // namespace

int main(int argc, char** argv) {
  auto flags = parse(argc, argv);
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  namespace tune = caftrain::tune;
  try {
    // On a cluster every trial's ranks are processes on its nodes (as `ray.init(address=...)`).
    if (!flags.address.empty())
      caftrain::connect(sys, flags.address, {.token_file = flags.token_file});
    auto processes = flags.processes || !flags.address.empty();
    tune::TunerOptions options;
    options.param_space = {
      {"layer_1", tune::choice({32, 64, 128})},
      {"layer_2", tune::choice({64, 128, 256})},
      {"lr", tune::loguniform(1e-4, 1e-1)},
      {"batch_size", tune::choice({32, 64, 128})},
      // Constants reach every trial's config too.
      {"data", flags.data},
      {"epochs", flags.epochs},
      {"limit_train_batches", flags.limit_train_batches},
      {"limit_val_batches", flags.limit_val_batches},
      {"checkpoint", flags.checkpoint},
    };
    options.tune_config = {
      .metric = "loss",
      .mode = "min",
      .num_samples = flags.num_samples,
      .scheduler = std::make_shared<tune::ASHAScheduler>(tune::AsyncHyperBandOptions{
        .max_t = static_cast<double>(flags.epochs), .grace_period = 1, .reduction_factor = 2}),
    };
    options.run_config = {.name = "tune_mnist", .storage_path = flags.output};
    options.scaling = {.num_workers = flags.workers, .worker_mode = processes ? "process" : "thread"};
    options.torch_config = {.backend = flags.workers > 1 ? "gloo" : "auto"};
    // A new experiment directory per invocation: an old one is kept as it is.
    options.run_config.name += "_" + std::to_string(::getpid());
    tune::Tuner tuner(sys, train_mnist, options);
    auto results = tuner.fit();
    if (results.error()) {
      std::cerr << "tune_fashion_mnist: " << results.error()->message << std::endl;
      return 1;
    }
    auto& best = results.get_best_result();
    std::cout << "Best hyperparameters found were: " << best.config.to_string() << "\n"
              << "  loss " << best.metrics.at("loss") << ", acc " << best.metrics.at("acc")
              << " after " << best.metrics.at("training_iteration") << " epoch(s) (trial "
              << best.trial_id << ")\n"
              << "trials: " << results.size() << " (" << results.num_terminated()
              << " terminated, " << results.num_errors() << " errors)\n"
              << "results: " << results.experiment_path() << "/results.csv" << std::endl;
    return results.num_errors() == results.size() ? 1 : 0;
  } catch (const caftrain::Error& e) {
    std::cerr << "tune_fashion_mnist: " << e.what() << std::endl;
    return 1;
  }
}
