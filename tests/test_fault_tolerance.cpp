// Failures and restarts: a run that loses a worker finishes as if it had not.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

// -- disk writes by thread ----------------------------------------------------------------
// The test binary's own fsync and remove: they count the calls made on CAF's scheduler
// threads (named "caf.multiplexer" by CAF 0.17), which must make none, then do the call.

namespace {

std::atomic<int64_t> syncs_seen{0};
std::atomic<int64_t> io_on_scheduler{0};
std::mutex io_mtx;
std::vector<std::string> io_on_scheduler_calls;

void note_io(const char* call) {
  char name[32] = {0};
  pthread_getname_np(pthread_self(), name, sizeof(name));
  if (std::strcmp(name, "caf.multiplexer") != 0)
    return;
  ++io_on_scheduler;
  std::lock_guard<std::mutex> guard(io_mtx);
  io_on_scheduler_calls.push_back(call);
}

template <class Fn>
Fn real(const char* symbol) {
  return reinterpret_cast<Fn>(dlsym(RTLD_NEXT, symbol));
}

} // namespace

extern "C" int fsync(int fd) {
  static auto fn = real<int (*)(int)>("fsync");
  ++syncs_seen;
  note_io("fsync");
  return fn(fd);
}

extern "C" int fdatasync(int fd) {
  static auto fn = real<int (*)(int)>("fdatasync");
  ++syncs_seen;
  note_io("fdatasync");
  return fn(fd);
}

extern "C" int unlink(const char* path) {
  static auto fn = real<int (*)(const char*)>("unlink");
  note_io("unlink");
  return fn(path);
}

extern "C" int rmdir(const char* path) {
  static auto fn = real<int (*)(const char*)>("rmdir");
  note_io("rmdir");
  return fn(path);
}

extern "C" int remove(const char* path) {
  static auto fn = real<int (*)(const char*)>("remove");
  note_io("remove");
  return fn(path);
}

namespace {

using System = test::ActorSystem;

class Classifier : public LightningModule {
 public:
  Classifier() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
  }
  at::Tensor training_step(const Batch& batch, int64_t) override {
    auto loss = torch::nn::functional::cross_entropy(fc2->forward(torch::relu(fc1->forward(batch.data))),
                                                     batch.target);
    log("loss", loss);
    return loss;
  }
  Optimizers configure_optimizers() override {
    auto opt = std::make_shared<torch::optim::Adam>(parameters(), torch::optim::AdamOptions(1e-2));
    return {opt, {std::make_shared<StepLR>(opt, 4, 0.5), Interval::step}};
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

/// Throws on `rank` at global step `step` while the attempt is below `attempts`; with
/// `while_persisting`, once the trainer's persister has begun to commit a checkpoint
/// (its staging directory appeared in the run directory).
class Injector : public Callback {
 public:
  Injector(int64_t rank, int64_t step, int64_t attempts, bool while_persisting = false)
    : rank_(rank), step_(step), attempts_(attempts), while_persisting_(while_persisting) {}
  void on_train_batch_start(Trainer& t, LightningModule&, const Batch&, int64_t) override {
    auto& ctx = train::get_context();
    if (ctx.world_rank != rank_ || ctx.attempt >= attempts_ || t.global_step() != step_)
      return;
    if (while_persisting_) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (!persisting(ctx.run_dir) && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    throw std::runtime_error("injected failure at step " + std::to_string(step_) + " of attempt " +
                             std::to_string(ctx.attempt));
  }

 private:
  static bool persisting(const std::string& run_dir) {
    std::error_code ec;
    for (auto& entry : std::filesystem::directory_iterator(run_dir, ec))
      if (entry.path().filename().string().rfind(".staging-checkpoint", 0) == 0)
        return true;
    return false;
  }

  int64_t rank_, step_, attempts_;
  bool while_persisting_;
};

/// 2 epochs of 6 steps on each of 2 ranks; a report every step, a checkpoint every third.
void train_func(const Config& c) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  auto data = std::make_shared<data::TensorDataset>(torch::randn({192, 8}, gen),
                                                    torch::randint(0, 3, {192}, gen));
  auto model = with_seed(0, [] { return std::make_shared<Classifier>(); });
  // Ballast: a buffer that makes every checkpoint slow to persist (the race tests).
  if (auto mib = c.get<int64_t>("ballast_mib", 0))
    model->register_buffer("ballast", torch::ones({mib << 18}));
  std::shared_ptr<Strategy> strategy;
  if (c.get<std::string>("strategy", "ddp") == "fsdp")
    strategy = std::make_shared<FSDPStrategy>();
  else
    strategy = std::make_shared<DDPStrategy>(DDPOptions{.broadcast_buffers = false});
  Trainer trainer({.max_epochs = 2,
                   .strategy = strategy,
                   .plugins = {ActorEnvironment()},
                   .callbacks = {Injector(c.get<int64_t>("fail_rank"), c.get<int64_t>("fail_step"),
                                          c.get<int64_t>("fail_attempts"),
                                          c.get<bool>("while_persisting", false)),
                                 ReportCallback({.every_n_epochs = 0,
                                                 .every_n_steps = 1,
                                                 .checkpoint_every = 3,
                                                 .async_checkpoint = c.get<bool>("async", false)})},
                   .logger = false,
                   .enable_progress_bar = false});
  trainer = prepare_trainer(std::move(trainer));
  auto ckpt = train::get_checkpoint();
  trainer.fit(model, data::DataLoader(data, {.batch_size = 16, .shuffle = true, .seed = 9}),
              std::nullopt, ckpt ? ckpt->path() : "");
}

Result run(caf::actor_system& sys, const test::TempDir& dir, const std::string& name,
           int64_t fail_step, int64_t fail_attempts, int64_t max_failures, bool async = false,
           int64_t ballast_mib = 0) {
  TorchTrainerOptions o;
  o.train_loop_config = {{"fail_rank", int64_t{1}},
                         {"fail_step", fail_step},
                         {"fail_attempts", fail_attempts},
                         {"async", async},
                         {"ballast_mib", ballast_mib},
                         {"while_persisting", ballast_mib > 0}};
  o.scaling.num_workers = 2;
  o.run.name = name;
  o.run.storage_path = dir.path();
  o.run.failure.max_failures = max_failures;
  return TorchTrainer(sys, train_func, o).fit();
}

using test::check_same_weights;

} // namespace

TEST_CASE("A failure at step 7 on rank 1 restarts once from the checkpoint before it and ends like an undisturbed run", "[fault]") {
  test::TempDir dir;
  System s;
  auto clean = run(s.sys, dir, "clean", -1, 0, 0);
  REQUIRE(clean.ok());
  REQUIRE(clean.metrics_history.size() == 12);
  for (bool async : {false, true}) {
    CAPTURE(async);
    auto faulty = run(s.sys, dir, async ? "faulty_async" : "faulty", 7, 1, 1, async);
    INFO((faulty.error ? faulty.error->message : ""));
    REQUIRE(faulty.ok());
    CHECK(faulty.attempts == 2);
    // Every step once, in order; steps up to the checkpoint at step 6 from attempt 0,
    // the rest redone by attempt 1.
    REQUIRE(faulty.metrics_history.size() == 12);
    for (size_t i = 0; i < 12; ++i) {
      auto& rec = faulty.metrics_history[i];
      CHECK(rec.index == static_cast<int64_t>(i));
      CHECK(rec.metrics.at("step") == static_cast<double>(i + 1));
      CHECK(rec.attempt == (i < 6 ? 0 : 1));
      CHECK(rec.metrics.at("loss") == Approx(clean.metrics_history[i].metrics.at("loss")).epsilon(1e-5));
    }
    check_same_weights(clean, faulty);
    CHECK(faulty.metrics.at("loss") == Approx(clean.metrics.at("loss")).epsilon(1e-5));
  }
}

TEST_CASE("A restart validates the checkpoint it restores once, and no disk write or delete of a run happens on CAF's scheduler threads", "[fault]") {
  test::TempDir dir;
  System s;
  io_on_scheduler = 0;
  {
    std::lock_guard<std::mutex> guard(io_mtx);
    io_on_scheduler_calls.clear();
  }
  auto syncs_before = syncs_seen.load();
  auto validations_before = Checkpoint::full_validations();
  // Keep one checkpoint (and the latest): retention deletes one at every checkpoint.
  TorchTrainerOptions o;
  o.train_loop_config = {{"fail_rank", int64_t{1}}, {"fail_step", int64_t{7}},
                         {"fail_attempts", int64_t{1}}, {"async", false}};
  o.scaling.num_workers = 2;
  o.run.name = "faulty";
  o.run.storage_path = dir.path();
  o.run.failure.max_failures = 1;
  o.run.checkpoint.num_to_keep = 1;
  auto faulty = TorchTrainer(s.sys, train_func, o).fit();
  INFO((faulty.error ? faulty.error->message : ""));
  REQUIRE(faulty.ok());
  CHECK(faulty.attempts == 2);
  // One restart, from one checkpoint: one full check, by the trainer's I/O actor; the two
  // workers loading it trust that check.
  CHECK(Checkpoint::full_validations() - validations_before == 1);
  // Checkpoints, history and result were written and synced, but never on a CAF thread.
  CHECK(syncs_seen.load() - syncs_before > 10);
  std::lock_guard<std::mutex> guard(io_mtx);
  CAPTURE(io_on_scheduler_calls);
  CHECK(io_on_scheduler.load() == 0);
  // The result file is there once fit returns.
  CHECK(std::filesystem::exists(std::filesystem::path(faulty.path) / "result.json"));
}

TEST_CASE("A failure while the previous checkpoint is still being persisted restarts after the write, from the newest checkpoint, with every report once", "[fault]") {
  // 64 MiB of ballast makes each checkpoint write take a while; rank 1 fails at the start
  // of step 7, once the trainer's persister has begun to commit the checkpoint of step 6
  // (async: the ranks train on meanwhile), so the group stops while the commit goes on.
  test::TempDir dir;
  System s;
  auto clean = run(s.sys, dir, "clean", -1, 0, 0, true, 64);
  REQUIRE(clean.ok());
  auto faulty = run(s.sys, dir, "faulty", 6, 1, 1, true, 64);
  INFO((faulty.error ? faulty.error->message : ""));
  REQUIRE(faulty.ok());
  CHECK(faulty.attempts == 2);
  REQUIRE(faulty.metrics_history.size() == 12);
  int64_t redone_from = -1;
  for (size_t i = 0; i < 12; ++i) {
    auto& rec = faulty.metrics_history[i];
    CAPTURE(i);
    CHECK(rec.index == static_cast<int64_t>(i));
    CHECK(rec.metrics.at("step") == static_cast<double>(i + 1));
    CHECK(rec.metrics.at("loss") == Approx(clean.metrics_history[i].metrics.at("loss")).epsilon(1e-5));
    if (rec.attempt == 1 && redone_from < 0)
      redone_from = static_cast<int64_t>(i);
  }
  // The second attempt starts after the newest committed checkpoint: step 6's, whose
  // commit the restart waited for.
  CHECK(redone_from == 6);
  check_same_weights(clean, faulty);
  // The checkpoints the retention policy kept are complete and loadable.
  for (auto& ckpt : faulty.best_checkpoints) {
    CAPTURE(ckpt.first.path());
    CHECK(ckpt.first.model_state_dict().size() > 0);
  }
}

TEST_CASE("max_failures = 0 fails fast with the worker's error", "[fault]") {
  test::TempDir dir;
  System s;
  auto start = std::chrono::steady_clock::now();
  auto r = run(s.sys, dir, "no_retries", 4, 1, 0);
  REQUIRE(r.error);
  CHECK(r.attempts == 1);
  CHECK(r.error->rank == 1);
  CHECK_THAT(r.error->message, Contains("injected failure at step 4"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  // The checkpoint taken before the failure is kept.
  REQUIRE(r.checkpoint);
  CHECK(r.checkpoint->metadata().global_step == 3);
}

TEST_CASE("A rank waiting in an FSDP gather over gloo when its peer fails stops at once, not after "
          "its stop grace", "[fault][sharded]") {
  // Rank 1 raises before step 4; rank 0 is then in its forward, waiting in the gather of
  // a unit for rank 1. The run must end with rank 1's error as soon as the group is told
  // to stop: the gather's wait is woken by the communicator's close. (Until 2026-12-07
  // gloo ran a gather on the waiting thread itself, which nothing could wake: rank 0 sat
  // out the stop grace, as an FSDP rank on a lost node's peer did on a cluster.)
  test::TempDir dir;
  System s;
  TorchTrainerOptions o;
  o.train_loop_config = {{"fail_rank", int64_t{1}}, {"fail_step", int64_t{4}}, {"fail_attempts", int64_t{1}},
                         {"strategy", std::string("fsdp")}};
  o.scaling.num_workers = 2;
  o.torch_config.backend = "gloo";
  o.run.name = "fsdp_stop";
  o.run.storage_path = dir.path();
  o.run.failure.max_failures = 0;
  o.run.stop_grace = std::chrono::seconds(30);
  auto start = std::chrono::steady_clock::now();
  auto r = TorchTrainer(s.sys, train_func, o).fit();
  auto took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  REQUIRE(r.error);
  CHECK(r.error->rank == 1);
  CHECK_THAT(r.error->message, Contains("injected failure at step 4"));
  CAPTURE(took);
  CHECK(took < 10.0); // the whole fit, setup included; the grace alone is 30 s
}

TEST_CASE("max_failures = -1 keeps retrying until the run succeeds", "[fault]") {
  test::TempDir dir;
  System s;
  auto r = run(s.sys, dir, "forever", 8, 3, -1); // fails on attempts 0, 1 and 2
  INFO((r.error ? r.error->message : ""));
  REQUIRE(r.ok());
  CHECK(r.attempts == 4);
  CHECK(r.metrics_history.size() == 12);
  SECTION("and a limited budget ends with the last failure") {
    auto limited = run(s.sys, dir, "limited", 8, 3, 2);
    REQUIRE(limited.error);
    CHECK(limited.attempts == 3);
    CHECK_THAT(limited.error->message, Contains("of attempt 2"));
  }
}

TEST_CASE("A failure before any checkpoint restarts from scratch", "[fault]") {
  test::TempDir dir;
  System s;
  auto clean = run(s.sys, dir, "clean", -1, 0, 0);
  auto r = run(s.sys, dir, "early", 1, 1, 1);
  INFO((r.error ? r.error->message : ""));
  REQUIRE(r.ok());
  CHECK(r.attempts == 2);
  REQUIRE(r.metrics_history.size() == 12);
  for (auto& rec : r.metrics_history)
    CHECK(rec.attempt == 1); // attempt 0's single report was redone
  check_same_weights(clean, r);
}

TEST_CASE("A worker without progress is declared failed by its missed heartbeat", "[fault]") {
  test::TempDir dir;
  System s;
  auto release = std::make_shared<std::atomic<bool>>(false);
  auto fn = [release] {
    if (train::get_context().world_rank == 1)
      while (!*release)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    else
      train::report({{"x", 1.0}});
  };
  TorchTrainerOptions o;
  o.scaling.num_workers = 2;
  o.run.storage_path = dir.path();
  o.run.name = "silent";
  o.run.heartbeat_timeout = std::chrono::milliseconds(500);
  o.run.stop_grace = std::chrono::milliseconds(200);
  TorchTrainer trainer(s.sys, fn, o);
  auto start = std::chrono::steady_clock::now();
  auto r = trainer.fit();
  *release = true;
  REQUIRE(r.error);
  CHECK(r.error->rank == 1);
  CHECK_THAT(r.error->message, Contains("rank 1 made no progress") && Contains("heartbeat"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
}

namespace {

/// Every state a run enters, as its RunCallback sees them.
class States : public RunCallback {
 public:
  void on_state(const RunStatus& status) override {
    std::lock_guard<std::mutex> guard(mtx_);
    states_ = status.states;
  }
  std::vector<std::string> get() const {
    std::lock_guard<std::mutex> guard(mtx_);
    return states_;
  }

 private:
  mutable std::mutex mtx_;
  std::vector<std::string> states_;
};

using Strings = std::vector<std::string>;

} // namespace

TEST_CASE("A failure that is not retried ends the run in errored, never restarting, and a retried one goes restarting then running", "[fault]") {
  test::TempDir dir;
  System s;
  auto fn = [] {
    auto& ctx = train::get_context();
    train::report({{"x", 1.0}});
    if (ctx.world_rank == 1 && ctx.attempt == 0)
      throw std::runtime_error("injected failure of attempt 0");
  };
  auto states = std::make_shared<States>();
  TorchTrainerOptions o;
  o.scaling.num_workers = 2;
  o.run.storage_path = dir.path();
  o.run.callbacks = {states};
  SECTION("not retried") {
    o.run.name = "no_retry";
    auto r = TorchTrainer(s.sys, fn, o).fit();
    REQUIRE(r.error);
    const Strings expected{"pending", "running", "stopping", "errored"};
    CHECK(states->get() == expected);
  }
  SECTION("retried") {
    o.run.name = "retried";
    o.run.failure.max_failures = 1;
    auto r = TorchTrainer(s.sys, fn, o).fit();
    INFO((r.error ? r.error->message : ""));
    REQUIRE(r.ok());
    const Strings expected{"pending", "running", "stopping", "restarting", "running", "finished"};
    CHECK(states->get() == expected);
  }
}

TEST_CASE("When one rank raises while another is stuck, fit returns the raising rank's error within one stop grace period", "[fault]") {
  test::TempDir dir;
  System s;
  // The stuck rank is released once the test has its result; its thread then ends.
  struct Stuck {
    std::mutex mtx;
    std::condition_variable cv;
    bool released = false;
    std::atomic<bool> free{false};
    std::atomic<bool> ended{false};
  };
  auto stuck = std::make_shared<Stuck>();
  auto grace = std::chrono::seconds(4);
  TorchTrainerOptions o;
  o.scaling.num_workers = 2;
  o.run.storage_path = dir.path();
  o.run.stop_grace = grace;
  TrainFunc fn;
  SECTION("sleeping") {
    o.run.name = "sleeping";
    fn = [stuck](const Config&) {
      if (train::get_context().world_rank == 0)
        throw std::runtime_error("rank 0 gives up");
      while (!stuck->free.load())
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      stuck->ended = true;
    };
  }
  SECTION("blocked outside a collective") {
    o.run.name = "blocked";
    fn = [stuck](const Config&) {
      if (train::get_context().world_rank == 0)
        throw std::runtime_error("rank 0 gives up");
      std::unique_lock<std::mutex> lock(stuck->mtx);
      stuck->cv.wait(lock, [&] { return stuck->released; });
      stuck->ended = true;
    };
  }
  auto start = std::chrono::steady_clock::now();
  auto r = TorchTrainer(s.sys, fn, o).fit();
  auto elapsed = std::chrono::steady_clock::now() - start;
  {
    std::lock_guard<std::mutex> guard(stuck->mtx);
    stuck->released = true;
  }
  stuck->free = true;
  stuck->cv.notify_all();
  REQUIRE(r.error);
  CHECK(r.error->rank == 0);
  CHECK_THAT(r.error->message, Contains("rank 0 gives up"));
  // One grace period and some slack for a loaded machine; two would be 8 s.
  CHECK(elapsed < grace + std::chrono::milliseconds(3000));
  // Let the released thread finish before the actor system goes.
  for (int i = 0; i < 500 && !stuck->ended.load(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
}
