// DDPStrategy: equivalence with single-process training, buckets, and its errors.
#include <catch2/catch.hpp>

#include <functional>
#include <mutex>
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

// -- several optimizers, unused parameters, nothing to train ---------------------------

namespace {

/// A generator and a discriminator with one optimizer each (Lightning's GAN shape); one
/// loss trains both.
class TwoOptimizers : public LightningModule {
 public:
  TwoOptimizers() {
    gen = register_module("gen", torch::nn::Linear(8, 8));
    disc = register_module("disc", torch::nn::Linear(8, 3));
  }

  at::Tensor training_step(const Batch& batch, int64_t) override {
    return torch::nn::functional::cross_entropy(disc->forward(torch::relu(gen->forward(batch.data))),
                                                batch.target);
  }

  Optimizers configure_optimizers() override {
    Optimizers o;
    o.optimizers = {std::make_shared<torch::optim::SGD>(gen->parameters(), torch::optim::SGDOptions(0.1)),
                    std::make_shared<torch::optim::Adam>(disc->parameters(), torch::optim::AdamOptions(1e-2))};
    return o;
  }

  torch::nn::Linear gen{nullptr}, disc{nullptr};
};

/// Rank 0's module after `steps` steps on `world` ranks (global batch 12), each rank with
/// the strategy `make` gives; one process without a communicator when `world` is 1.
template <class M>
std::shared_ptr<M> train_module(int world, int64_t steps, const std::function<StrategyOption()>& make,
                                const std::function<void(M&, int)>& prepare = {}) {
  auto data = classification_data(12 * steps);
  std::shared_ptr<M> rank0;
  std::mutex mtx;
  auto body = [&](int rank, std::shared_ptr<Communicator> comm) {
    auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<M>(); });
    if (prepare)
      prepare(*model, rank);
    auto o = options_for(steps, 1);
    o.strategy = make();
    if (comm)
      o.plugins = {StaticEnvironment(comm)};
    Trainer(o).fit(model, data::DataLoader(data, {.batch_size = 12 / world}));
    std::lock_guard<std::mutex> guard(mtx);
    if (rank == 0)
      rank0 = model;
  };
  if (world == 1)
    body(0, nullptr);
  else
    run_gloo_ranks(world, body);
  return rank0;
}

} // namespace

TEST_CASE("DDP's zero_grad of one optimizer leaves the other's gradients: both optimizers of a GAN step like one process", "[ddp][optimizer]") {
  auto single = train_module<TwoOptimizers>(1, 4, [] { return "single_device"; });
  auto ddp = train_module<TwoOptimizers>(2, 4, [] { return DDPStrategy(); });
  auto start = with_seed(0, [] { return std::make_shared<TwoOptimizers>(); });
  // Both optimizers moved their parameters, in one process and under DDP alike.
  CHECK(test::max_param_diff(*single->disc, *start->disc) > 1e-3);
  CHECK(test::max_param_diff(*single->gen, *start->gen) > 1e-3);
  CHECK(test::max_param_diff(*ddp->disc, *single->disc) < 2e-5);
  CHECK(test::max_param_diff(*ddp->gen, *single->gen) < 2e-5);
}


namespace {

/// An MLP with a layer only the ranks that set `use_extra` use, and one that no rank
/// uses; AdamW with weight decay, which would move a parameter whose gradient is zero.
class PartlyUsed : public LightningModule {
 public:
  PartlyUsed() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
    extra = register_module("extra", torch::nn::Linear(3, 3));
    unused = register_module("unused", torch::nn::Linear(8, 8));
  }

  at::Tensor training_step(const Batch& batch, int64_t batch_idx) override {
    auto out = fc2->forward(torch::relu(fc1->forward(batch.data)));
    if (use_extra)
      out = extra->forward(out);
    auto loss = torch::nn::functional::cross_entropy(out, batch.target);
    if (use_unused_once && batch_idx == 0) // then never again: its optimizer state is not zero
      loss = loss + 0.01 * unused->forward(batch.data).sum();
    return loss;
  }

  Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::AdamW>(parameters(),
                                                 torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  }

  bool use_extra = false;
  bool use_unused_once = false;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, extra{nullptr}, unused{nullptr};
};

} // namespace

TEST_CASE("Under DDP with find_unused_parameters a parameter no rank used keeps no gradient and stays put, as in one process", "[ddp]") {
  auto start = with_seed(0, [] { return std::make_shared<PartlyUsed>(); });
  auto ddp = train_module<PartlyUsed>(2, 3, [] { return DDPStrategy({.find_unused_parameters = true}); },
                                      [](PartlyUsed& m, int rank) { m.use_extra = rank == 1; });
  // No rank used it: no gradient, so neither Adam's update nor its weight decay touched it.
  CHECK_FALSE(ddp->unused->weight.grad().defined());
  CHECK(torch::equal(ddp->unused->weight, start->unused->weight));
  CHECK(torch::equal(ddp->unused->bias, start->unused->bias));
  // Rank 1 used `extra`: rank 0 gets the average gradient and steps it.
  CHECK(ddp->extra->weight.grad().defined());
  CHECK(test::max_param_diff(*ddp->extra, *start->extra) > 1e-4);
  // One process leaves an unused parameter alone likewise.
  auto single = train_module<PartlyUsed>(1, 3, [] { return "single_device"; });
  CHECK_FALSE(single->unused->weight.grad().defined());
  CHECK(torch::equal(single->unused->weight, start->unused->weight));
}

TEST_CASE("Under ZeRO and FSDP a parameter no rank used keeps its value and optimizer state, and the rest trains as under DDP", "[sharded][ddp]") {
  auto start = with_seed(0, [] { return std::make_shared<PartlyUsed>(); });
  // `extra` only on rank 1, where each rank's parameters are resident (ZeRO, NO_SHARD);
  // on every rank under FSDP's sharded modes, whose gathers are collectives that every
  // rank must issue (PyTorch's FSDP likewise needs the same modules run on every rank).
  auto on_rank_1 = [](PartlyUsed& m, int rank) { m.use_extra = rank == 1; };
  auto everywhere = [](PartlyUsed& m, int) { m.use_extra = true; };
  auto ddp_find_unused = [] { return DDPStrategy({.find_unused_parameters = true}); };
  auto ddp_rank_1 = train_module<PartlyUsed>(2, 3, ddp_find_unused, on_rank_1);
  auto ddp_everywhere = train_module<PartlyUsed>(2, 3, ddp_find_unused, everywhere);
  using Make = std::function<StrategyOption()>;
  struct Case {
    std::string name;
    Make make;
    bool sharded_parameters;
  };
  for (auto& [name, make, sharded_parameters] : std::vector<Case>{
         {"zero_stage_1", [] { return ZeroStrategy({.stage = 1}); }, false},
         {"zero_stage_2", [] { return ZeroStrategy({.stage = 2}); }, false},
         {"fsdp NO_SHARD", [] { return FSDPStrategy({.sharding_strategy = ShardingStrategy::NO_SHARD}); }, false},
         {"fsdp FULL_SHARD", [] { return FSDPStrategy(); }, true},
         {"fsdp SHARD_GRAD_OP", [] { return FSDPStrategy({.sharding_strategy = ShardingStrategy::SHARD_GRAD_OP}); }, true}}) {
    CAPTURE(name);
    auto sharded = train_module<PartlyUsed>(2, 3, make, sharded_parameters ? everywhere : on_rank_1);
    // AdamW's weight decay would have moved it had the step treated it as a zero gradient.
    CHECK(torch::equal(sharded->unused->weight, start->unused->weight));
    CHECK(torch::equal(sharded->unused->bias, start->unused->bias));
    CHECK(test::max_param_diff(*sharded->extra, *start->extra) > 1e-4);
    CHECK(test::max_param_diff(*sharded, sharded_parameters ? *ddp_everywhere : *ddp_rank_1) < 2e-5);
  }
  // Used in the first step only: AdamW's moments of it are not zero afterwards, yet the
  // later steps leave it where the first put it, as DDP does.
  auto once = [](PartlyUsed& m, int) {
    m.use_extra = true;
    m.use_unused_once = true;
  };
  auto ddp_once = train_module<PartlyUsed>(2, 3, ddp_find_unused, once);
  CHECK(test::max_param_diff(*ddp_once->unused, *start->unused) > 1e-4);
  for (auto& c : std::vector<Case>{
         {"zero_stage_1", [] { return ZeroStrategy({.stage = 1}); }, false},
         {"zero_stage_2", [] { return ZeroStrategy({.stage = 2}); }, false},
         {"fsdp FULL_SHARD", [] { return FSDPStrategy(); }, true}}) {
    CAPTURE(c.name);
    auto sharded = train_module<PartlyUsed>(2, 3, c.make, once);
    CHECK(test::max_param_diff(*sharded->unused, *ddp_once->unused) < 2e-5);
    CHECK(test::max_param_diff(*sharded, *ddp_once) < 2e-5);
  }
}

namespace {

/// An MLP whose parameters are all frozen.
class Frozen : public Mlp {
 public:
  Frozen() {
    for (auto& p : parameters())
      p.set_requires_grad(false);
  }
};

} // namespace

TEST_CASE("A model without trainable parameters is a clear error at setup, under every strategy", "[ddp][sharded]") {
  using Make = std::function<StrategyOption()>;
  for (auto& [world, make] : std::vector<std::pair<int, Make>>{
         {1, [] { return "single_device"; }}, {2, [] { return DDPStrategy(); }},
         {2, [] { return ZeroStrategy({.stage = 1}); }}, {2, [] { return ZeroStrategy({.stage = 2}); }},
         {2, [] { return FSDPStrategy(); }}}) {
    auto name = make().name();
    CAPTURE(name);
    CHECK_THROWS_WITH(train_module<Frozen>(world, 1, make),
                      Contains("no trainable parameters") && Contains(name));
  }
}
