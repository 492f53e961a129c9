// TorchTrainer: workers as actors, reports as messages, failures and bad configurations.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

/// An actor system with caftrain's types registered, as a program would make one.
using System = test::ActorSystem;

TorchTrainerOptions options_in(const test::TempDir& dir, int64_t workers) {
  TorchTrainerOptions o;
  o.scaling.num_workers = workers;
  o.run.storage_path = dir.path();
  o.run.name = "run";
  return o;
}

/// What a subscriber actor saw.
struct Seen {
  std::mutex mtx;
  std::vector<ReportRecord> records;
  std::optional<Result> done;
};

caf::behavior subscriber(caf::event_based_actor*, std::shared_ptr<Seen> seen) {
  return {
    [=](const ReportRecord& r) {
      std::lock_guard<std::mutex> guard(seen->mtx);
      seen->records.push_back(r);
    },
    [=](done_atom, const Result& r) {
      std::lock_guard<std::mutex> guard(seen->mtx);
      seen->done = r;
    },
  };
}

/// A classifier whose rank `fail_rank` throws at global step `fail_step`.
class Faulty : public LightningModule {
 public:
  Faulty(int64_t fail_rank, int64_t fail_step) : fail_rank(fail_rank), fail_step(fail_step) {
    fc = register_module("fc", torch::nn::Linear(8, 3));
  }
  at::Tensor training_step(const Batch& batch, int64_t) override {
    if (train::get_context().world_rank == fail_rank && global_step() == fail_step)
      throw std::runtime_error("injected failure at step " + std::to_string(fail_step));
    auto loss = torch::nn::functional::cross_entropy(fc->forward(batch.data), batch.target);
    log("loss", loss);
    return loss;
  }
  Optimizers configure_optimizers() override {
    return std::make_shared<torch::optim::SGD>(parameters(), torch::optim::SGDOptions(0.1));
  }
  int64_t fail_rank, fail_step;
  torch::nn::Linear fc{nullptr};
};

std::shared_ptr<data::TensorDataset> small_data() {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  return std::make_shared<data::TensorDataset>(torch::randn({512, 8}, gen),
                                               torch::randint(0, 3, {512}, gen));
}

} // namespace

TEST_CASE("A 2-worker run returns rank 0's metrics per report in order, and a subscriber sees them too", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  auto fn = [](const Config& config) {
    auto rank = train::get_context().world_rank;
    for (int64_t i = 0; i < config.get<int64_t>("reports"); ++i)
      train::report({{"i", static_cast<double>(i)}, {"rank", static_cast<double>(rank)}});
  };
  auto o = options_in(dir, 2);
  o.train_loop_config = {{"reports", int64_t{5}}};
  TorchTrainer trainer(s.sys, fn, o);
  auto seen = std::make_shared<Seen>();
  auto sub = s.sys.spawn(subscriber, seen);
  caf::anon_send(trainer.actor(), subscribe_atom::value, sub);
  auto result = trainer.fit();
  REQUIRE(result.ok());
  REQUIRE(result.metrics_history.size() == 5);
  for (size_t i = 0; i < 5; ++i) {
    auto& rec = result.metrics_history[i];
    CHECK(rec.index == static_cast<int64_t>(i));
    CHECK(rec.attempt == 0);
    CHECK(rec.metrics.at("i") == i);
    CHECK(rec.metrics.at("rank") == 0);
    REQUIRE(rec.all_metrics.size() == 2);
    CHECK(rec.all_metrics[1].at("rank") == 1);
  }
  CHECK(result.metrics.at("i") == 4);
  CHECK(result.path == dir / "run");
  // The subscriber got the same reports, then the result (allow a loaded machine 10 s).
  for (int i = 0; i < 1000; ++i) {
    std::lock_guard<std::mutex> guard(seen->mtx);
    if (seen->done)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::lock_guard<std::mutex> guard(seen->mtx);
  REQUIRE(seen->records.size() == 5);
  for (size_t i = 0; i < 5; ++i)
    CHECK(seen->records[i].metrics == result.metrics_history[i].metrics);
  REQUIRE(seen->done);
  CHECK(seen->done->metrics == result.metrics);
}

TEST_CASE("Workers see their ranks, threads and the run's config", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  std::mutex mtx;
  std::vector<WorkerContext> contexts;
  std::vector<int> threads;
  auto o = options_in(dir, 2);
  TorchTrainer trainer(s.sys, [&] {
    std::lock_guard<std::mutex> guard(mtx);
    contexts.push_back(train::get_context());
    threads.push_back(at::get_num_threads());
    CHECK_FALSE(train::get_checkpoint().has_value());
  }, o);
  REQUIRE(trainer.fit().ok());
  REQUIRE(contexts.size() == 2);
  std::sort(contexts.begin(), contexts.end(),
            [](auto& a, auto& b) { return a.world_rank < b.world_rank; });
  CHECK(contexts[1].world_rank == 1);
  CHECK(contexts[1].world_size == 2);
  CHECK(contexts[1].local_world_size == 2);
  CHECK(contexts[0].device == "cpu");
  CHECK(contexts[0].run_dir == dir / "run");
  auto expected = std::max<int>(1, static_cast<int>(std::thread::hardware_concurrency()) / 2);
  for (auto t : threads)
    CHECK(t == expected);
}

TEST_CASE("DDP training under TorchTrainer reports metrics and checkpoints every epoch", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  auto fn = [](const Config&) {
    auto model = with_seed(0, [] { return std::make_shared<Faulty>(-1, -1); });
    Trainer trainer({.max_epochs = 2,
                     .strategy = DDPStrategy(),
                     .plugins = {ActorEnvironment()},
                     .callbacks = {ReportCallback()},
                     .logger = false,
                     .enable_progress_bar = false});
    trainer = prepare_trainer(std::move(trainer));
    trainer.fit(model, data::DataLoader(small_data(), {.batch_size = 32, .shuffle = true}));
  };
  auto result = TorchTrainer(s.sys, fn, options_in(dir, 2)).fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  REQUIRE(result.metrics_history.size() == 2);
  CHECK(result.metrics.at("epoch") == 1);
  CHECK(result.metrics.at("step") == 16); // 512 / 2 ranks / 32 per batch = 8 steps per epoch
  CHECK(result.metrics.count("loss") == 1);
  REQUIRE(result.checkpoint);
  CHECK(result.checkpoint->metadata().report_index == 1);
  CHECK_NOTHROW(result.checkpoint->validate());
  CHECK(result.checkpoint->model_state_dict().contains("fc.weight"));
  CHECK(result.best_checkpoints.size() == 2);
}

TEST_CASE("A throw on rank 1 at step 3 ends the run with Result.error within 10 s", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  auto fn = [](const Config&) {
    auto model = with_seed(0, [] { return std::make_shared<Faulty>(1, 3); });
    Trainer trainer({.max_epochs = 5,
                     .strategy = DDPStrategy(),
                     .plugins = {ActorEnvironment()},
                     .logger = false,
                     .enable_progress_bar = false});
    trainer.fit(model, data::DataLoader(small_data(), {.batch_size = 16}));
  };
  auto start = std::chrono::steady_clock::now();
  auto result = TorchTrainer(s.sys, fn, options_in(dir, 2)).fit();
  auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  REQUIRE(result.error);
  CHECK(result.error->rank == 1);
  CHECK_THAT(result.error->message, Contains("rank 1") && Contains("injected failure at step 3"));
  CHECK(seconds < 10);
  CHECK(result.attempts == 1);
}

TEST_CASE("A rank that stops reporting ends the run with an error naming it", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  SECTION("it returns early") {
    auto fn = [] {
      auto n = train::get_context().world_rank == 1 ? 2 : 3;
      for (int i = 0; i < n; ++i)
        train::report({{"i", double(i)}});
    };
    auto result = TorchTrainer(s.sys, fn, options_in(dir, 2)).fit();
    REQUIRE(result.error);
    CHECK(result.error->rank == 1);
    CHECK_THAT(result.error->message, Contains("rank 1") && Contains("report #2"));
  }
  SECTION("it hangs") {
    auto fn = [] {
      train::report({{"i", 0.0}});
      if (train::get_context().world_rank == 1)
        std::this_thread::sleep_for(std::chrono::seconds(2));
      else
        train::report({{"i", 1.0}});
    };
    auto o = options_in(dir, 2);
    o.run.report_timeout = std::chrono::milliseconds(300);
    auto start = std::chrono::steady_clock::now();
    auto result = TorchTrainer(s.sys, fn, o).fit();
    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    REQUIRE(result.error);
    CHECK(result.error->code == Errc::report_timeout);
    CHECK_THAT(result.error->message, Contains("rank 1 did not reach report #1"));
    CHECK(seconds < 5);
  }
}

/// Every state a run enters, as its RunCallback sees them.
class StateRecorder : public RunCallback {
 public:
  void on_state(const RunStatus& status) override {
    std::lock_guard<std::mutex> guard(mtx_);
    states_.push_back(status.state);
    last_ = status.states;
  }
  std::vector<std::string> states() const {
    std::lock_guard<std::mutex> guard(mtx_);
    return states_;
  }
  /// `RunStatus::states` of the last call.
  std::vector<std::string> last() const {
    std::lock_guard<std::mutex> guard(mtx_);
    return last_;
  }

 private:
  mutable std::mutex mtx_;
  std::vector<std::string> states_, last_;
};

TEST_CASE("A service actor can start a run, watch its status and cancel it by messages", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  std::atomic<bool> release{false};
  auto fn = [&] {
    for (int i = 0; i < 1000 && !release; ++i) {
      train::report({{"i", double(i)}});
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  };
  auto recorder = std::make_shared<StateRecorder>();
  auto o = options_in(dir, 2);
  o.run.callbacks = {recorder};
  TorchTrainer trainer(s.sys, fn, o);
  auto seen = std::make_shared<Seen>();
  auto run = trainer.start();
  caf::anon_send(run, subscribe_atom::value, s.sys.spawn(subscriber, seen));
  caf::scoped_actor self{s.sys};
  RunStatus status;
  for (int i = 0; i < 400; ++i) {
    self->request(run, std::chrono::seconds(5), status_atom::value)
      .receive([&](RunStatus& st) { status = st; }, [&](caf::error& e) { FAIL(s.sys.render(e)); });
    if (status.reports >= 3)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(status.state == "running");
  const std::vector<std::string> so_far{"pending", "running"};
  CHECK(status.states == so_far);
  CHECK(status.reports >= 3);
  self->send(run, cancel_atom::value);
  Result result;
  self->request(run, std::chrono::seconds(30), fit_atom::value)
    .receive([&](Result& r) { result = r; }, [&](caf::error& e) { FAIL(s.sys.render(e)); });
  release = true;
  REQUIRE(result.error);
  CHECK(result.error->code == Errc::cancelled);
  const std::vector<std::string> entered{"running", "stopping", "aborted"};
  CHECK(recorder->states() == entered);
  const std::vector<std::string> all{"pending", "running", "stopping", "aborted"};
  CHECK(recorder->last() == all);
}

TEST_CASE("Bad run configurations are refused before anything starts", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  auto fn = [] {};
  auto refused = [&](TorchTrainerOptions o) {
    try {
      TorchTrainer(s.sys, fn, std::move(o));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  auto o = options_in(dir, 0);
  CHECK_THAT(refused(o), Contains("num_workers is 0"));
  o = options_in(dir, 2);
  o.scaling.use_gpu = true;
  if (!torch::cuda::is_available())
    CHECK_THAT(refused(o), Contains("use_gpu") && Contains("no CUDA GPU"));
  o = options_in(dir, 2);
  o.scaling.resources_per_worker.cpus = 64;
  CHECK_THAT(refused(o), Contains("CPUs") && Contains("resources_per_worker.cpus"));
  o = options_in(dir, 1);
  o.run.failure.max_failures = -2;
  CHECK_THAT(refused(o), Contains("max_failures"));
  o = options_in(dir, 1);
  o.run.checkpoint.checkpoint_score_order = "up";
  CHECK_THAT(refused(o), Contains("checkpoint_score_order"));
  o = options_in(dir, 1);
  o.run.checkpoint.num_to_keep = 0;
  CHECK_THAT(refused(o), Contains("num_to_keep"));
  o = options_in(dir, 1);
  o.run.name = "a/b";
  CHECK_THAT(refused(o), Contains("plain directory name"));
  CHECK_THROWS_WITH(TorchTrainer(s.sys, TrainFunc(), options_in(dir, 1)), Contains("empty"));
}

TEST_CASE("Outside a run, report warns once and does nothing, get_checkpoint is none and get_context is rank 0 of 1", "[torch_trainer]") {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  spdlog::default_logger()->sinks().push_back(sink);
  CHECK_NOTHROW(train::report({{"x", 1.0}}));
  CHECK_NOTHROW(train::report({{"x", 2.0}}));
  auto& sinks = spdlog::default_logger()->sinks();
  sinks.erase(std::remove(sinks.begin(), sinks.end(), sink), sinks.end());
  // Once per process (an earlier test case may have had it already), never per call.
  auto text = out.str();
  size_t warnings = 0;
  for (auto at = text.find("train::report outside"); at != std::string::npos;
       at = text.find("train::report outside", at + 1))
    ++warnings;
  CHECK(warnings <= 1);
  CHECK_FALSE(train::in_session());
  CHECK_FALSE(train::get_checkpoint().has_value());
  auto& ctx = train::get_context();
  CHECK(ctx.world_rank == 0);
  CHECK(ctx.world_size == 1);
  CHECK(ctx.local_rank == 0);
  CHECK(ctx.device == "cpu");
  CHECK(ctx.run_name.empty());
  CHECK_THROWS_WITH(train::session(), Contains("outside a TorchTrainer worker"));
  // prepare_trainer still checks what it can without a run.
  CHECK_THROWS_WITH(prepare_trainer(Trainer()), Contains("ActorEnvironment()"));
}

TEST_CASE("prepare_trainer inside a run refuses a trainer without ActorEnvironment, or one device for 2 workers", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  std::string message;
  std::mutex mtx;
  auto fn = [&] {
    try {
      prepare_trainer(Trainer({.enable_progress_bar = false}));
    } catch (const Error& e) {
      std::lock_guard<std::mutex> guard(mtx);
      message = e.what();
    }
  };
  REQUIRE(TorchTrainer(s.sys, fn, options_in(dir, 2)).fit().ok());
  CHECK_THAT(message, Contains("ActorEnvironment()"));
  message.clear();
  auto single = [&] {
    try {
      prepare_trainer(Trainer({.strategy = "single_device", .plugins = {ActorEnvironment()}}));
    } catch (const Error& e) {
      std::lock_guard<std::mutex> guard(mtx);
      message = e.what();
    }
  };
  auto o = options_in(dir, 2);
  o.run.name = "run2";
  REQUIRE(TorchTrainer(s.sys, single, o).fit().ok());
  CHECK_THAT(message, Contains("single_device") && Contains("DDPStrategy()"));
}

TEST_CASE("A training function runs unchanged in and out of a TorchTrainer", "[torch_trainer]") {
  std::atomic<int64_t> steps{0};
  auto fn = [&](const Config&) {
    auto model = with_seed(0, [] { return std::make_shared<Faulty>(-1, -1); });
    Trainer trainer({.max_epochs = 2,
                     .strategy = DDPStrategy(),
                     .plugins = {ActorEnvironment()},
                     .callbacks = {ReportCallback()},
                     .logger = false,
                     .enable_progress_bar = false});
    trainer = prepare_trainer(std::move(trainer));
    auto checkpoint = train::get_checkpoint();
    trainer.fit(model, data::DataLoader(small_data(), {.batch_size = 64}), std::nullopt,
                checkpoint ? checkpoint->path() : "");
    steps += trainer.global_step();
  };
  fn(Config{}); // called directly, as on a laptop
  CHECK(steps == 16); // 512 / 64 per batch, 2 epochs
  test::TempDir dir;
  System s;
  steps = 0;
  auto result = TorchTrainer(s.sys, fn, options_in(dir, 1)).fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  CHECK(steps == 16);
  CHECK(result.metrics_history.size() == 2);
  REQUIRE(result.checkpoint);
  CHECK(result.checkpoint->metadata().global_step == 16);
}

TEST_CASE("train::get_checkpoint right after a report with a checkpoint returns that checkpoint", "[torch_trainer]") {
  test::TempDir dir;
  System s;
  std::mutex mtx;
  std::vector<std::string> seen; // what each rank saw, in order
  auto fn = [&] {
    auto& ctx = train::get_context();
    auto scratch = std::filesystem::path(dir.path()) / ("scratch-" + std::to_string(ctx.world_rank));
    std::filesystem::create_directories(scratch);
    std::ofstream(scratch / ("rank" + std::to_string(ctx.world_rank))) << "state";
    auto before = train::get_checkpoint();
    train::report({{"i", 0.0}}, Checkpoint::from_directory(scratch.string()));
    auto after = train::get_checkpoint();
    train::report({{"i", 1.0}}); // no checkpoint: the latest one stays
    auto later = train::get_checkpoint();
    std::lock_guard<std::mutex> guard(mtx);
    seen.push_back(before ? before->path() : "none");
    seen.push_back(after ? after->path() : "none");
    seen.push_back(later ? later->path() : "none");
    seen.push_back(after && after->committed() ? std::to_string(after->metadata().report_index) : "-");
  };
  auto result = TorchTrainer(s.sys, fn, options_in(dir, 2)).fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  auto persisted = dir / "run/checkpoint_000000";
  REQUIRE(seen.size() == 8);
  for (size_t rank = 0; rank < 2; ++rank) {
    CAPTURE(rank);
    CHECK(seen[4 * rank] == "none");
    CHECK(seen[4 * rank + 1] == persisted);
    CHECK(seen[4 * rank + 2] == persisted);
    CHECK(seen[4 * rank + 3] == "0");
  }
  CHECK(result.checkpoint->path() == persisted);
}

TEST_CASE("fit after start returns the run's result even when the run ended meanwhile", "[torch_trainer]") {
  System s;
  test::TempDir dir;
  TorchTrainer trainer(s.sys, [] { train::report({{"loss", 0.5}}); }, options_in(dir, 1));
  trainer.start();
  auto result_file = std::filesystem::path(trainer.path()) / "result.json";
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!std::filesystem::exists(result_file) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(std::filesystem::exists(result_file));
  std::this_thread::sleep_for(std::chrono::milliseconds(100)); // the trainer actor is gone
  auto result = trainer.fit();
  INFO((result.error ? result.error->message : std::string("no error")));
  CHECK(result.ok());
  CHECK(result.metrics.at("loss") == 0.5);
  REQUIRE(result.metrics_history.size() == 1);
}
