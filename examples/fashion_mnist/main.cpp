// The seed's Fashion-MNIST ResNet18 classifier, trained with caftrain's Lightning-style loop.
//
//   build/examples/fashion_mnist                    # 1 epoch of 100 batches, then the test set
//   build/examples/fashion_mnist --full             # the seed's run: 10 epochs, every batch
//   build/examples/fashion_mnist --epochs 2 --limit-train-batches 50 --output runs/fmnist
//
// Prints a progress bar per epoch, the validation accuracy, and at the end a line
// `test accuracy: 0.8xxx` and where the weights were saved (resnet18.pt, which Python
// loads into torchvision's resnet18 whose conv1 is replaced as in the seed).
#include <torch/torch.h>

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
    log("val_loss", torch::nn::functional::cross_entropy(logits, batch.target), {.prog_bar = true});
    log("val_accuracy", accuracy(logits, batch.target), {.prog_bar = true});
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
  int64_t epochs = 1;
  int64_t limit_train_batches = 100;
  int64_t limit_val_batches = 20;
  int64_t batch_size = 128;
  int64_t threads = 0;
  bool full = false;
  std::string data = caftrain::data::FashionMNIST::default_root;
  std::string output = "runs/fashion_mnist";
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "fashion_mnist: " << problem << "\n"
            << "flags: --epochs N  --limit-train-batches N  --limit-val-batches N  --batch-size N\n"
            << "       --threads N (default: all cores)  --full  --data DIR  --output DIR\n";
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
    if (a == "--epochs")
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

} // namespace

int main(int argc, char** argv) {
  auto flags = parse(argc, argv);
  // libtorch may default to fewer threads than cores; use them all unless told otherwise.
  torch::set_num_threads(flags.threads > 0 ? static_cast<int>(flags.threads)
                                           : static_cast<int>(std::thread::hardware_concurrency()));
  try {
    auto train = caftrain::data::FashionMNIST::train(flags.data);
    auto test = caftrain::data::FashionMNIST::test(flags.data);
    auto model = caftrain::with_seed(0, [] { return std::make_shared<ImageClassifier>(); });
    caftrain::Trainer trainer({.max_epochs = flags.epochs,
                               .limit_train_batches = limit(flags.limit_train_batches),
                               .limit_val_batches = limit(flags.limit_val_batches),
                               .default_root_dir = flags.output});
    trainer.fit(model, train->loader({.batch_size = flags.batch_size, .shuffle = true}),
                test->loader({.batch_size = 256}));
    auto results = trainer.test(model, test->loader({.batch_size = 256}));
    auto weights = flags.output + "/resnet18.pt";
    caftrain::save_state_dict(caftrain::state_dict(*model->model), weights);
    std::cout << "test accuracy: " << results.front().at("test_accuracy") << "\n"
              << "test loss: " << results.front().at("test_loss") << "\n"
              << "weights: " << weights << "\n"
              << "metrics: " << trainer.log_dir() << "/metrics.csv" << std::endl;
  } catch (const caftrain::Error& e) {
    std::cerr << "fashion_mnist: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
