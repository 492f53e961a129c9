// DDPStrategy: equivalence with single-process training, buckets, and its errors.
#include <catch2/catch.hpp>

#include <thread>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

/// A small MLP classifier (no BatchNorm: per-rank batch statistics would differ from the
/// statistics of the concatenated batch by design).
class Mlp : public LightningModule {
 public:
  explicit Mlp(std::string optimizer = "sgd", int64_t hidden = 32) : optimizer(std::move(optimizer)) {
    fc1 = register_module("fc1", torch::nn::Linear(8, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, 3));
  }

  at::Tensor training_step(const Batch& batch, int64_t) override {
    auto h = torch::relu(fc1->forward(batch.data));
    return torch::nn::functional::cross_entropy(fc2->forward(h), batch.target);
  }

  Optimizers configure_optimizers() override {
    if (optimizer == "adam")
      return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-2));
    return std::make_shared<torch::optim::SGD>(parameters(),
                                               torch::optim::SGDOptions(0.1).momentum(0.9));
  }

  std::string optimizer;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

std::shared_ptr<data::TensorDataset> classification_data(int64_t n) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(42);
  auto x = torch::randn({n, 8}, gen);
  auto y = torch::randint(0, 3, {n}, gen);
  return std::make_shared<data::TensorDataset>(x, y);
}

TrainerOptions options_for(int64_t steps, int64_t accumulate) {
  TrainerOptions o;
  o.max_steps = steps;
  o.accumulate_grad_batches = accumulate;
  o.enable_progress_bar = false;
  o.logger = false;
  o.num_sanity_val_steps = 0;
  return o;
}

using test::run_gloo_ranks;

/// Weights after `steps` optimizer steps of DDP on `world` ranks (batch `batch` per rank).
std::shared_ptr<Mlp> train_ddp(int world, int64_t batch, int64_t steps, int64_t accumulate,
                               const std::string& optimizer) {
  auto data = classification_data(world * batch * steps * accumulate);
  std::shared_ptr<Mlp> rank0;
  std::mutex mtx;
  run_gloo_ranks(world, [&](int rank, std::shared_ptr<Communicator> comm) {
    // Different initial weights per rank: DDP must start everyone from rank 0's.
    auto model = with_seed(static_cast<uint64_t>(rank), [&] { return std::make_shared<Mlp>(optimizer); });
    auto o = options_for(steps, accumulate);
    o.strategy = DDPStrategy();
    o.plugins = {StaticEnvironment(comm)};
    Trainer trainer(o);
    trainer.fit(model, data::DataLoader(data, {.batch_size = batch}));
    std::lock_guard<std::mutex> guard(mtx);
    if (rank == 0)
      rank0 = model;
  });
  return rank0;
}

std::shared_ptr<Mlp> train_single(int64_t batch, int64_t steps, int64_t accumulate,
                                  const std::string& optimizer, int64_t samples) {
  auto model = with_seed(0, [&] { return std::make_shared<Mlp>(optimizer); });
  Trainer trainer(options_for(steps, accumulate));
  trainer.fit(model, data::DataLoader(classification_data(samples), {.batch_size = batch}));
  return model;
}

} // namespace

TEST_CASE("DDP on 2 and 3 workers matches one worker on the concatenated batch", "[ddp]") {
  for (auto optimizer : {"sgd", "adam"}) {
    for (int world : {2, 3}) {
      for (int64_t accumulate : {1, 2}) {
        CAPTURE(optimizer, world, accumulate);
        const int64_t batch = 6, steps = 5;
        auto ddp = train_ddp(world, batch, steps, accumulate, optimizer);
        auto single = train_single(world * batch, steps, accumulate, optimizer,
                                   world * batch * steps * accumulate);
        CHECK(test::max_param_diff(*ddp, *single) < 2e-5);
        // and training moved the weights away from the start
        auto start = with_seed(0, [&] { return std::make_shared<Mlp>(optimizer); });
        CHECK(test::max_param_diff(*ddp, *start) > 1e-3);
      }
    }
  }
}

TEST_CASE("DDP buckets gradients in reverse order with a small first bucket", "[ddp]") {
  run_gloo_ranks(2, [](int rank, std::shared_ptr<Communicator> comm) {
    models::ResNet18 net;
    DDPStrategy ddp;
    ddp.setup(*net, std::make_shared<StaticEnvironment>(comm), torch::kCPU);
    auto buckets = ddp.bucket_assignment();
    auto params = net->parameters();
    REQUIRE(buckets.size() >= 2);
    // The first bucket starts with the last registered parameter (fc.bias) and stays
    // under 1 MiB; every parameter is in exactly one bucket.
    CHECK(buckets.front().front() == params.size() - 1);
    int64_t first_bytes = 0;
    for (auto k : buckets.front())
      first_bytes += params[k].numel() * 4;
    CHECK(first_bytes <= 1024 * 1024);
    size_t total = 0;
    for (auto& b : buckets)
      total += b.size();
    CHECK(total == params.size());
    // 11.2M parameters = 45 MiB: at least three buckets under a 25 MiB cap.
    CHECK(buckets.size() >= 3);
    ddp.teardown();
  });
}

TEST_CASE("DDP refuses ranks whose models differ, naming the parameter", "[ddp]") {
  CHECK_THROWS_WITH(run_gloo_ranks(2,
                              [](int rank, std::shared_ptr<Communicator> comm) {
                                auto model = std::make_shared<Mlp>("sgd", rank == 0 ? 32 : 16);
                                DDPStrategy ddp;
                                ddp.setup(*model, std::make_shared<StaticEnvironment>(comm),
                                          torch::kCPU);
                              }),
                    Contains("fc1.weight") && Contains("rank 1") && Contains("same model"));
}

namespace {

class HalfUsed : public Mlp {
 public:
  HalfUsed() {
    unused = register_module("unused", torch::nn::Linear(8, 8));
  }
  torch::nn::Linear unused{nullptr};
};

} // namespace

TEST_CASE("A parameter without gradient is an error unless find_unused_parameters is set", "[ddp]") {
  auto data = classification_data(48);
  auto run = [&](bool find_unused) {
    run_gloo_ranks(2, [&](int, std::shared_ptr<Communicator> comm) {
      auto o = options_for(2, 1);
      o.strategy = DDPStrategy({.find_unused_parameters = find_unused});
      o.plugins = {StaticEnvironment(comm)};
      Trainer(o).fit(std::make_shared<HalfUsed>(), data::DataLoader(data, {.batch_size = 4}));
    });
  };
  CHECK_THROWS_WITH(run(false), Contains("unused.weight") && Contains("find_unused_parameters"));
  CHECK_NOTHROW(run(true));
}
