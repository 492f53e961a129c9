// ZeroStrategy and FSDPStrategy: the same weights as DDP, the memory they save, sharded
// checkpoints across world sizes, and restarts from them.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>

#include <ATen/ThreadLocalState.h>

#include "checkpoint/files.hpp"
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
    if (optimizer == "rmsprop")
      return std::make_shared<torch::optim::RMSprop>(
        parameters(), torch::optim::RMSpropOptions(1e-2).momentum(0.5).weight_decay(1e-3));
    if (optimizer == "adagrad")
      return std::make_shared<torch::optim::Adagrad>(
        parameters(), torch::optim::AdagradOptions(0.1).initial_accumulator_value(0.1).lr_decay(0.01));
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

namespace {

/// FSDP whose backward runs on another thread that carries the training thread's
/// thread-local state, as autograd's device threads do for CUDA tensors: the observer
/// that gathers freed units must work there too.
class FSDPBackwardElsewhere : public FSDPStrategy {
 public:
  using FSDPStrategy::FSDPStrategy;
  void backward(const at::Tensor& loss) override {
    at::ThreadLocalState state;
    std::exception_ptr error;
    std::thread device_thread([&] {
      at::ThreadLocalStateGuard guard(state);
      try {
        FSDPStrategy::backward(loss);
      } catch (...) {
        error = std::current_exception();
      }
    });
    device_thread.join();
    if (error)
      std::rethrow_exception(error);
  }
};

} // namespace

TEST_CASE("FSDP gathers freed units in a backward that runs on another thread, as CUDA's autograd does", "[sharded][gpu_path]") {
  const int64_t batch = 6, steps = 4;
  auto reference = train_on(2, ddp, "adam", batch, steps);
  for (auto sharding : {ShardingStrategy::FULL_SHARD, ShardingStrategy::SHARD_GRAD_OP}) {
    CAPTURE(to_string(sharding));
    auto sharded = train_on(2, [&] { return FSDPBackwardElsewhere({.sharding_strategy = sharding}); }, "adam",
                            batch, steps);
    CHECK(test::max_param_diff(*sharded, *reference) < 2e-5);
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
                              StateDict* restored = nullptr,
                              std::vector<int64_t>* load_peaks = nullptr) {
  if (load_peaks)
    load_peaks->assign(static_cast<size_t>(world), -1);
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
    if (load_peaks)
      if (auto* sharded = dynamic_cast<ShardedStrategy*>(&trainer.strategy()))
        (*load_peaks)[static_cast<size_t>(rank)] = sharded->last_load_peak_bytes();
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

TEST_CASE("A sharded checkpoint saved after fit resumes like one saved during it", "[sharded][checkpoint]") {
  for (auto& v : {Variant{"zero_stage_2", [] { return ZeroStrategy(zero(2)); }},
                  Variant{"fsdp", [] { return FSDPStrategy(); }}}) {
    CAPTURE(v.name);
    test::TempDir dir;
    auto saved = dir / "after_fit";
    auto straight = run_ckpt(2, v.make, 6, "", "");
    auto data = classification_data(12 * 8);
    run_gloo_ranks(2, [&](int rank, std::shared_ptr<Communicator> comm) {
      auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<Net>("adamw"); });
      auto o = options_for(3);
      o.strategy = v.make();
      o.plugins = {StaticEnvironment(comm)};
      Trainer trainer(o);
      trainer.fit(model, data::DataLoader(data, {.batch_size = 6}));
      trainer.save_checkpoint(saved); // collective, after the strategy's teardown
    });
    auto resumed = run_ckpt(2, v.make, 6, saved, "");
    CHECK(test::max_param_diff(*resumed, *straight) < 2e-5);
  }
}

TEST_CASE("Loading a sharded checkpoint reads on each rank only the saved shards holding its elements, one at a time", "[sharded][checkpoint][memory]") {
  for (auto& v : {Variant{"zero_stage_1", [] { return ZeroStrategy({.stage = 1}); }},
                  Variant{"zero_stage_2", [] { return ZeroStrategy(zero(2)); }},
                  Variant{"fsdp", [] { return FSDPStrategy(); }}}) {
    CAPTURE(v.name);
    test::TempDir dir;
    auto saved = dir / "two";
    auto straight = run_ckpt(2, v.make, 6, "", "");
    run_ckpt(2, v.make, 3, "", saved);
    auto checkpoint = Checkpoint::from_directory(saved);
    auto bytes_of = [&](int64_t r) {
      int64_t total = 0;
      for (auto& item : load_state_dict_file(checkpoint.file(shard_file(r))))
        total += static_cast<int64_t>(item.value().nbytes());
      return total;
    };
    int64_t shard0 = bytes_of(0), shard1 = bytes_of(1);
    // The same world size: each rank reads its own shard, never both (consolidation did).
    std::vector<int64_t> peaks;
    StateDict restored;
    auto resumed = run_ckpt(2, v.make, 6, saved, "", &restored, &peaks);
    CHECK(peaks[0] == shard0);
    CHECK(peaks[1] == shard1);
    CHECK(test::max_param_diff(*resumed, *straight) < 2e-5);
    check_equal(restored, consolidate(checkpoint).model);
    // Resharded onto 3 ranks: at most one saved shard at a time.
    run_ckpt(3, v.make, 6, saved, "", nullptr, &peaks);
    for (auto peak : peaks) {
      CHECK(peak > 0);
      CHECK(peak <= std::max(shard0, shard1));
    }
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

// -- optimizer state and hyperparameters across strategies -----------------------------

namespace {

namespace O = torch::optim;

/// Every option of every param group of `optimizer`, as text: what a resume must bring back.
std::string describe(const O::Optimizer& optimizer) {
  std::ostringstream os;
  os.precision(12);
  for (auto& group : optimizer.param_groups()) {
    auto& o = group.options();
    if (auto* a = dynamic_cast<const O::AdamOptions*>(&o))
      os << "adam lr=" << a->lr() << " betas=" << std::get<0>(a->betas()) << ","
         << std::get<1>(a->betas()) << " eps=" << a->eps() << " wd=" << a->weight_decay()
         << " amsgrad=" << a->amsgrad();
    else if (auto* w = dynamic_cast<const O::AdamWOptions*>(&o))
      os << "adamw lr=" << w->lr() << " betas=" << std::get<0>(w->betas()) << ","
         << std::get<1>(w->betas()) << " eps=" << w->eps() << " wd=" << w->weight_decay()
         << " amsgrad=" << w->amsgrad();
    else if (auto* s = dynamic_cast<const O::SGDOptions*>(&o))
      os << "sgd lr=" << s->lr() << " momentum=" << s->momentum() << " dampening=" << s->dampening()
         << " wd=" << s->weight_decay() << " nesterov=" << s->nesterov();
    else if (auto* r = dynamic_cast<const O::RMSpropOptions*>(&o))
      os << "rmsprop lr=" << r->lr() << " alpha=" << r->alpha() << " eps=" << r->eps()
         << " wd=" << r->weight_decay() << " momentum=" << r->momentum() << " centered=" << r->centered();
    else if (auto* g = dynamic_cast<const O::AdagradOptions*>(&o))
      os << "adagrad lr=" << g->lr() << " lr_decay=" << g->lr_decay() << " wd=" << g->weight_decay()
         << " init=" << g->initial_accumulator_value() << " eps=" << g->eps();
    os << "; ";
  }
  return os.str();
}

/// Net with two param groups (fc1; fc2 and fc3 with their own weight decay) and a StepLR
/// stepping every optimizer step (halving the rate every 2 steps).
class GroupedNet : public Net {
 public:
  using Net::Net;

  Optimizers configure_optimizers() override {
    std::vector<at::Tensor> first, rest;
    for (auto& item : named_parameters())
      (item.key().rfind("fc1.", 0) == 0 ? first : rest).push_back(item.value());
    if (optimizer == "adam")
      return grouped<O::Adam>(first, rest, O::AdamOptions(1e-2), O::AdamOptions(1e-2).weight_decay(1e-3));
    if (optimizer == "adamw")
      return grouped<O::AdamW>(first, rest, O::AdamWOptions(1e-2).weight_decay(0.1),
                               O::AdamWOptions(1e-2).weight_decay(1e-2));
    if (optimizer == "rmsprop")
      return grouped<O::RMSprop>(first, rest, O::RMSpropOptions(1e-2).momentum(0.5),
                                 O::RMSpropOptions(1e-2).weight_decay(1e-3));
    if (optimizer == "adagrad")
      return grouped<O::Adagrad>(first, rest, O::AdagradOptions(0.1),
                                 O::AdagradOptions(0.1).weight_decay(1e-3));
    return grouped<O::SGD>(first, rest, O::SGDOptions(0.1).momentum(0.9),
                           O::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
  }

 private:
  template <class Opt, class Options>
  static Optimizers grouped(std::vector<at::Tensor> first, std::vector<at::Tensor> rest,
                            Options defaults, Options second) {
    std::vector<O::OptimizerParamGroup> groups;
    groups.emplace_back(std::move(first));
    groups.emplace_back(std::move(rest), std::make_unique<Options>(second));
    auto opt = std::make_shared<Opt>(std::move(groups), defaults);
    return {opt, {std::make_shared<StepLR>(opt, 2, 0.5), Interval::step}};
  }
};

/// At step 2, changes options no scheduler owns, as a user's callback may: group 1's
/// weight decay and one more option of each optimizer type.
class Retune : public Callback {
 public:
  void on_train_batch_end(Trainer& t, LightningModule&, const at::Tensor&, const Batch&,
                          int64_t) override {
    if (t.global_step() != 2)
      return;
    for (auto& opt : t.optimizers()) {
      auto& o = opt->param_groups()[1].options();
      if (auto* a = dynamic_cast<O::AdamOptions*>(&o))
        a->weight_decay(0.05).betas({0.8, 0.99});
      else if (auto* w = dynamic_cast<O::AdamWOptions*>(&o))
        w->weight_decay(0.05).eps(1e-6);
      else if (auto* s = dynamic_cast<O::SGDOptions*>(&o))
        s->weight_decay(0.05).momentum(0.5);
      else if (auto* r = dynamic_cast<O::RMSpropOptions*>(&o))
        r->weight_decay(0.05).alpha(0.9);
      else if (auto* g = dynamic_cast<O::AdagradOptions*>(&o))
        g->weight_decay(0.05).lr_decay(0.01);
    }
  }
};

/// The optimizers' options, the schedulers' step counts and rates, and this rank's
/// optimizer-state bytes at one moment.
struct OptimizerSnapshot {
  std::string options;
  std::vector<int64_t> scheduler_steps;
  std::vector<double> lrs;
  int64_t state_bytes = 0;
};

OptimizerSnapshot snapshot(Trainer& t) {
  OptimizerSnapshot s;
  for (auto& opt : t.optimizers())
    s.options += describe(*opt);
  for (auto& sc : t.lr_scheduler_configs()) {
    s.scheduler_steps.push_back(sc.scheduler->last_epoch());
    for (auto lr : sc.scheduler->get_last_lr())
      s.lrs.push_back(lr);
  }
  s.state_bytes = t.strategy().memory_stats().optimizer_state_bytes;
  return s;
}

/// Takes snapshots when training starts (right after a restore) and after step `step`.
class Snapshots : public Callback {
 public:
  Snapshots(int64_t step, OptimizerSnapshot* at_start, OptimizerSnapshot* at_step)
    : step_(step), at_start_(at_start), at_step_(at_step) {}

  void on_train_start(Trainer& t, LightningModule&) override {
    *at_start_ = snapshot(t);
  }

  void on_train_batch_end(Trainer& t, LightningModule&, const at::Tensor&, const Batch&,
                          int64_t) override {
    if (t.global_step() == step_)
      *at_step_ = snapshot(t);
  }

 private:
  int64_t step_;
  OptimizerSnapshot* at_start_;
  OptimizerSnapshot* at_step_;
};

/// Rank 0's view of one GroupedNet run.
struct GroupedRun {
  std::shared_ptr<Net> model;
  OptimizerSnapshot at_start; // right after the restore, when resuming
  OptimizerSnapshot at_step3; // after the third optimizer step
};

/// Trains GroupedNet(`optimizer`) on `world` ranks (global batch 12) up to `steps`, with
/// Retune, resuming from `resume` when given and saving at the end to `save` when given.
GroupedRun run_grouped(int world, const StrategyMaker& make, const std::string& optimizer,
                       int64_t steps, const std::string& resume, const std::string& save) {
  auto data = classification_data(12 * 8);
  GroupedRun result;
  std::mutex mtx;
  auto body = [&](int rank, std::shared_ptr<Communicator> comm) {
    auto model = with_seed(static_cast<uint64_t>(rank), [&] { return std::make_shared<GroupedNet>(optimizer); });
    GroupedRun mine;
    auto o = options_for(steps);
    o.strategy = make();
    if (comm)
      o.plugins = {StaticEnvironment(comm)};
    o.callbacks = {std::make_shared<Retune>(), std::make_shared<SaveAtEnd>(save, nullptr),
                   std::make_shared<Snapshots>(3, &mine.at_start, &mine.at_step3)};
    Trainer trainer(o);
    trainer.fit(model, data::DataLoader(data, {.batch_size = 12 / world}), std::nullopt, resume);
    std::lock_guard<std::mutex> guard(mtx);
    if (rank == 0) {
      mine.model = model;
      result = mine;
    }
  };
  if (world == 1)
    body(0, nullptr);
  else
    run_gloo_ranks(world, body);
  return result;
}

StrategyOption single_device() {
  return "single_device";
}

/// Checks that `resumed` came back with `reference`'s optimizer options and schedulers
/// (as they were after step 3) and ended at its weights.
void check_resumed_like(const GroupedRun& resumed, const GroupedRun& reference) {
  CHECK(resumed.at_start.options == reference.at_step3.options);
  CHECK(resumed.at_start.scheduler_steps == reference.at_step3.scheduler_steps);
  REQUIRE(resumed.at_start.lrs.size() == reference.at_step3.lrs.size());
  for (size_t i = 0; i < resumed.at_start.lrs.size(); ++i)
    CHECK(resumed.at_start.lrs[i] == Approx(reference.at_step3.lrs[i]));
  CHECK(test::max_param_diff(*resumed.model, *reference.model) < 2e-5);
}

std::vector<Variant> sharded_targets() {
  return {{"zero_stage_1", [] { return ZeroStrategy(zero(1)); }},
          {"zero_stage_2", [] { return ZeroStrategy(zero(2)); }},
          {"fsdp", [] { return FSDPStrategy(); }}};
}

} // namespace

TEST_CASE("A sharded checkpoint restores every param-group option and the scheduler, onto any world size, DDP or one process", "[sharded][checkpoint][optimizer]") {
  for (std::string optimizer : {"adam", "sgd", "rmsprop"}) {
    auto straight = run_grouped(1, single_device, optimizer, 6, "", "");
    // The run changed options on its way (the scheduler's lr, Retune's options), so a
    // fresh optimizer does not have them: the checkpoint must bring them back.
    REQUIRE(straight.at_step3.options != straight.at_start.options);
    REQUIRE(straight.at_step3.options.find("wd=0.05") != std::string::npos);
    for (auto& v : sharded_targets()) {
      test::TempDir dir;
      auto saved = dir / "ckpt";
      run_grouped(2, v.make, optimizer, 3, "", saved);
      REQUIRE(Checkpoint::from_directory(saved).has_file(kOptimizerOptionsFile));
      for (auto& [world, target] : std::vector<std::pair<int, Variant>>{
             {2, v}, {3, v}, {2, {"ddp", ddp}}, {1, {"single_device", single_device}}}) {
        CAPTURE(optimizer, v.name, world, target.name);
        check_resumed_like(run_grouped(world, target.make, optimizer, 6, saved, ""), straight);
      }
    }
  }
}

TEST_CASE("A DDP checkpoint resumed under ZeRO-1, ZeRO-2 or FSDP on 2 and 3 ranks restores the optimizer state, sharded, and continues like an uninterrupted DDP run", "[sharded][checkpoint][optimizer]") {
  for (std::string optimizer : {"adam", "sgd"}) {
    auto straight = run_grouped(2, ddp, optimizer, 6, "", "");
    test::TempDir dir;
    auto saved = dir / "ddp";
    auto first = run_grouped(2, ddp, optimizer, 3, "", saved);
    // The checkpoint holds per-parameter state (Adam's moments, SGD's momentum buffers),
    // read back by param group and index.
    auto checkpoint = Checkpoint::from_directory(saved);
    REQUIRE_FALSE(is_sharded(checkpoint));
    auto like = GroupedNet(optimizer).configure_optimizers().optimizers;
    auto state = read_saved_optimizers(read_file(checkpoint.file("optimizer.pt")), like, saved);
    REQUIRE(state.size() == 1);
    REQUIRE(state[0].groups.size() == 2);
    CHECK(state[0].groups[0].state.size() == 2); // fc1.weight, fc1.bias
    CHECK(state[0].groups[1].state.size() == 4);
    for (auto& group : state[0].groups)
      for (auto& param : group.state)
        CHECK(param.count(optimizer == "adam" ? "exp_avg" : "momentum_buffer"));
    auto full_bytes = first.at_step3.state_bytes;
    for (auto& v : sharded_targets()) {
      for (int world : {2, 3}) {
        CAPTURE(optimizer, v.name, world);
        auto resumed = run_grouped(world, v.make, optimizer, 6, saved, "");
        check_resumed_like(resumed, straight);
        // Each rank holds only its shard of the restored state (1/world, plus padding).
        CHECK(resumed.at_start.state_bytes > 0);
        CHECK(resumed.at_start.state_bytes <= full_bytes / world + 1024);
      }
    }
  }
}

TEST_CASE("A DDP checkpoint restores the optimizer's options in DDP and in one process too", "[checkpoint][optimizer]") {
  auto straight = run_grouped(2, ddp, "adamw", 6, "", "");
  test::TempDir dir;
  run_grouped(2, ddp, "adamw", 3, "", dir / "ddp");
  for (auto& [world, target] : std::vector<std::pair<int, Variant>>{
         {2, {"ddp", ddp}}, {1, {"single_device", single_device}}}) {
    CAPTURE(world, target.name);
    check_resumed_like(run_grouped(world, target.make, "adamw", 6, dir / "ddp", ""), straight);
  }
}

TEST_CASE("ZeRO and FSDP step every optimizer they accept (Adam, AdamW, SGD, RMSprop, Adagrad) like DDP", "[sharded][optimizer]") {
  for (std::string optimizer : {"adam", "adamw", "sgd", "rmsprop", "adagrad"}) {
    for (int world : {2, 3}) {
      auto reference = train_on(world, ddp, optimizer, 6, 5);
      auto start = with_seed(0, [&] { return std::make_shared<Net>(optimizer); });
      REQUIRE(test::max_param_diff(*reference, *start) > 1e-3); // the optimizer moved the weights
      for (auto& v : sharded_variants()) {
        CAPTURE(optimizer, world, v.name);
        CHECK(test::max_param_diff(*train_on(world, v.make, optimizer, 6, 5), *reference) < 2e-5);
      }
    }
  }
}

TEST_CASE("An Adagrad run under ZeRO-2 and FSDP resumes from its sharded checkpoint like an uninterrupted one", "[sharded][optimizer][checkpoint]") {
  auto straight = run_grouped(1, single_device, "adagrad", 6, "", "");
  for (auto& v : sharded_targets()) {
    CAPTURE(v.name);
    test::TempDir dir;
    run_grouped(2, v.make, "adagrad", 3, "", dir / "ckpt");
    check_resumed_like(run_grouped(3, v.make, "adagrad", 6, dir / "ckpt", ""), straight);
  }
}

namespace {

/// Rank 0's module after `world` ranks ran: optionally a validate(), then a fit of 3 steps,
/// then (in a second Trainer) another fit of 3 steps, all with the strategy `make` gives:
/// one object for everything when `shared`, else a new one per Trainer.
std::shared_ptr<Net> set_up_twice(int world, const StrategyMaker& make, bool validate_first,
                                  bool shared) {
  auto data = classification_data(12 * 8);
  std::shared_ptr<Net> rank0;
  std::mutex mtx;
  run_gloo_ranks(world, [&](int rank, std::shared_ptr<Communicator> comm) {
    auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<Net>("adam"); });
    auto strategy = make();
    auto loader = data::DataLoader(data, {.batch_size = 12 / world});
    for (int fit = 0; fit < 2; ++fit) {
      auto o = options_for(3);
      o.strategy = shared ? strategy : make();
      o.plugins = {StaticEnvironment(comm)};
      Trainer trainer(o);
      if (validate_first && fit == 0)
        trainer.validate(model, loader);
      trainer.fit(model, loader);
    }
    std::lock_guard<std::mutex> guard(mtx);
    if (rank == 0)
      rank0 = model;
  });
  return rank0;
}

} // namespace

TEST_CASE("A strategy set up twice works: validate then fit, and two fits in a row, under every strategy", "[sharded][ddp][setup]") {
  auto reference = set_up_twice(2, ddp, false, false);
  auto variants = sharded_variants();
  variants.insert(variants.begin(), Variant{"ddp", ddp});
  for (auto& v : variants) {
    for (bool validate_first : {true, false}) {
      CAPTURE(v.name, validate_first);
      CHECK(test::max_param_diff(*set_up_twice(2, v.make, validate_first, true), *reference) < 2e-5);
    }
  }
}

namespace {

/// A communicator that counts what a strategy asks of the one it wraps.
class CountingCommunicator : public Communicator {
 public:
  explicit CountingCommunicator(std::shared_ptr<Communicator> inner) : inner_(std::move(inner)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }

  std::shared_ptr<Work> allreduce(at::Tensor tensor, ReduceOp op) override {
    ++allreduces;
    return inner_->allreduce(std::move(tensor), op);
  }
  std::shared_ptr<Work> broadcast(at::Tensor tensor, int root) override {
    return inner_->broadcast(std::move(tensor), root);
  }
  std::shared_ptr<Work> allgather(at::Tensor input, at::Tensor output) override {
    return inner_->allgather(std::move(input), std::move(output));
  }
  std::shared_ptr<Work> reduce_scatter(at::Tensor input, at::Tensor output, ReduceOp op) override {
    ++reduce_scatters;
    return inner_->reduce_scatter(std::move(input), std::move(output), op);
  }
  std::shared_ptr<Work> barrier() override { return inner_->barrier(); }
  void close() override { inner_->close(); }
  bool closed() const override { return inner_->closed(); }

  std::atomic<int> allreduces{0};
  std::atomic<int> reduce_scatters{0};

 private:
  std::shared_ptr<Communicator> inner_;
};

/// The communicator's reduce-scatter count at the end of every training batch.
class CountPerBatch : public Callback {
 public:
  explicit CountPerBatch(std::shared_ptr<CountingCommunicator> comm) : comm_(std::move(comm)) {}
  void on_train_batch_end(Trainer&, LightningModule&, const at::Tensor&, const Batch&,
                          int64_t) override {
    counts.push_back(comm_->reduce_scatters.load());
  }
  std::vector<int> counts;

 private:
  std::shared_ptr<CountingCommunicator> comm_;
};

} // namespace

TEST_CASE("FSDP and ZeRO-2 under gradient accumulation reduce nothing until the window's last micro-batch", "[sharded][accumulate]") {
  constexpr int64_t kAccumulate = 4, kSteps = 2, kBatch = 4;
  for (auto& v : sharded_variants()) {
    if (v.name == "zero_stage_1" || v.name == "fsdp NO_SHARD")
      continue; // persistent gradients, or all-reduce: reduced once per window already
    CAPTURE(v.name);
    auto data = classification_data(2 * kBatch * kSteps * kAccumulate);
    std::vector<std::vector<int>> counts(2);
    std::vector<size_t> flats(2);
    std::shared_ptr<Net> rank0;
    run_gloo_ranks(2, [&](int rank, std::shared_ptr<Communicator> comm) {
      auto counting = std::make_shared<CountingCommunicator>(comm);
      auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<Net>("adam"); });
      auto o = options_for(kSteps, kAccumulate);
      o.strategy = v.make();
      o.plugins = {StaticEnvironment(counting)};
      auto counter = std::make_shared<CountPerBatch>(counting);
      o.callbacks = {counter};
      Trainer trainer(o);
      trainer.fit(model, data::DataLoader(data, {.batch_size = kBatch}));
      counts[static_cast<size_t>(rank)] = counter->counts;
      flats[static_cast<size_t>(rank)] =
        dynamic_cast<ShardedStrategy&>(trainer.strategy()).flats().size();
      if (rank == 0)
        rank0 = model;
    });
    for (size_t r = 0; r < 2; ++r) {
      CAPTURE(r);
      REQUIRE(counts[r].size() == static_cast<size_t>(kSteps * kAccumulate));
      int f = static_cast<int>(flats[r]);
      // Per batch: 0, 0, 0, one per flat; then the same for the second window.
      std::vector<int> expected;
      for (int64_t s = 0; s < kSteps; ++s)
        for (int64_t m = 0; m < kAccumulate; ++m)
          expected.push_back(static_cast<int>(s) * f + (m + 1 == kAccumulate ? f : 0));
      CHECK(counts[r] == expected);
    }
    auto reference = train_on(2, ddp, "adam", kBatch, kSteps, kAccumulate);
    CHECK(test::max_param_diff(*rank0, *reference) < 2e-5);
  }
}

namespace {

/// Reads parameters after training batches (on_train_batch_end: outside every step).
class ReadParameters : public Callback {
 public:
  ReadParameters(int rank, bool summon) : rank(rank), summon(summon) {}

  void on_train_batch_end(Trainer& trainer, LightningModule& module, const at::Tensor&,
                          const Batch&, int64_t batch_idx) override {
    auto& net = dynamic_cast<Net&>(module);
    if (!summon) {
      if (rank == 0 && batch_idx == 1) // one rank, as a logger on rank 0 would
        read_outside = net.fc1->weight.norm().item<double>();
      return;
    }
    {
      auto full = trainer.strategy().summon_full_params();
      std::vector<at::Tensor> all;
      for (auto& p : net.parameters())
        all.push_back(p.detach().flatten().clone());
      seen.push_back(torch::cat(all));
    }
    if (batch_idx != 1)
      return;
    torch::NoGradGuard no_grad;
    {
      auto full = trainer.strategy().summon_full_params(); // writeback
      net.fc3->bias.zero_();
    }
    {
      auto full = trainer.strategy().summon_full_params(/*writeback=*/false);
      net.fc3->bias.fill_(5.0); // discarded
    }
    auto full = trainer.strategy().summon_full_params();
    bias_after_edits = net.fc3->bias.abs().sum().item<double>();
  }

  int rank;
  bool summon;
  double read_outside = 0;
  std::vector<at::Tensor> seen;
  double bias_after_edits = -1;
};

} // namespace

TEST_CASE("FSDP: a parameter read on one rank outside a step is a clear error naming summon_full_params, not a desync or a crash", "[sharded][summon]") {
  for (auto sharding : {ShardingStrategy::FULL_SHARD, ShardingStrategy::SHARD_GRAD_OP}) {
    CAPTURE(to_string(sharding));
    auto data = classification_data(2 * 4 * 4);
    std::vector<std::string> errors(2);
    std::vector<double> read(2, 0.0);
    std::mutex mtx;
    auto start = std::chrono::steady_clock::now();
    run_gloo_ranks(2, [&](int rank, std::shared_ptr<Communicator> comm) {
      auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<Net>(); });
      auto o = options_for(4);
      o.strategy = FSDPStrategy({.sharding_strategy = sharding});
      o.plugins = {StaticEnvironment(comm)};
      auto reader = std::make_shared<ReadParameters>(rank, /*summon=*/false);
      o.callbacks = {reader};
      Trainer trainer(o);
      try {
        trainer.fit(model, data::DataLoader(data, {.batch_size = 4}));
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> guard(mtx);
        errors[static_cast<size_t>(rank)] = e.what();
        // As in a run: a failed rank's communicator closes, which ends its peers'
        // collectives at once.
        comm->close();
      }
      read[static_cast<size_t>(rank)] = reader->read_outside;
    });
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CAPTURE(errors[0], errors[1]);
    CHECK(std::isnan(read[0])); // the shard of the other rank is not here: NaN, not a crash
    CHECK_THAT(errors[0], Contains("summon_full_params") && Contains("'fc1.weight'") &&
                            Contains("outside a step") && Contains("rank 0"));
    CHECK_FALSE(errors[1].empty()); // its next collective ended with the group's
    CHECK(seconds < 15); // not the collective timeout (20 s)
  }
}

TEST_CASE("summon_full_params gives the whole parameters on every rank outside a step, under FSDP and ZeRO as under DDP, and keeps or discards what it writes", "[sharded][summon]") {
  constexpr int64_t kSteps = 4, kBatch = 4;
  auto data = classification_data(2 * kBatch * kSteps);
  auto train = [&](const StrategyMaker& make) {
    std::vector<std::shared_ptr<ReadParameters>> readers(2);
    std::shared_ptr<Net> rank0;
    run_gloo_ranks(2, [&](int rank, std::shared_ptr<Communicator> comm) {
      auto model = with_seed(static_cast<uint64_t>(rank), [] { return std::make_shared<Net>("adam"); });
      auto o = options_for(kSteps);
      o.strategy = make();
      o.plugins = {StaticEnvironment(comm)};
      readers[static_cast<size_t>(rank)] = std::make_shared<ReadParameters>(rank, /*summon=*/true);
      o.callbacks = {readers[static_cast<size_t>(rank)]};
      Trainer trainer(o);
      trainer.fit(model, data::DataLoader(data, {.batch_size = kBatch}));
      if (rank == 0)
        rank0 = model;
    });
    return std::make_pair(readers, rank0);
  };
  auto [reference, reference_model] = train(ddp); // whole parameters: summon only keeps a copy
  REQUIRE(reference[0]->seen.size() == static_cast<size_t>(kSteps));
  CHECK(reference[0]->bias_after_edits == 0.0);
  for (auto& v : sharded_variants()) {
    CAPTURE(v.name);
    auto [readers, model] = train(v.make);
    for (size_t r = 0; r < 2; ++r) {
      CAPTURE(r);
      REQUIRE(readers[r]->seen.size() == static_cast<size_t>(kSteps));
      for (size_t b = 0; b < readers[r]->seen.size(); ++b) {
        CAPTURE(b);
        // The whole parameters, the same on both ranks and as DDP's at that batch.
        CHECK(readers[r]->seen[b].numel() == 163);
        CHECK((readers[r]->seen[b] - reference[0]->seen[b]).abs().max().item<double>() < 2e-5);
      }
      CHECK(readers[r]->bias_after_edits == 0.0); // kept with writeback, discarded without
    }
    CHECK(test::max_param_diff(*model, *reference_model) < 2e-5);
  }
}
