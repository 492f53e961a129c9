// Learning for real: a small CNN on the real Fashion-MNIST.
#include <catch2/catch.hpp>

#include <thread>

#include "helpers.hpp"

using namespace caftrain;

namespace {

/// Two convolutions and two linear layers: ~90% on Fashion-MNIST after a few epochs.
class SmallCNN : public LightningModule {
 public:
  SmallCNN() {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 3).padding(1)));
    fc1 = register_module("fc1", torch::nn::Linear(32 * 7 * 7, 128));
    fc2 = register_module("fc2", torch::nn::Linear(128, 10));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
    h = torch::max_pool2d(torch::relu(conv2->forward(h)), 2);
    return fc2->forward(torch::relu(fc1->forward(h.flatten(1))));
  }

  torch::Tensor training_step(const Batch& batch, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(forward(batch.data), batch.target);
    log("loss", loss);
    return loss;
  }

  void test_step(const Batch& batch, int64_t) override {
    auto correct = forward(batch.data).argmax(1).eq(batch.target).to(torch::kFloat).mean();
    log("test_accuracy", correct);
  }

  Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(2e-3));
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

} // namespace

TEST_CASE("A small CNN reaches 85% test accuracy on the real Fashion-MNIST in 1200 steps", "[convergence]") {
  torch::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  test::TempDir dir;
  auto train = data::FashionMNIST::train();
  auto test_set = data::FashionMNIST::test();
  auto model = with_seed(0, [] { return std::make_shared<SmallCNN>(); });
  Trainer trainer({.max_steps = 1200, .enable_progress_bar = false, .default_root_dir = dir.path()});
  trainer.fit(model, train->loader({.batch_size = 64, .shuffle = true}));
  auto result = trainer.test(model, test_set->loader({.batch_size = 500}));
  auto accuracy = result.front().at("test_accuracy");
  INFO("test accuracy " << accuracy);
  CHECK(accuracy >= 0.85);
}
