// The seed: Fashion-MNIST with ResNet18, in one process or on N workers of a TorchTrainer.
//
//   build/examples/fashion_mnist --workers 2        # DDP on 2 local workers (the seed's Ray tab)
//   build/examples/fashion_mnist                    # one process, no actors (the Lightning tab)
//   build/examples/fashion_mnist --workers 2 --full # the seed's run: 10 epochs, every batch
//   build/examples/fashion_mnist --workers 2 --strategy fsdp   # RayFSDPStrategy's counterpart
//   build/examples/fashion_mnist --workers 2 --strategy zero_stage_2 # RayDeepSpeedStrategy's
//   build/examples/fashion_mnist --workers 1 --gpu  # on a CUDA GPU over NCCL (GPU builds)
//   build/examples/fashion_mnist --workers 2 --processes # each worker its own process (gloo)
//   build/examples/fashion_mnist --workers 2 --address 127.0.0.1:6380 # on a cluster's nodes
//       (after `caftrain head --port 6380` and `caftrain node --head 127.0.0.1:6380`)
//
// By default 1 epoch of 100 batches (per worker) and 20 validation batches, which take a
// few minutes on 2 cores. Prints the progress bar of rank 0, the reported metrics, and at
// the end `test accuracy: 0.8xxx` on the whole test set and where the weights were saved
// (resnet18.pt, which Python loads into torchvision's resnet18 with the seed's conv1).
#include <torch/torch.h>

#include <unistd.h>

#include <caf/all.hpp>

#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

#include "caftrain.hpp"

namespace {

/// The seed's ImageClassifier: ResNet18 with a 1-channel 7x7 stride-2 conv1, Adam(1e-3).
class ImageClassifier : public caftrain::LightningModule {
 public:
  ImageClassifier() {
    model = register_module("model", caftrain::models::ResNet18());
  }

  torch::Tensor forward(const torch::Tensor& x) {
    return model->forward(x);
  }

  torch::Tensor training_step(const caftrain::Batch& batch, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(forward(batch.data), batch.target);
    log("loss", loss, {.prog_bar = true, .on_step = true});
    return loss;
  }

  void validation_step(const caftrain::Batch& batch, int64_t) override {
    auto logits = forward(batch.data);
    auto loss = torch::nn::functional::cross_entropy(logits, batch.target);
    log("val_loss", loss, {.prog_bar = true, .sync_dist = true});
    log("val_accuracy", accuracy(logits, batch.target), {.prog_bar = true, .sync_dist = true});
  }

  void test_step(const caftrain::Batch& batch, int64_t) override {
    auto logits = forward(batch.data);
    log("test_loss", torch::nn::functional::cross_entropy(logits, batch.target));
    log("test_accuracy", accuracy(logits, batch.target));
  }

  caftrain::Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  }

  caftrain::models::ResNet18 model{nullptr};

 private:
  static torch::Tensor accuracy(const torch::Tensor& logits, const torch::Tensor& target) {
    return logits.argmax(1).eq(target).to(torch::kFloat).mean();
  }
};

struct Flags {
  int64_t workers = 0;
  int64_t epochs = 1;
  int64_t limit_train_batches = 100;
  int64_t limit_val_batches = 20;
  int64_t batch_size = 128;
  int64_t threads = 0;
  bool full = false;
  std::string data = caftrain::data::FashionMNIST::default_root;
  std::string output = "runs/fashion_mnist";
  std::string strategy = "ddp";
  bool gpu = false;
  bool processes = false;
  // A job of `caftrain submit` finds its cluster in $CAFTRAIN_ADDRESS.
  std::string address = caftrain::default_address();
  std::string token_file;
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "fashion_mnist: " << problem << "\n"
            << "flags: --workers N (0: this process, no actors)  --epochs N\n"
            << "       --limit-train-batches N  --limit-val-batches N  --batch-size N\n"
            << "       --threads N (default: all cores)  --full  --data DIR  --output DIR\n"
            << "       --strategy ddp|zero_stage_1|zero_stage_2|fsdp (with --workers; default ddp)\n"
            << "       --gpu (workers on CUDA GPUs, NCCL; with --workers)\n"
            << "       --processes (each worker its own process of this program; with --workers)\n"
            << "       --address HOST:PORT (workers on the nodes of the cluster whose head is there;\n"
            << "         default $CAFTRAIN_ADDRESS, which `caftrain submit` sets)\n"
            << "       --token-file F (the cluster's token; default ~/.caftrain/cluster_token)\n";
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
    if (a == "--workers")
      f.workers = number();
    else if (a == "--epochs")
      f.epochs = number();
    else if (a == "--limit-train-batches")
      f.limit_train_batches = number();
    else if (a == "--limit-val-batches")
      f.limit_val_batches = number();
    else if (a == "--batch-size")
      f.batch_size = number();
    else if (a == "--threads")
      f.threads = number();
    else if (a == "--full")
      f.full = true;
    else if (a == "--data")
      f.data = value();
    else if (a == "--output")
      f.output = value();
    else if (a == "--strategy")
      f.strategy = value();
    else if (a == "--gpu")
      f.gpu = true;
    else if (a == "--processes")
      f.processes = true;
    else if (a == "--address")
      f.address = value();
    else if (a == "--token-file")
      f.token_file = value();
    else
      usage("unknown flag " + a);
  }
  if (f.full) {
    f.epochs = 10;
    f.limit_train_batches = -1;
    f.limit_val_batches = -1;
  }
  return f;
}

caftrain::BatchLimit limit(int64_t n) {
  return n < 0 ? caftrain::BatchLimit(1.0) : caftrain::BatchLimit(n);
}

/// Evaluates `model` on the test set in this process and saves torchvision-named weights.
int finish(const std::shared_ptr<ImageClassifier>& model, const Flags& flags) {
  caftrain::Trainer tester({.logger = false, .enable_progress_bar = false});
  auto test = caftrain::data::FashionMNIST::test(flags.data);
  auto results = tester.test(model, test->loader({.batch_size = 256}));
  auto weights = flags.output + "/resnet18.pt";
  caftrain::save_state_dict(caftrain::state_dict(*model->model), weights);
  std::cout << "test accuracy: " << results.front().at("test_accuracy") << "\n"
            << "test loss: " << results.front().at("test_loss") << "\n"
            << "weights: " << weights << std::endl;
  return 0;
}

/// The seed without Ray: one process, the Lightning-style loop.
int run_local(const Flags& flags) {
  auto train = caftrain::data::FashionMNIST::train(flags.data);
  auto val = caftrain::data::FashionMNIST::test(flags.data);
  auto model = caftrain::with_seed(0, [] { return std::make_shared<ImageClassifier>(); });
  caftrain::Trainer trainer({.max_epochs = flags.epochs,
                             .limit_train_batches = limit(flags.limit_train_batches),
                             .limit_val_batches = limit(flags.limit_val_batches),
                             .default_root_dir = flags.output});
  trainer.fit(model, train->loader({.batch_size = flags.batch_size, .shuffle = true}),
              val->loader({.batch_size = 256}));
  std::cout << "metrics: " << trainer.log_dir() << "/metrics.csv" << std::endl;
  return finish(model, flags);
}

/// The seed's "Ray Train" tab: train_func runs on every worker of a TorchTrainer.
void train_func(const caftrain::Config& config) {
  auto root = config.get<std::string>("data");
  auto train = caftrain::data::FashionMNIST::train(root);
  auto val = caftrain::data::FashionMNIST::test(root);
  auto model = caftrain::with_seed(0, [] { return std::make_shared<ImageClassifier>(); });
  caftrain::Trainer trainer({.max_epochs = config.get<int64_t>("epochs"),
                             .devices = "auto",
                             .accelerator = "auto",
                             .strategy = config.get<std::string>("strategy"),
                             .plugins = {caftrain::ActorEnvironment()},
                             .callbacks = {caftrain::ReportCallback()},
                             .limit_train_batches = limit(config.get<int64_t>("limit_train_batches")),
                             .limit_val_batches = limit(config.get<int64_t>("limit_val_batches")),
                             .enable_progress_bar = caftrain::train::get_context().world_rank == 0,
                             .default_root_dir = config.get<std::string>("output")});
  trainer = caftrain::prepare_trainer(std::move(trainer));
  // Resume from the run's latest checkpoint after a restart.
  auto checkpoint = caftrain::train::get_checkpoint();
  trainer.fit(model,
              train->loader({.batch_size = config.get<int64_t>("batch_size"), .shuffle = true}),
              val->loader({.batch_size = 256}), checkpoint ? checkpoint->path() : "");
}

int run_distributed(const Flags& flags) {
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  // On a cluster every worker is a process on one of its nodes (as `ray.init(address=...)`).
  if (!flags.address.empty())
    caftrain::connect(sys, flags.address, {.token_file = flags.token_file});
  auto processes = flags.processes || !flags.address.empty();
  caftrain::TorchTrainer trainer(
    sys, train_func,
    {.train_loop_config = {{"data", flags.data},
                           {"epochs", flags.epochs},
                           {"limit_train_batches", flags.limit_train_batches},
                           {"limit_val_batches", flags.limit_val_batches},
                           {"batch_size", flags.batch_size},
                           {"output", flags.output},
                           {"strategy", flags.strategy}},
     .scaling = {.num_workers = flags.workers,
                 .use_gpu = flags.gpu,
                 .worker_mode = processes ? "process" : "thread"},
     .run = {.name = "fashion_mnist_" + std::to_string(::getpid()),
             .storage_path = flags.output,
             .failure = {.max_failures = 3},
             .checkpoint = {.num_to_keep = 3,
                            .checkpoint_score_attribute = "val_accuracy",
                            .checkpoint_score_order = "max"}}});
  auto result = trainer.fit();
  if (!result.ok()) {
    std::cerr << "fashion_mnist: the run failed: " << result.error->message << std::endl;
    return 1;
  }
  std::cout << "run: " << result.path << " (" << result.metrics_history.size() << " reports, "
            << result.attempts << " attempt(s))\n";
  for (auto& [name, value] : result.metrics)
    std::cout << "  " << name << " = " << value << "\n";
  std::cout << "checkpoint: " << result.checkpoint->path() << std::endl;
  auto model = std::make_shared<ImageClassifier>();
  caftrain::load_state_dict(*model, result.checkpoint->model_state_dict());
  return finish(model, flags);
}

} // namespace

int main(int argc, char** argv) {
  auto flags = parse(argc, argv);
  if (flags.workers < 0)
    usage("--workers must be 0 (this process) or more");
  if (flags.workers == 0 && (flags.strategy != "ddp" || flags.gpu || flags.processes || !flags.address.empty()))
    usage("--strategy, --gpu, --processes and --address choose how workers train; add --workers N");
  // libtorch may default to fewer threads than cores; use them all unless told otherwise.
  // (Workers of a TorchTrainer set their own share: cores / workers.)
  torch::set_num_threads(flags.threads > 0 ? static_cast<int>(flags.threads)
                                           : static_cast<int>(std::thread::hardware_concurrency()));
  try {
    return flags.workers == 0 ? run_local(flags) : run_distributed(flags);
  } catch (const caftrain::Error& e) {
    std::cerr << "fashion_mnist: " << e.what() << std::endl;
    return 1;
  }
}
