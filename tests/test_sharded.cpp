// ZeroStrategy and FSDPStrategy: the same weights as DDP, the memory they save, sharded
// checkpoints across world sizes, and restarts from them.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <functional>
#include <mutex>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;
using test::run_gloo_ranks;

namespace {

/// 8 -> 10 -> 5 -> 3: flats of 90, 55 and 18 parameters, 163 in all (prime: the shards of
/// 2 and 3 ranks need padding). No BatchNorm: per-rank batch statistics differ by design.
class Net : public LightningModule {
 public:
  explicit Net(std::string optimizer = "sgd", int64_t in = 8, int64_t h1 = 10, int64_t h2 = 5)
    : optimizer(std::move(optimizer)) {
    fc1 = register_module("fc1", torch::nn::Linear(in, h1));
    fc2 = register_module("fc2", torch::nn::Linear(h1, h2));
    fc3 = register_module("fc3", torch::nn::Linear(h2, 3));
  }

  at::Tensor training_step(const Batch& batch, int64_t) override {
    auto h = torch::relu(fc2->forward(torch::relu(fc1->forward(batch.data))));
    auto loss = torch::nn::functional::cross_entropy(fc3->forward(h), batch.target);
    log("loss", loss);
    return loss;
  }

  Optimizers configure_optimizers() override {
    if (optimizer == "adam")
      return std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-2));
    if (optimizer == "adamw") {
      auto opt = std::make_shared<torch::optim::AdamW>(parameters(),
                                                       torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
      return {opt, {std::make_shared<StepLR>(opt, 2, 0.5), Interval::step}};
    }
    return std::make_shared<torch::optim::SGD>(parameters(),
                                               torch::optim::SGDOptions(0.1).momentum(0.9));
  }

  std::string optimizer;
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
};

std::shared_ptr<data::TensorDataset> classification_data(int64_t n, int64_t features = 8) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(42);
  auto x = torch::randn({n, features}, gen);
  auto y = torch::randint(0, 3, {n}, gen);
  return std::make_shared<data::TensorDataset>(x, y);
}

TrainerOptions options_for(int64_t steps, int64_t accumulate = 1) {
  TrainerOptions o;
  o.max_steps = steps;
  o.accumulate_grad_batches = accumulate;
  o.enable_progress_bar = false;
  o.logger = false;
  o.num_sanity_val_steps = 0;
  return o;
}

using StrategyMaker = std::function<StrategyOption()>;

struct Variant {
  std::string name;
  StrategyMaker make;
};

/// Small buckets, so that ZeRO's flats split the model into several pieces.
ZeroOptions zero(int stage) {
  return {.stage = stage, .bucket_cap_mb = 200e-6, .first_bucket_cap_mb = 100e-6};
}

std::vector<Variant> sharded_variants() {
  return {
    {"zero_stage_1", [] { return ZeroStrategy(zero(1)); }},
    {"zero_stage_2", [] { return ZeroStrategy(zero(2)); }},
    {"fsdp FULL_SHARD", [] { return FSDPStrategy({.sharding_strategy = ShardingStrategy::FULL_SHARD}); }},
    {"fsdp SHARD_GRAD_OP", [] { return FSDPStrategy({.sharding_strategy = ShardingStrategy::SHARD_GRAD_OP}); }},
    {"fsdp NO_SHARD", [] { return FSDPStrategy({.sharding_strategy = ShardingStrategy::NO_SHARD}); }},
    {"fsdp FULL_SHARD min_num_params=50 prefetch",
     [] { return FSDPStrategy({.min_num_params = 50, .forward_prefetch = true}); }},
  };
}

/// Rank 0's module after `steps` optimizer steps on `world` ranks (batch `batch` each),
/// with the strategy `make` gives; `options` may set more (clipping, precision).
std::shared_ptr<Net> train_on(int world, const StrategyMaker& make, const std::string& optimizer,
                              int64_t batch, int64_t steps, int64_t accumulate = 1,
                              const std::function<void(TrainerOptions&)>& more = {}) {
  auto data = classification_data(world * batch * steps * accumulate);
  std::shared_ptr<Net> rank0;
  std::mutex mtx;
  run_gloo_ranks(world, [&](int rank, std::shared_ptr<Communicator> comm) {
    // Different initial weights per rank: the strategy must start everyone from rank 0's.
    auto model = with_seed(static_cast<uint64_t>(rank), [&] { return std::make_shared<Net>(optimizer); });
    auto o = options_for(steps, accumulate);
    o.strategy = make();
    o.plugins = {StaticEnvironment(comm)};
    if (more)
      more(o);
    Trainer trainer(o);
    trainer.fit(model, data::DataLoader(data, {.batch_size = batch}));
    std::lock_guard<std::mutex> guard(mtx);
    if (rank == 0)
      rank0 = model;
  });
  return rank0;
}

StrategyOption ddp() {
  return DDPStrategy();
}

} // namespace

TEST_CASE("ZeRO-1, ZeRO-2 and FSDP on 2 and 3 workers give DDP's weights after 5 steps", "[sharded]") {
  for (auto optimizer : {"sgd", "adam", "adamw"}) {
    for (int world : {2, 3}) {
      for (int64_t accumulate : {1, 2}) {
        const int64_t batch = 6, steps = 5;
        auto reference = train_on(world, ddp, optimizer, batch, steps, accumulate);
        auto start = with_seed(0, [&] { return std::make_shared<Net>(optimizer); });
        REQUIRE(test::max_param_diff(*reference, *start) > 1e-3); // training moved the weights
        for (auto& v : sharded_variants()) {
          CAPTURE(optimizer, world, accumulate, v.name);
          auto sharded = train_on(world, v.make, optimizer, batch, steps, accumulate);
          CHECK(test::max_param_diff(*sharded, *reference) < 2e-5);
        }
      }
    }
  }
}

TEST_CASE("Gradient clipping by norm and by value under ZeRO and FSDP matches DDP's", "[sharded]") {
  for (auto algorithm : {"norm", "value"}) {
    auto clip = [&](TrainerOptions& o) {
      o.gradient_clip_val = 0.05;
      o.gradient_clip_algorithm = algorithm;
    };
    auto reference = train_on(2, ddp, "sgd", 6, 5, 1, clip);
    auto unclipped = train_on(2, ddp, "sgd", 6, 5, 1);
    REQUIRE(test::max_param_diff(*reference, *unclipped) > 1e-4); // clipping changed something
    for (auto& v : sharded_variants()) {
      CAPTURE(algorithm, v.name);
      CHECK(test::max_param_diff(*train_on(2, v.make, "sgd", 6, 5, 1, clip), *reference) < 2e-5);
    }
  }
}

TEST_CASE("bf16-mixed under ZeRO-2 and FSDP trains like bf16-mixed under DDP", "[sharded][precision]") {
  auto bf16 = [](TrainerOptions& o) { o.precision = "bf16-mixed"; };
  auto reference = train_on(2, ddp, "adam", 6, 5, 1, bf16);
  auto fp32 = train_on(2, ddp, "adam", 6, 5, 1);
  // Autocast changed the arithmetic, and only a little.
  CHECK(test::max_param_diff(*reference, *fp32) > 0);
  CHECK(test::max_param_diff(*reference, *fp32) < 5e-2);
  for (auto& v : sharded_variants()) {
    CAPTURE(v.name);
    // Parameters stay fp32 (autocast casts per operator), so the ranks agree with DDP to
    // float tolerance.
    auto sharded = train_on(2, v.make, "adam", 6, 5, 1, bf16);
    CHECK(test::max_param_diff(*sharded, *reference) < 1e-4);
    for (auto& p : sharded->parameters())
      CHECK(p.scalar_type() == torch::kFloat);
  }
}

TEST_CASE("Sharded strategies refuse optimizers that are not element-wise, and bad options", "[sharded]") {
  CHECK_THROWS_WITH(ZeroStrategy({.stage = 3}), Contains("stage"));
  class LbfgsNet : public Net {
   public:
    Optimizers configure_optimizers() override {
      return std::make_shared<torch::optim::LBFGS>(parameters());
    }
  };
  CHECK_THROWS_WITH(run_gloo_ranks(2,
                                   [&](int, std::shared_ptr<Communicator> comm) {
                                     auto model = std::make_shared<LbfgsNet>();
                                     auto o = options_for(1);
                                     o.strategy = ZeroStrategy();
                                     o.plugins = {StaticEnvironment(comm)};
                                     Trainer trainer(o);
                                     trainer.fit(model, data::DataLoader(classification_data(24),
                                                                         {.batch_size = 6}));
                                   }),
                    Contains("element-wise") && Contains("DDPStrategy"));
}

// -- memory ----------------------------------------------------------------------------

namespace {

/// 64 -> 256 -> 256 -> 10 (85002 parameters): big enough that padding is noise.
struct MemoryRun {
  MemoryStats at_rest;     // rank 0, after the last optimizer step
  int64_t largest_unit = 0; // bytes of the largest flat's full parameters (FSDP)
};

MemoryRun memory_of(int world, const StrategyMaker& make) {
  MemoryRun run;
  std::mutex mtx;
  auto data = classification_data(world * 16 * 3, 64);
  run_gloo_ranks(world, [&](int rank, std::shared_ptr<Communicator> comm) {
    class Probe : public Callback {
     public:
      explicit Probe(MemoryRun& out) : out_(out) {}
      void on_train_end(Trainer& t, LightningModule&) override {
        out_.at_rest = t.strategy().memory_stats();
        if (auto* sharded = dynamic_cast<ShardedStrategy*>(&t.strategy()))
          for (auto& flat : sharded->flats())
            out_.largest_unit = std::max(out_.largest_unit, flat->full_bytes());
      }

     private:
      MemoryRun& out_;
    };
    MemoryRun mine;
    auto model = with_seed(0, [] { return std::make_shared<Net>("adam", 64, 256, 256); });
    auto o = options_for(3);
    o.strategy = make();
    o.plugins = {StaticEnvironment(comm)};
    o.callbacks = {std::make_shared<Probe>(mine)};
    Trainer trainer(o);
    trainer.fit(model, data::DataLoader(data, {.batch_size = 16}));
    std::lock_guard<std::mutex> guard(mtx);
    if (rank == 0)
      run = mine;
  });
  return run;
}

void check_near(int64_t actual, double expected) {
  CAPTURE(actual, expected);
  CHECK(std::abs(static_cast<double>(actual) - expected) <= 0.05 * expected);
}

} // namespace

TEST_CASE("ZeRO-1 shards optimizer state, ZeRO-2 gradients too, FSDP parameters too (1/N within 5%)", "[sharded][memory]") {
  for (int world : {2, 3}) {
    CAPTURE(world);
    auto full = memory_of(world, ddp).at_rest;
    const double params = 85002 * 4.0;
    check_near(full.parameter_bytes, params);
    check_near(full.gradient_bytes, params);
    check_near(full.optimizer_state_bytes, 2 * params); // Adam: exp_avg, exp_avg_sq
    double n = world;

    auto z1 = memory_of(world, [] { return ZeroStrategy({.stage = 1}); }).at_rest;
    check_near(z1.optimizer_state_bytes, full.optimizer_state_bytes / n);
    check_near(z1.gradient_bytes, full.gradient_bytes + full.gradient_bytes / n); // full + shard
    check_near(z1.parameter_bytes, full.parameter_bytes); // the shards alias the full buffers

    auto z2 = memory_of(world, [] { return ZeroStrategy({.stage = 2}); }).at_rest;
    check_near(z2.optimizer_state_bytes, full.optimizer_state_bytes / n);
    check_near(z2.gradient_bytes, full.gradient_bytes / n);
    check_near(z2.parameter_bytes, full.parameter_bytes);

    auto fsdp = memory_of(world, [] { return FSDPStrategy(); });
    check_near(fsdp.at_rest.optimizer_state_bytes, full.optimizer_state_bytes / n);
    check_near(fsdp.at_rest.gradient_bytes, full.gradient_bytes / n);
    check_near(fsdp.at_rest.parameter_bytes, full.parameter_bytes / n);
    // While computing: at most the two units kept gathered, and one unit's gradient in flight.
    CHECK(fsdp.largest_unit > 0);
    CHECK(fsdp.at_rest.peak_transient_bytes <= 3 * fsdp.largest_unit + fsdp.largest_unit / world + 64);
  }
}

// -- sharded checkpoints ---------------------------------------------------------------

namespace {

/// Saves a checkpoint at the end of training (collective); captures the module's state
/// right after a restore.
class SaveAtEnd : public Callback {
 public:
  SaveAtEnd(std::string path, StateDict* restored) : path_(std::move(path)), restored_(restored) {}

  void on_train_start(Trainer& t, LightningModule&) override {
    auto state = t.strategy().model_state_dict(); // collective under FSDP
    if (restored_)
      for (auto& item : state)
        restored_->insert(item.key(), item.value().clone()); // training goes on in place
  }

  void on_train_end(Trainer& t, LightningModule&) override {
    if (!path_.empty())
      t.save_checkpoint(path_);
  }

 private:
  std::string path_;
  StateDict* restored_;
};

/// Trains `world` ranks (global batch 12) up to `steps`, resuming from `resume` when
/// given and saving to `save` when given; returns rank 0's module and, in `restored`, its
/// state right after the restore.
std::shared_ptr<Net> run_ckpt(int world, const StrategyMaker& make, int64_t steps,
                              const std::string& resume, const std::string& save,
                              StateDict* restored = nullptr) {
  auto data = classification_data(12 * 8);
  std::shared_ptr<Net> rank0;
  std::mutex mtx;
  auto body = [&](int rank, std::shared_ptr<Communicator> comm) {
    auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<Net>("adamw"); });
    auto o = options_for(steps);
    o.strategy = make();
    if (comm)
      o.plugins = {StaticEnvironment(comm)};
    o.callbacks = {std::make_shared<SaveAtEnd>(save, rank == 0 ? restored : nullptr)};
    Trainer trainer(o);
    trainer.fit(model, data::DataLoader(data, {.batch_size = 12 / world}), std::nullopt, resume);
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

void check_equal(const StateDict& a, const StateDict& b, double tolerance = 0) {
  REQUIRE(a.size() == b.size());
  for (auto& item : a) {
    CAPTURE(item.key(), tolerance);
    REQUIRE(b.contains(item.key()));
    CAPTURE((item.value() - b[item.key()]).abs().max().item<double>());
    if (tolerance == 0)
      CHECK(torch::equal(item.value(), b[item.key()]));
    else
      CHECK((item.value() - b[item.key()]).abs().max().item<double>() < tolerance);
  }
}

} // namespace

TEST_CASE("A sharded checkpoint of 2 workers loads into 3 workers and into one process", "[sharded][checkpoint]") {
  for (auto& v : {Variant{"zero_stage_2", [] { return ZeroStrategy(zero(2)); }},
                  Variant{"fsdp", [] { return FSDPStrategy(); }},
                  Variant{"zero_stage_1", [] { return ZeroStrategy({.stage = 1}); }}}) {
    CAPTURE(v.name);
    test::TempDir dir;
    auto saved = dir / "two";
    // 6 steps straight on one process: where 3 + 3 must end.
    auto straight = run_ckpt(1, [] { return "single_device"; }, 6, "", "");
    auto two = run_ckpt(2, v.make, 3, "", saved);

    auto checkpoint = Checkpoint::from_directory(saved);
    CHECK(is_sharded(checkpoint));
    CHECK(checkpoint.metadata().world_size == 2);
    CHECK(checkpoint.metadata().strategy == StrategyOption(v.make()).name());
    auto consolidated = consolidate(checkpoint);
    // The consolidated weights are the 2 ranks' weights.
    check_equal(consolidated.model, state_dict(*two));
    // and the optimizer state of every parameter is there (AdamW: step, exp_avg, exp_avg_sq)
    for (auto& item : two->named_parameters()) {
      CAPTURE(item.key());
      REQUIRE(consolidated.optimizer.count(item.key()));
      CHECK(consolidated.optimizer.at(item.key()).count("exp_avg"));
      CHECK(consolidated.optimizer.at(item.key()).count("exp_avg_sq"));
    }

    // 3 workers resume: identical weights right after the restore, then 3 more steps end
    // where the straight run ends (the global batch is the same 12 samples per step).
    StateDict restored3;
    auto three = run_ckpt(3, v.make, 6, saved, "", &restored3);
    check_equal(restored3, consolidated.model);
    CHECK(test::max_param_diff(*three, *straight) < 2e-5);

    // One process with no sharding resumes likewise.
    StateDict restored1;
    auto one = run_ckpt(1, [] { return "single_device"; }, 6, saved, "", &restored1);
    check_equal(restored1, consolidated.model);
    CHECK(test::max_param_diff(*one, *straight) < 2e-5);

    // The model state of a sharded checkpoint reads like any other's.
    check_equal(checkpoint.model_state_dict(), consolidated.model);
  }
}

TEST_CASE("A consolidated sharded checkpoint is a state dict Python's torch.load reads", "[sharded][checkpoint][python]") {
  if (test::python_with_torch().empty()) {
    WARN("skipped: Debian's python3-torch is not installed");
    return;
  }
  test::TempDir dir;
  auto two = run_ckpt(2, [] { return FSDPStrategy(); }, 2, "", dir / "ckpt");
  consolidate_to_file(Checkpoint::from_directory(dir / "ckpt"), dir / "model.pt");
  std::string output;
  auto rc = test::run_python("import torch\n"
                             "sd = torch.load('" + dir / "model.pt" + "')\n"
                             "print(sorted(sd.keys()))\n"
                             "print('%.6f' % float(sd['fc1.weight'].sum()))\n",
                             output);
  REQUIRE(rc == 0);
  CHECK_THAT(output, Contains("'fc1.weight'") && Contains("'fc3.bias'"));
  char expected[32];
  std::snprintf(expected, sizeof(expected), "%.6f", two->fc1->weight.sum().item<double>());
  CHECK_THAT(output, Contains(expected));
}

// -- restarts --------------------------------------------------------------------------

namespace {

using System = test::ActorSystem;

/// Throws on rank 1 at global step `fail_step` of the first attempt.
class Injector : public Callback {
 public:
  explicit Injector(int64_t step) : step_(step) {}
  void on_train_batch_start(Trainer& t, LightningModule&, const Batch&, int64_t) override {
    auto& ctx = train::get_context();
    if (ctx.world_rank == 1 && ctx.attempt == 0 && t.global_step() == step_)
      throw std::runtime_error("injected failure at step " + std::to_string(step_));
  }

 private:
  int64_t step_;
};

/// 2 epochs of 4 steps; a report every step, a checkpoint every third.
void sharded_train_func(const Config& c) {
  auto data = classification_data(64);
  auto model = with_seed(0, [] { return std::make_shared<Net>("adamw"); });
  Trainer trainer({.max_epochs = 2,
                   .strategy = c.get<std::string>("strategy"),
                   .plugins = {ActorEnvironment()},
                   .callbacks = {Injector(c.get<int64_t>("fail_step")),
                                 ReportCallback({.every_n_epochs = 0,
                                                 .every_n_steps = 1,
                                                 .checkpoint_every = 3})},
                   .logger = false,
                   .enable_progress_bar = false});
  trainer = prepare_trainer(std::move(trainer));
  auto ckpt = train::get_checkpoint();
  trainer.fit(model, data::DataLoader(data, {.batch_size = 8, .shuffle = true, .seed = 4}),
              std::nullopt, ckpt ? ckpt->path() : "");
}

Result run_sharded(caf::actor_system& sys, const test::TempDir& dir, const std::string& strategy,
                   int64_t fail_step) {
  TorchTrainerOptions o;
  o.train_loop_config = {{"strategy", strategy}, {"fail_step", fail_step}};
  o.scaling.num_workers = 2;
  o.run.name = strategy + (fail_step < 0 ? "_clean" : "_faulty");
  o.run.storage_path = dir.path();
  o.run.failure.max_failures = 1;
  return TorchTrainer(sys, sharded_train_func, o).fit();
}

} // namespace

TEST_CASE("A failure under ZeRO-2 and FSDP restarts from the sharded checkpoint and ends like an undisturbed run", "[sharded][fault]") {
  test::TempDir dir;
  System s;
  for (std::string strategy : {"zero_stage_2", "fsdp"}) {
    CAPTURE(strategy);
    auto clean = run_sharded(s.sys, dir, strategy, -1);
    INFO((clean.error ? clean.error->message : ""));
    REQUIRE(clean.ok());
    auto faulty = run_sharded(s.sys, dir, strategy, 5);
    INFO((faulty.error ? faulty.error->message : ""));
    REQUIRE(faulty.ok());
    CHECK(faulty.attempts == 2);
    REQUIRE(faulty.metrics_history.size() == 8);
    for (size_t i = 0; i < 8; ++i) {
      auto& rec = faulty.metrics_history[i];
      CAPTURE(i);
      CHECK(rec.index == static_cast<int64_t>(i));
      CHECK(rec.attempt == (i < 3 ? 0 : 1)); // checkpoint at step 3, failure at step 5
      CHECK(rec.metrics.at("loss") == Approx(clean.metrics_history[i].metrics.at("loss")).epsilon(1e-5));
    }
    REQUIRE(faulty.checkpoint);
    CHECK(is_sharded(*faulty.checkpoint));
    check_equal(faulty.checkpoint->model_state_dict(), clean.checkpoint->model_state_dict(), 1e-6);
  }
}

TEST_CASE("A fit stopped by max_steps mid-epoch and saved resumes at its next batch, under DDP, ZeRO-2 and FSDP", "[sharded][checkpoint]") {
  test::TempDir dir;
  auto straight = run_ckpt(1, [] { return "single_device"; }, 6, "", "");
  for (auto& v : {Variant{"ddp", [] { return DDPStrategy(); }},
                  Variant{"zero_stage_2", [] { return ZeroStrategy(zero(2)); }},
                  Variant{"fsdp", [] { return FSDPStrategy(); }}}) {
    CAPTURE(v.name);
    auto saved = dir / v.name;
    run_ckpt(2, v.make, 3, "", saved); // 3 of the epoch's 8 steps
    auto state = Checkpoint::from_directory(saved).metadata();
    CHECK(state.global_step == 3);
    auto resumed = run_ckpt(2, v.make, 6, saved, "");
    CHECK(test::max_param_diff(*resumed, *straight) < 2e-5);
  }
}
