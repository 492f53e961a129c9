// The Tuner end to end: trials are real TorchTrainer runs placed through the process's
// resource pool, their reports reach the searcher and the scheduler, and the scheduler's
// decisions, the control messages and the time budget end trials at once.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include "helpers.hpp"
#include "tune_test_util.hpp"

using namespace caftrain;
using namespace caftrain::tune;
namespace fs = std::filesystem;

namespace {

using System = test::ActorSystem;

TunerOptions options_in(const test::TempDir& dir, const std::string& name = "exp") {
  TunerOptions o;
  o.run_config.name = name;
  o.run_config.storage_path = dir.path();
  o.verbose = 0;
  return o;
}

// The loss after `iter` reports: it falls towards (x - 0.3)^2 from above.
double curve(double x, int64_t iter) {
  return (x - 0.3) * (x - 0.3) + 0.5 / static_cast<double>(iter);
}

// Reports `iters` losses of the curve, `sleep_ms` apart.
TrainFunc curve_trainable(int64_t iters, int sleep_ms = 0) {
  return [=](const Config& c) {
    auto x = c.get<double>("x");
    for (int64_t i = 1; i <= iters; ++i) {
      if (sleep_ms > 0)
        std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
      train::report({{"loss", curve(x, i)}});
    }
  };
}

int64_t iterations(const TrialResult& t) {
  return t.metrics.count("training_iteration") ? static_cast<int64_t>(t.metrics.at("training_iteration")) : 0;
}

int64_t total_iterations(const ResultGrid& grid) {
  int64_t n = 0;
  for (auto& t : grid)
    n += iterations(t);
  return n;
}

// How many trial functions run at once, and the most that ever did.
struct Concurrency {
  std::atomic<int> now{0};
  std::atomic<int> most{0};

  void enter() {
    int n = ++now;
    int m = most.load();
    while (n > m && !most.compare_exchange_weak(m, n)) {
    }
  }

  void leave() {
    --now;
  }
};

} // namespace

TEST_CASE("A Tuner runs every sampled trial to its end and answers the best config", "[tuner]") {
  test::TempDir dir;
  System s;
  auto o = options_in(dir);
  o.param_space = {{"x", uniform(0, 1)}, {"model", ParamSpace{{"width", choice({8, 16})}}}};
  o.tune_config = {.metric = "loss", .mode = "min", .num_samples = 6, .seed = 7};
  Tuner tuner(s.sys, curve_trainable(3), o);
  auto grid = tuner.fit();
  REQUIRE(grid.size() == 6);
  CHECK_FALSE(grid.error());
  CHECK(grid.num_terminated() == 6);
  CHECK(grid.num_errors() == 0);
  std::set<std::string> ids;
  double best_distance = 1e9;
  std::string best_id;
  for (auto& t : grid) {
    ids.insert(t.trial_id);
    INFO(t.trial_id);
    CHECK(t.status == "TERMINATED");
    CHECK(t.ok());
    CHECK(iterations(t) == 3);
    CHECK(t.metrics_history.size() == 3);
    CHECK(t.metrics.count("time_total_s") == 1);
    CHECK(t.config.contains("model/width"));
    CHECK(t.path == (fs::path(tuner.path()) / t.trial_id).string());
    CHECK(fs::exists(fs::path(t.path) / "run.json"));
    auto x = t.config.get<double>("x");
    CHECK(t.metrics.at("loss") == Approx(curve(x, 3)));
    if (std::abs(x - 0.3) < best_distance) {
      best_distance = std::abs(x - 0.3);
      best_id = t.trial_id;
    }
  }
  CHECK(ids.size() == 6);
  auto& best = grid.get_best_result();
  CHECK(best.trial_id == best_id);
  CHECK(grid.get_best_result("loss", "max").trial_id != best_id);
  // The same seed samples the same configs.
  auto o2 = options_in(dir, "again");
  o2.param_space = o.param_space;
  o2.tune_config = {.metric = "loss", .mode = "min", .num_samples = 6, .seed = 7};
  auto grid2 = Tuner(s.sys, curve_trainable(1), o2).fit();
  REQUIRE(grid2.size() == 6);
  for (size_t i = 0; i < 6; ++i)
    CHECK(grid2[i].config == grid[i].config);
  // The experiment directory holds its state and the table.
  CHECK(fs::exists(fs::path(tuner.path()) / "experiment_state.json"));
  std::ifstream csv(fs::path(tuner.path()) / "results.csv");
  std::string line;
  int lines = 0;
  std::getline(csv, line);
  CHECK(line.find("config/x") != std::string::npos);
  CHECK(line.find("min/loss") != std::string::npos);
  while (std::getline(csv, line))
    ++lines;
  CHECK(lines == 6);
}

TEST_CASE("Trials never run more at once than the pool fits or max_concurrent_trials allows", "[tuner]") {
  test::TempDir dir;
  System s;
  auto cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int64_t limit : {int64_t{0}, int64_t{1}}) {
    auto seen = std::make_shared<Concurrency>();
    auto o = options_in(dir, "limit" + std::to_string(limit));
    o.param_space = {{"x", uniform(0, 1)}};
    o.tune_config = {.num_samples = 4, .max_concurrent_trials = limit};
    auto grid = Tuner(s.sys,
                      [seen](const Config&) {
                        seen->enter();
                        std::this_thread::sleep_for(std::chrono::milliseconds(150));
                        seen->leave();
                        train::report({{"done", 1.0}});
                      },
                      o)
                  .fit();
    CHECK(grid.num_terminated() == 4);
    INFO("limit " << limit << ", cores " << cores);
    if (limit == 1)
      CHECK(seen->most.load() == 1);
    else
      CHECK(seen->most.load() == std::min(cores, 4)); // one CPU per trial
  }
}

TEST_CASE("Two Tuners and a TorchTrainer in one process share the pool and never oversubscribe it", "[tuner]") {
  test::TempDir dir;
  System s;
  auto cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto seen = std::make_shared<Concurrency>();
  auto work = [seen](const Config&) {
    seen->enter();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    seen->leave();
    train::report({{"done", 1.0}});
  };
  auto a = options_in(dir, "a");
  a.param_space = {{"x", uniform(0, 1)}};
  a.tune_config.num_samples = 3;
  auto b = options_in(dir, "b");
  b.param_space = {{"x", uniform(0, 1)}};
  b.tune_config.num_samples = 3;
  Tuner ta(s.sys, work, a);
  Tuner tb(s.sys, work, b);
  TorchTrainerOptions run;
  run.run.name = "run";
  run.run.storage_path = dir.path();
  run.scaling.resources_per_worker.cpus = 1;
  TorchTrainer trainer(s.sys, work, run);
  ta.start();
  tb.start();
  trainer.start();
  auto ga = ta.fit();
  auto gb = tb.fit();
  auto r = trainer.fit();
  CHECK(ga.num_terminated() == 3);
  CHECK(gb.num_terminated() == 3);
  CHECK(r.ok());
  CHECK(seen->most.load() <= cores);
  CHECK(seen->most.load() >= std::min(cores, 2));
}

TEST_CASE("ASHA stops the worse trials at their rungs and finds FIFO's best with fewer iterations", "[tuner]") {
  test::TempDir dir;
  System s;
  auto space = ParamSpace{{"x", grid_search({0.0, 0.15, 0.3, 0.5, 0.6, 0.75, 0.9, 1.05, 1.2})}};
  auto run = [&](std::shared_ptr<TrialScheduler> scheduler, const std::string& name) {
    auto o = options_in(dir, name);
    o.param_space = space;
    // One at a time: every trial meets the rungs of those before it (ASHA is asynchronous).
    o.tune_config = {.metric = "loss", .mode = "min", .max_concurrent_trials = 1,
                     .scheduler = std::move(scheduler)};
    return Tuner(s.sys, curve_trainable(9), o).fit();
  };
  auto fifo = run(nullptr, "fifo");
  auto asha = run(std::make_shared<ASHAScheduler>(AsyncHyperBandOptions{
                    .time_attr = "training_iteration", .max_t = 9, .grace_period = 1, .reduction_factor = 3}),
                  "asha");
  REQUIRE(fifo.size() == 9);
  REQUIRE(asha.size() == 9);
  CHECK(total_iterations(fifo) == 81);
  CHECK(asha.get_best_result().config.get<double>("x") == Approx(0.3));
  CHECK(fifo.get_best_result().config.get<double>("x") == Approx(0.3));
  int stopped_early = 0;
  for (auto& t : asha) {
    CHECK(t.status == "TERMINATED");
    CHECK(t.ok());
    stopped_early += iterations(t) < 9;
  }
  // By hand (Ray's rule: stop below the rung's 1 - 1/3 quantile, interpolated): x = 0,
  // 0.15 and 0.3 reach max_t; at rung 1 x = 0.5 (loss 0.54) is below the cutoff of
  // {0.59, 0.5225, 0.5, 0.54} (0.5225) and stops, as do the five worse ones after it:
  // 3 * 9 + 6 = 33 of 81 steps.
  CHECK(stopped_early == 6);
  CHECK(total_iterations(asha) == 33);
}

TEST_CASE("A failing trial is retried per FailureConfig and, when it keeps failing, recorded with its error while the others go on", "[tuner]") {
  test::TempDir dir;
  System s;
  auto failures = std::make_shared<std::map<double, int>>();
  auto mtx = std::make_shared<std::mutex>();
  auto o = options_in(dir);
  o.param_space = {{"x", grid_search({0.1, 0.5, 0.9})}};
  o.tune_config = {.metric = "loss", .mode = "min"};
  o.run_config.failure.max_failures = 1;
  auto grid = Tuner(s.sys,
                    [failures, mtx](const Config& c) {
                      auto x = c.get<double>("x");
                      int n;
                      {
                        std::lock_guard<std::mutex> guard(*mtx);
                        n = ++(*failures)[x];
                      }
                      train::report({{"loss", x}});
                      if (x > 0.8)
                        throw std::runtime_error("boom at x=0.9");
                      if (x > 0.4 && n == 1)
                        throw std::runtime_error("once");
                    },
                    o)
                .fit();
  INFO((grid.error() ? grid.error()->message : std::string("no error")));
  REQUIRE(grid.size() == 3);
  CHECK(grid[0].status == "TERMINATED");
  CHECK(grid[0].attempts == 1);
  CHECK(grid[1].status == "TERMINATED"); // failed once, retried, finished
  CHECK(grid[1].attempts == 2);
  CHECK(grid[1].ok());
  CHECK(grid[2].status == "ERROR");
  REQUIRE(grid[2].error);
  CHECK(grid[2].error->message.find("boom at x=0.9") != std::string::npos);
  CHECK(grid[2].attempts == 2);
  CHECK(grid.num_errors() == 1);
  REQUIRE(grid.errors().size() == 1);
  CHECK(grid.get_best_result().config.get<double>("x") == Approx(0.1));
}

TEST_CASE("Stop, pause and resume of a trial are messages: stop ends it at once, a paused trial resumes from its checkpoint", "[tuner]") {
  test::TempDir dir;
  System s;
  // Counts to 30 in reports 30 ms apart, checkpointing its count each time; a resumed
  // run continues from the checkpoint's count.
  auto counter = [](const Config& c) {
    int64_t start = 0;
    if (auto ckpt = train::get_checkpoint()) {
      std::ifstream in(fs::path(ckpt->path()) / "count");
      in >> start;
    }
    auto scratch = fs::path(train::get_context().run_dir) / ("scratch-" + std::to_string(start));
    for (int64_t i = start + 1; i <= 30; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      auto d = scratch.string() + "-" + std::to_string(i);
      fs::create_directories(d);
      std::ofstream(fs::path(d) / "count") << i;
      train::report({{"count", double(i)}, {"x", c.get<double>("x")}}, Checkpoint::from_directory(d));
    }
  };
  auto o = options_in(dir);
  o.param_space = {{"x", grid_search({1.0, 2.0})}};
  o.tune_config = {.max_concurrent_trials = 2};
  Tuner tuner(s.sys, counter, o);
  caf::scoped_actor self{s.sys};
  self->send(tuner.actor(), subscribe_atom::value, caf::actor_cast<caf::actor>(self));
  tuner.start();
  // Wait for a report of each trial, then stop the first and pause the second.
  std::map<double, std::string> ids;
  bool done = false;
  while (ids.size() < 2)
    self->receive([&](TrialReport& r) { ids[r.config.get<double>("x")] = r.trial; },
                  [&](done_atom, ResultGrid&) { done = true; },
                  caf::after(std::chrono::seconds(30)) >> [&] { FAIL("no reports from the trials"); });
  REQUIRE_FALSE(done);
  auto t0 = std::chrono::steady_clock::now();
  bool ok = false;
  self->request(tuner.actor(), caf::infinite, stop_trial_atom::value, ids[1.0])
    .receive([&](bool b) { ok = b; }, [&](caf::error&) {});
  CHECK(ok);
  self->request(tuner.actor(), caf::infinite, pause_trial_atom::value, ids[2.0])
    .receive([&](bool b) { ok = b; }, [&](caf::error&) {});
  CHECK(ok);
  // Both runs end: the stopped trial is TERMINATED, the paused one PAUSED, no run left.
  ExperimentStatus st;
  for (int i = 0; i < 200; ++i) {
    self->request(tuner.actor(), caf::infinite, status_atom::value)
      .receive([&](ExperimentStatus& x) { st = x; }, [&](caf::error&) {});
    if (st.trials.size() == 2 && st.trials[0].status == "TERMINATED" && st.trials[1].status == "PAUSED")
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  REQUIRE(st.trials.size() == 2);
  CHECK(st.trials[0].status == "TERMINATED");
  CHECK(st.trials[1].status == "PAUSED");
  auto stopped_at = st.trials[1].last.at("count");
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  // Resume: it continues from its checkpoint to 30 with every count reported once.
  self->request(tuner.actor(), caf::infinite, resume_trial_atom::value, ids[2.0])
    .receive([&](bool b) { ok = b; }, [&](caf::error&) {});
  CHECK(ok);
  auto grid = tuner.fit();
  REQUIRE(grid.size() == 2);
  auto& stopped = grid[0];
  auto& resumed = grid[1];
  CHECK(stopped.status == "TERMINATED");
  CHECK(stopped.ok()); // stopped, not failed
  CHECK(stopped.metrics.at("count") < 30);
  CHECK(resumed.status == "TERMINATED");
  CHECK(resumed.ok());
  CHECK(resumed.metrics.at("count") == 30);
  CHECK(resumed.metrics.at("training_iteration") == 30);
  CHECK(stopped_at < 30);
  REQUIRE(resumed.metrics_history.size() == 30);
  for (size_t i = 0; i < 30; ++i)
    CHECK(resumed.metrics_history[i].metrics.at("count") == double(i + 1));
  CHECK(resumed.attempts >= 2);
}

TEST_CASE("time_budget_s ends the experiment: running trials are stopped, none starts after", "[tuner]") {
  test::TempDir dir;
  System s;
  auto o = options_in(dir);
  o.param_space = {{"x", uniform(0, 1)}};
  o.tune_config = {.num_samples = 20, .time_budget_s = 0.6};
  auto t0 = std::chrono::steady_clock::now();
  auto grid = Tuner(s.sys, curve_trainable(1000, 10), o).fit();
  auto took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(took < 10);
  CHECK_FALSE(grid.error());
  CHECK(grid.size() < 20);
  for (auto& t : grid) {
    CHECK(t.status == "TERMINATED");
    CHECK(t.ok());
    CHECK(iterations(t) < 1000);
  }
}

TEST_CASE("A distributed trial runs its function on every rank of its own process group", "[tuner]") {
  test::TempDir dir;
  System s;
  auto o = options_in(dir);
  o.param_space = {{"x", grid_search({1.0, 2.0})}};
  o.scaling.num_workers = 2;
  auto grid = Tuner(s.sys,
                    [](const Config& c) {
                      auto& ctx = train::get_context();
                      train::report({{"rank", double(ctx.world_rank)},
                                     {"world", double(ctx.world_size)},
                                     {"x", c.get<double>("x")}});
                    },
                    o)
                .fit();
  REQUIRE(grid.size() == 2);
  for (auto& t : grid) {
    CHECK(t.status == "TERMINATED");
    CHECK(t.metrics.at("world") == 2);
    REQUIRE(t.metrics_history.size() == 1);
    REQUIRE(t.metrics_history[0].all_metrics.size() == 2);
    CHECK(t.metrics_history[0].all_metrics[1].at("rank") == 1);
    CHECK(t.metrics.at("x") == t.config.get<double>("x"));
  }
}

TEST_CASE("TuneReportCallback reports a Trainer's mapped validation metrics, TuneReportCheckpointCallback also its checkpoints", "[tuner]") {
  test::TempDir dir;
  System s;
  for (bool with_checkpoint : {false, true}) {
    auto o = options_in(dir, with_checkpoint ? "ckpt" : "plain");
    o.param_space = {{"lr", choice({0.01, 0.05})}};
    o.tune_config = {.metric = "loss", .mode = "min", .num_samples = 2};
    auto root = dir / (with_checkpoint ? "root-ckpt" : "root-plain");
    auto grid = Tuner(s.sys,
                      [root, with_checkpoint](const Config& c) {
                        auto data = test::regression_data(64);
                        auto model = std::make_shared<test::LinearModule>(4, c.get<double>("lr"));
                        auto opts = TrainerOptions{};
                        opts.max_epochs = 2;
                        opts.enable_progress_bar = false;
                        opts.logger = false;
                        opts.default_root_dir = root;
                        opts.num_sanity_val_steps = 2; // skipped by the callback
                        opts.plugins = {ActorEnvironment()};
                        std::map<std::string, std::string> metrics{{"loss", "val_loss"}};
                        if (with_checkpoint)
                          opts.callbacks = {std::make_shared<TuneReportCheckpointCallback>(metrics)};
                        else
                          opts.callbacks = {std::make_shared<TuneReportCallback>(metrics, "validation_end")};
                        Trainer trainer(opts);
                        trainer.fit(model, data::DataLoader(data, {.batch_size = 16}), data::DataLoader(data, {.batch_size = 16}));
                      },
                      o)
                  .fit();
    REQUIRE(grid.size() == 2);
    for (auto& t : grid) {
      INFO((t.error ? t.error->message : std::string()));
      CHECK(t.status == "TERMINATED");
      CHECK(iterations(t) == 2); // two validations, the sanity check not reported
      CHECK(t.metrics.count("loss") == 1);
      CHECK(t.metrics.count("val_loss") == 0);
      CHECK(t.checkpoint.has_value() == with_checkpoint);
      if (with_checkpoint)
        CHECK(fs::exists(fs::path(t.checkpoint->path()) / "model.pt"));
    }
  }
  CHECK_THROWS_WITH(TuneReportCallback(std::map<std::string, std::string>{}, "validation_finish"), Catch::Contains("validation_end"));
}

TEST_CASE("Bad Tuner options are refused before anything starts, naming the problem", "[tuner]") {
  test::TempDir dir;
  System s;
  auto fn = curve_trainable(1);
  auto o = options_in(dir);
  o.param_space = {{"x", uniform(0, 1)}};
  auto bad = [&](auto change, const std::string& says) {
    auto copy = o;
    change(copy);
    CHECK_THROWS_WITH(Tuner(s.sys, fn, copy), Catch::Contains(says));
  };
  bad([](TunerOptions& x) { x.tune_config.num_samples = 0; }, "num_samples");
  bad([](TunerOptions& x) { x.tune_config.metric = "loss"; }, "metric and TuneConfig.mode go together");
  bad([](TunerOptions& x) { x.tune_config = {.metric = "loss", .mode = "best"}; }, "\"min\" or \"max\"");
  bad([](TunerOptions& x) { x.tune_config.num_samples = -1; }, "time_budget_s");
  bad([](TunerOptions& x) { x.scaling.num_workers = 0; }, "num_workers");
  bad([](TunerOptions& x) {
        x.tune_config = {.metric = "loss", .mode = "min",
                         .scheduler = std::make_shared<ASHAScheduler>(AsyncHyperBandOptions{.metric = "acc", .mode = "max"})};
      },
      "differs from TuneConfig");
  CHECK_THROWS_WITH(Tuner(s.sys, TrainFunc{}, o), Catch::Contains("trainable is empty"));
}

TEST_CASE("A trial whose results lack the metric PBT requires fails alone, with the scheduler's message", "[tuner]") {
  // (ASHA, as Ray's, lets such results pass: CONTINUE.)
  test::TempDir dir;
  System s;
  auto o = options_in(dir);
  o.param_space = {{"x", grid_search({1.0, 2.0})}};
  o.tune_config = {.metric = "loss", .mode = "min",
                   .scheduler = std::make_shared<PopulationBasedTraining>(PopulationBasedTrainingOptions{
                     .time_attr = "training_iteration", .perturbation_interval = 1,
                     .hyperparam_mutations = {{"x", Mutation{1.0, 2.0}}}})};
  auto grid = Tuner(s.sys,
                    [](const Config& c) {
                      for (int i = 0; i < 3; ++i)
                        train::report({{c.get<double>("x") > 1.5 ? "acc" : "loss", 1.0}});
                    },
                    o)
                .fit();
  REQUIRE(grid.size() == 2);
  CHECK(grid[0].status == "TERMINATED");
  CHECK(grid[1].status == "ERROR");
  REQUIRE(grid[1].error);
  CHECK(grid[1].error->message.find("loss") != std::string::npos);
}

TEST_CASE("ResultGrid picks the best trial by scope, skips NaN, and writes a table of last, min and max", "[tuner]") {
  auto trial = [](const std::string& id, std::vector<double> losses) {
    TrialResult t;
    t.trial_id = id;
    t.status = "TERMINATED";
    t.config = {{"id", id}};
    for (size_t i = 0; i < losses.size(); ++i) {
      ReportRecord rec;
      rec.index = static_cast<int64_t>(i);
      rec.metrics = {{"loss", losses[i]}};
      t.metrics_history.push_back(rec);
    }
    t.metrics = t.metrics_history.back().metrics;
    return t;
  };
  auto nan = std::nan("");
  ResultGrid grid("/x", {trial("a", {5, 4, 3}), trial("b", {1, 9, 9}), trial("c", {6, 2, nan})}, "loss", "min");
  CHECK(grid.get_best_result().trial_id == "a");            // last: 3, 9, NaN
  CHECK(grid.get_best_result("loss", "min", "all").trial_id == "b"); // 1 beats 2 and 3
  CHECK(grid.get_best_result("loss", "max", "last").trial_id == "b");
  CHECK(grid.get_best_result("loss", "min", "avg").trial_id == "a"); // 4 < 6.33 (c is NaN)
  CHECK_THROWS_WITH(grid.get_best_result("acc"), Catch::Contains("reported: loss"));
  CHECK_THROWS_WITH(grid.get_best_result("loss", "best"), Catch::Contains("\"min\" or \"max\""));
  CHECK_THROWS_WITH(grid.get_best_result("loss", "min", "first"), Catch::Contains("unknown scope"));
  auto csv = grid.to_csv();
  CHECK(csv.find("trial_id,status,error,config/id,loss,min/loss,max/loss\n") == 0);
  CHECK(csv.find("a,TERMINATED,,a,3,3,5\n") != std::string::npos);
  CHECK(csv.find("c,TERMINATED,,c,NaN,2,6\n") != std::string::npos);
}

TEST_CASE("The trial table shows every trial's status, config, iteration and metric, and the best so far", "[tuner]") {
  ExperimentStatus st;
  st.name = "exp";
  st.trials.push_back({"t_0", "TERMINATED", Config{{"lr", 0.1}}, {{"loss", 0.5}, {"training_iteration", 3}}, "", "", ""});
  st.trials.push_back({"t_1", "RUNNING", Config{{"lr", 0.01}}, {{"loss", 0.25}, {"training_iteration", 2}}, "", "", ""});
  st.trials.push_back({"t_2", "PENDING", Config{{"lr", 0.001}}, {}, "", "", ""});
  auto table = render_trial_table(st, "loss", "min");
  CHECK(table.find("3 trials (1 PENDING, 1 RUNNING, 1 TERMINATED); best t_1 loss=0.25") != std::string::npos);
  // Running trials first.
  CHECK(table.find("t_1") < table.find("t_0"));
  CHECK(table.find("lr") != std::string::npos);
  auto line = trial_event_line("result", st.trials[1], "loss");
  CHECK(line == "Trial t_1 result RUNNING iter 2 loss=0.25 {\"lr\": 0.01}");
}

TEST_CASE("PBT exploits by restarting a paused trial from a copy of the donor's checkpoint with explored config", "[tuner]") {
  test::TempDir dir;
  System s;
  // Accumulates lr per step; the state (v, i) lives in each report's checkpoint.
  auto climb = [](const Config& c) {
    double v = 0;
    int64_t i = 0;
    if (auto ckpt = train::get_checkpoint()) {
      std::ifstream in(fs::path(ckpt->path()) / "state");
      in >> v >> i;
    }
    auto lr = c.get<double>("lr");
    auto& ctx = train::get_context();
    while (i < 8) {
      ++i;
      v += lr;
      auto d = fs::path(ctx.run_dir) / ("scratch-" + std::to_string(ctx.attempt) + "-" + std::to_string(i));
      fs::create_directories(d);
      std::ofstream(d / "state") << v << ' ' << i;
      // Long enough that the trials overlap and exploits land mid-run.
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      train::report({{"score", v}, {"step", double(i)}}, Checkpoint::from_directory(d.string()));
    }
  };
  auto o = options_in(dir);
  o.param_space = {{"lr", grid_search({0.1, 0.2, 1.0, 2.0})}};
  o.tune_config = {.metric = "score", .mode = "max", .max_concurrent_trials = 4,
                   .scheduler = std::make_shared<PopulationBasedTraining>(PopulationBasedTrainingOptions{
                     .time_attr = "training_iteration", .perturbation_interval = 2,
                     .hyperparam_mutations = {{"lr", Mutation{0.1, 0.2, 1.0, 2.0}}},
                     .quantile_fraction = 0.5, .resample_probability = 1.0, .seed = 3})};
  auto grid = Tuner(s.sys, climb, o).fit();
  REQUIRE(grid.size() == 4);
  for (auto& t : grid) {
    INFO(t.trial_id << " " << (t.error ? t.error->message : std::string()));
    CHECK(t.status == "TERMINATED");
    CHECK(t.metrics.at("step") == 8);
  }
  // Exploits happened: each copied a donor's checkpoint under .exploit, and a cloned
  // trial's state continued from it, so its final score is not 8 x its own first lr (the
  // donor, in the upper quantile, climbed faster). An exploit issued at a trial's last
  // steps may come too late (its function returned first); the early ones do not.
  const double first_lr[] = {0.1, 0.2, 1.0, 2.0};
  REQUIRE(fs::exists(fs::path(dir.path()) / "exp" / ".exploit"));
  int exploits = 0;
  for (auto& e : fs::directory_iterator(fs::path(dir.path()) / "exp" / ".exploit"))
    exploits += e.is_directory();
  CHECK(exploits >= 1);
  int cloned = 0;
  for (size_t k = 0; k < 4; ++k)
    cloned += grid[k].metrics.at("score") != Approx(8 * first_lr[k]);
  CHECK(cloned >= 1);
}

TEST_CASE("Every trial writes its results to a TensorBoard event file that an independent reader parses", "[tuner]") {
  test::TempDir dir;
  System s;
  auto o = options_in(dir);
  o.param_space = {{"x", grid_search({1.0})}};
  auto grid = Tuner(s.sys,
                    [](const Config&) {
                      for (int i = 1; i <= 3; ++i)
                        train::report({{"loss", 1.0 / (1 << i)}});
                    },
                    o)
                .fit();
  REQUIRE(grid.size() == 1);
  std::string file;
  for (auto& e : fs::directory_iterator(grid[0].path))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      file = e.path().string();
  REQUIRE_FALSE(file.empty());
  if (test::python_with_torch().empty())
    FAIL("Debian's python3 is needed for the reader (scripts/install-deps.sh installs it)");
  // The reader: TFRecord framing with its own CRC-32C, Event protos parsed by Google's
  // protobuf from a descriptor built here (tensorflow's event.proto field numbers).
  std::string script = R"(
import struct, sys
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def masked(c):
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

f = descriptor_pb2.FileDescriptorProto(name="tb_event.proto", package="tb")
v = f.message_type.add(name="Value")
v.field.add(name="tag", number=1, type=9, label=1)
v.field.add(name="simple_value", number=2, type=2, label=1)
s = f.message_type.add(name="Summary")
s.field.add(name="value", number=1, type=11, label=3, type_name=".tb.Value")
e = f.message_type.add(name="Event")
e.field.add(name="wall_time", number=1, type=1, label=1)
e.field.add(name="step", number=2, type=3, label=1)
e.field.add(name="file_version", number=3, type=9, label=1)
e.field.add(name="summary", number=5, type=11, label=1, type_name=".tb.Summary")
pool = descriptor_pool.DescriptorPool()
pool.Add(f)
desc = pool.FindMessageTypeByName("tb.Event")
try:
    Event = message_factory.GetMessageClass(desc)
except AttributeError:
    Event = message_factory.MessageFactory(pool).GetPrototype(desc)

data = open(sys.argv[1] if len(sys.argv) > 1 else "FILE", "rb").read()
pos = 0
while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert hcrc == masked(crc32c(header)), "bad length crc"
    body = data[pos + 12:pos + 12 + length]
    (bcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert bcrc == masked(crc32c(body)), "bad data crc"
    pos += 16 + length
    ev = Event()
    ev.ParseFromString(body)
    if ev.file_version:
        print("version", ev.file_version)
    for val in ev.summary.value:
        print(ev.step, val.tag, round(val.simple_value, 6))
)";
  auto at = script.find("\"FILE\"");
  script.replace(at, 6, "'" + file + "'");
  std::string out;
  REQUIRE(test::run_python(script, out) == 0);
  INFO(out);
  CHECK(out.find("version brain.Event:2") != std::string::npos);
  CHECK(out.find("1 ray/tune/loss 0.5\n") != std::string::npos);
  CHECK(out.find("2 ray/tune/loss 0.25\n") != std::string::npos);
  CHECK(out.find("3 ray/tune/loss 0.125\n") != std::string::npos);
  CHECK(out.find("3 ray/tune/training_iteration 3.0\n") != std::string::npos);
}

TEST_CASE("Tuner::restore continues a cancelled experiment: ended trials are kept, the others resume from their checkpoints", "[tuner]") {
  test::TempDir dir;
  System s;
  // Counts to config "n" in reports 20 ms apart, checkpointing the count.
  auto counter = [](const Config& c) {
    int64_t start = 0;
    if (auto ckpt = train::get_checkpoint()) {
      std::ifstream in(fs::path(ckpt->path()) / "count");
      in >> start;
    }
    auto& ctx = train::get_context();
    for (int64_t i = start + 1; i <= c.get<int64_t>("n"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      auto d = fs::path(ctx.run_dir) / ("scratch-" + std::to_string(ctx.attempt) + "-" + std::to_string(i));
      fs::create_directories(d);
      std::ofstream(d / "count") << i;
      train::report({{"count", double(i)}}, Checkpoint::from_directory(d.string()));
    }
  };
  auto o = options_in(dir);
  o.param_space = {{"n", grid_search({3, 40, 40})}};
  o.tune_config = {.metric = "count", .mode = "max"};
  Tuner tuner(s.sys, counter, o);
  caf::scoped_actor self{s.sys};
  tuner.start();
  // Cancel once the short trial has ended and the third has reported.
  ExperimentStatus st;
  for (int i = 0; i < 1000; ++i) {
    self->request(tuner.actor(), caf::infinite, status_atom::value)
      .receive([&](ExperimentStatus& x) { st = x; }, [&](caf::error&) {});
    if (st.trials.size() == 3 && st.trials[0].status == "TERMINATED" && st.trials[2].last.count("count"))
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(st.trials.size() == 3);
  self->send(tuner.actor(), cancel_atom::value);
  auto first = tuner.fit();
  REQUIRE(first.error());
  CHECK(first.error()->code == Errc::cancelled);
  CHECK(first[0].status == "TERMINATED");
  CHECK(first[1].status == "PAUSED");
  CHECK(first[2].status == "PAUSED");
  CHECK(first[2].metrics.at("count") < 40);
  // A new Tuner of the same name refuses to overwrite it.
  CHECK_THROWS_WITH(Tuner(s.sys, counter, o), Catch::Contains("Tuner::restore"));
  REQUIRE(Tuner::can_restore(tuner.path()));
  auto grid = Tuner::restore(s.sys, tuner.path(), counter, o).fit();
  REQUIRE(grid.size() == 3);
  CHECK_FALSE(grid.error());
  for (size_t k = 0; k < 3; ++k) {
    INFO("trial " << k);
    CHECK(grid[k].trial_id == first[k].trial_id);
    CHECK(grid[k].config == first[k].config);
    CHECK(grid[k].status == "TERMINATED");
    auto n = grid[k].config.get<int64_t>("n");
    CHECK(grid[k].metrics.at("count") == n);
    REQUIRE(grid[k].metrics_history.size() == static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      CHECK(grid[k].metrics_history[static_cast<size_t>(i)].metrics.at("count") == double(i + 1));
  }
  CHECK(grid[0].attempts == 1); // the ended trial was not run again
  CHECK(grid[2].attempts >= 2);
  CHECK_THROWS_WITH(Tuner::restore(s.sys, dir / "nothing", counter, o), Catch::Contains("holds no experiment"));
}

TEST_CASE("A Tuner's trials run as worker processes, each with its sampled config, and leave none behind", "[tuner][worker_process]") {
  test::TempDir dir;
  System s;
  auto out = dir / "where";
  if (!is_worker_process())
    fs::create_directories(out);
  auto o = options_in(dir);
  o.param_space = {{"x", grid_search({0.1, 0.3, 0.8})}, {"out", out}};
  o.tune_config = {.metric = "loss", .mode = "min"};
  o.scaling.worker_mode = "process";
  // Each trial's worker process says who it is, then reports the curve.
  auto trainable = [](const Config& c) {
    std::ofstream(c.get<std::string>("out") + "/" + train::get_context().run_name) << ::getpid();
    curve_trainable(3)(c);
  };
  Tuner tuner(s.sys, trainable, o);
  auto grid = tuner.fit(); // a worker process runs its trial's rank here and ends
  REQUIRE(grid.size() == 3);
  CHECK_FALSE(grid.error());
  CHECK(grid.num_terminated() == 3);
  std::set<std::string> pids;
  for (auto& t : grid) {
    INFO(t.trial_id << ": " << (t.error ? t.error->message : ""));
    CHECK(t.ok());
    CHECK(iterations(t) == 3);
    CHECK(t.metrics.at("loss") == Approx(curve(t.config.get<double>("x"), 3)));
    std::string pid;
    std::ifstream(out + "/" + t.trial_id) >> pid;
    CHECK(pid != std::to_string(::getpid()));
    pids.insert(pid);
  }
  CHECK(pids.size() == 3);
  for (auto& pid : pids) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (test::process_exists(pid) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK_FALSE(test::process_exists(pid));
  }
  CHECK(grid.get_best_result().config.get<double>("x") == Approx(0.3));
}
