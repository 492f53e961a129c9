// The runner protocol of trial_scheduler.hpp and searcher.hpp, followed by a simulated
// runner over synthetic learning curves: every decision and command is acted on as the
// Tuner must, and every trial ends (no trial hangs after a scheduler stops or pauses it).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <map>
#include <memory>

#include "tune/all.hpp"

using namespace caftrain;
using namespace caftrain::tune;

namespace {

using D = TrialScheduler::Decision;

// The loss of a trial after `iter` steps: it falls towards (x - 0.37)^2 from above.
double curve(const Config& c, int64_t iter, double) {
  double x = c.get<double>("x");
  return (x - 0.37) * (x - 0.37) + 0.5 / static_cast<double>(iter);
}

struct SimTrial {
  Config config;
  TrialStatus status = TrialStatus::PENDING;
  int64_t iter = 0;
  int64_t restore_iter = 0;  // iteration of the checkpoint it resumes from
  double value = 0;          // the trained state: the loss so far
  double restore_value = 0;  // the state in that checkpoint
  Metrics last = {};
};

// A checkpoint: the iteration and the state it holds.
struct Checkpoint {
  int64_t iter;
  double value;
};

// What the Tuner does, minus actors: `slots` trials run at once, each reports once per
// step with a checkpoint, and trial functions return after `max_iter` steps.
struct Runner {
  Runner(Searcher& searcher, TrialScheduler& scheduler, int slots, int64_t num_samples,
         int64_t max_iter)
    : searcher(searcher),
      scheduler(scheduler),
      slots(slots),
      num_samples(num_samples),
      max_iter(max_iter) {
    // nop
  }

  Searcher& searcher;
  TrialScheduler& scheduler;
  int slots;
  int64_t num_samples;
  int64_t max_iter;
  // The state after a step from `previous` at iteration `iter` (the loss reported).
  std::function<double(const Config&, int64_t iter, double previous)> step = curve;
  double initial_value = 0;

  std::map<TrialId, SimTrial> trials;
  std::vector<TrialId> order;
  std::map<std::string, Checkpoint> checkpoints;
  int64_t steps = 0;
  int64_t exploits = 0;
  bool searcher_done = false;

  std::size_t count(TrialStatus s) const {
    std::size_t n = 0;
    for (auto& [id, t] : trials)
      n += t.status == s;
    return n;
  }

  void finish(const TrialId& id, TrialStatus status) {
    trials[id].status = status;
    searcher.on_trial_complete(id, trials[id].last, status == TrialStatus::ERROR);
  }

  void act_on_commands() {
    for (auto& cmd : scheduler.take_commands()) {
      auto& t = trials.at(cmd.trial);
      switch (cmd.kind) {
        case TrialCommand::Kind::stop:
          REQUIRE(t.status != TrialStatus::RUNNING);
          finish(cmd.trial, TrialStatus::TERMINATED);
          scheduler.on_trial_remove(cmd.trial);
          break;
        case TrialCommand::Kind::resume:
          REQUIRE(t.status == TrialStatus::PAUSED);
          t.status = TrialStatus::PENDING;
          break;
        case TrialCommand::Kind::exploit:
          REQUIRE(t.status == TrialStatus::PAUSED);
          t.config = cmd.config;
          t.restore_iter = checkpoints.at(cmd.checkpoint).iter;
          t.restore_value = checkpoints.at(cmd.checkpoint).value;
          t.status = TrialStatus::PENDING;
          ++exploits;
          break;
      }
    }
  }

  void create_trials() {
    while (!searcher_done && static_cast<int64_t>(trials.size()) < num_samples &&
           count(TrialStatus::PENDING) == 0 && count(TrialStatus::RUNNING) < std::size_t(slots)) {
      auto id = "trial_" + std::to_string(trials.size());
      auto s = searcher.suggest(id);
      if (s.status != Suggestion::Status::ready) {
        searcher_done = s.status == Suggestion::Status::finished;
        return;
      }
      scheduler.on_trial_add(id, s.config);
      SimTrial t;
      t.config = s.config;
      t.restore_value = initial_value;
      trials[id] = t;
      order.push_back(id);
    }
  }

  void start_trials() {
    while (count(TrialStatus::RUNNING) < std::size_t(slots)) {
      std::vector<TrialInfo> startable;
      for (auto& id : order)
        if (trials[id].status == TrialStatus::PENDING || trials[id].status == TrialStatus::PAUSED)
          startable.push_back({id, trials[id].status});
      auto pick = scheduler.choose_trial_to_run(startable);
      if (!pick)
        return;
      auto& t = trials.at(*pick);
      t.iter = t.restore_iter; // from its latest checkpoint (or the donor's)
      t.value = t.restore_value;
      t.status = TrialStatus::RUNNING;
    }
  }

  // One step of every running trial; false when nothing is left to do.
  bool round() {
    create_trials();
    start_trials();
    std::vector<TrialId> running;
    for (auto& id : order)
      if (trials[id].status == TrialStatus::RUNNING)
        running.push_back(id);
    if (running.empty())
      return false;
    for (auto& id : running) {
      auto& t = trials.at(id);
      if (t.iter >= max_iter) { // resumed at its end: the function returns at once
        scheduler.on_trial_complete(id, t.last);
        finish(id, TrialStatus::TERMINATED);
        continue;
      }
      ++t.iter;
      ++steps;
      auto ckpt = "ckpt/" + id + "/" + std::to_string(t.iter);
      t.value = step(t.config, t.iter, t.value);
      checkpoints[ckpt] = {t.iter, t.value};
      t.restore_iter = t.iter;
      t.restore_value = t.value;
      t.last = {{"training_iteration", static_cast<double>(t.iter)}, {"loss", t.value}};
      ResultContext ctx{count(TrialStatus::PENDING) + count(TrialStatus::PAUSED), ckpt};
      auto decision = scheduler.on_trial_result(id, t.last, ctx);
      searcher.on_trial_result(id, t.last);
      if (decision == D::PAUSE) {
        t.status = TrialStatus::PAUSED;
      } else if (decision == D::STOP) {
        scheduler.on_trial_complete(id, t.last);
        finish(id, TrialStatus::TERMINATED);
      } else if (t.iter >= max_iter) {
        scheduler.on_trial_complete(id, t.last);
        finish(id, TrialStatus::TERMINATED);
      }
      act_on_commands();
    }
    return true;
  }

  void run() {
    int rounds = 0;
    while (round())
      REQUIRE(++rounds < 100000);
    // Every trial ended: none is left paused or pending (the hang Ray users hit).
    for (auto& [id, t] : trials)
      CHECK(t.status == TrialStatus::TERMINATED);
  }

  // The trial with the lowest last loss.
  std::pair<TrialId, double> best() const {
    std::pair<TrialId, double> out{"", 1e300};
    for (auto& [id, t] : trials)
      if (t.last.count("loss") > 0 && t.last.at("loss") < out.second)
        out = {id, t.last.at("loss")};
    return out;
  }
};

ParamSpace grid27() {
  std::vector<ConfigValue> xs;
  for (int i = 0; i < 27; ++i)
    xs.emplace_back(i / 26.0);
  return ParamSpace{{"x", grid_search(xs)}};
}

} // namespace

TEST_CASE("ASHA finds FIFO's best configuration in fewer training steps",
          "[tune][protocol]") {
  // 27 configs x = 0, 1/26, ..., 1 on 2 slots, 27 steps each; the best is x = 10/26.
  BasicVariantGenerator fifo_search{grid27()};
  FIFOScheduler fifo;
  Runner a{fifo_search, fifo, 2, 27, 27};
  a.run();
  BasicVariantGenerator asha_search{grid27()};
  ASHAScheduler asha{{.metric = "loss", .mode = "min", .max_t = 27, .grace_period = 1,
                      .reduction_factor = 3}};
  Runner b{asha_search, asha, 2, 27, 27};
  b.run();
  CHECK(a.steps == 27 * 27);
  CHECK(b.best().first == a.best().first);
  CHECK(a.trials.at(a.best().first).config.get<double>("x") == 10 / 26.0);
  double ratio = static_cast<double>(a.steps) / static_cast<double>(b.steps);
  std::printf("ASHA vs FIFO, 27 trials of 27 steps on 2 slots: %lld vs %lld steps to the same "
              "best config, FIFO/ASHA = %.2f\n",
              static_cast<long long>(b.steps), static_cast<long long>(a.steps), ratio);
  CHECK(ratio > 2.0);
}

TEST_CASE("every trial ends under HyperBand, median stopping and PBT when the runner follows "
          "the protocol", "[tune][protocol]") {
  SECTION("HyperBand") {
    BasicVariantGenerator search{grid27()};
    HyperBandScheduler hb{{.metric = "loss", .mode = "min", .max_t = 27, .reduction_factor = 3}};
    Runner r{search, hb, 3, 27, 27};
    r.run();
    CHECK(r.steps < 27 * 27);
    CHECK(r.trials.at(r.best().first).config.get<double>("x") == 10 / 26.0);
  }
  SECTION("median stopping, soft stop") {
    BasicVariantGenerator search{grid27()};
    MedianStoppingRule msr{{.time_attr = "training_iteration", .metric = "loss", .mode = "min",
                            .grace_period = 3, .min_samples_required = 3, .hard_stop = false}};
    Runner r{search, msr, 2, 27, 27};
    r.run();
    CHECK(r.trials.at(r.best().first).config.get<double>("x") == 10 / 26.0);
  }
  SECTION("PBT clones checkpoints and beats the population it started from") {
    // Each step lowers the loss (from 30) by 1 - |lr - 0.6|: a larger lr learns faster, and
    // the 8 starting lrs lie in [0, 0.3]. Without PBT the best of them ends at
    // 30 - 40 (1 - |lr - 0.6|) >= 30 - 40 * 0.7 = 2; PBT clones the leaders' state and
    // explores lr beyond 0.3.
    auto space = ParamSpace{{"lr", uniform(0, 0.3)}};
    auto learn = [](const Config& c, int64_t, double previous) {
      return previous - (1 - std::fabs(c.get<double>("lr") - 0.6));
    };
    BasicVariantGenerator fifo_search{space, {.num_samples = 8, .seed = 4}};
    FIFOScheduler fifo;
    Runner plain{fifo_search, fifo, 8, 8, 40};
    plain.step = learn;
    plain.initial_value = 30;
    plain.run();
    BasicVariantGenerator search{space, {.num_samples = 8, .seed = 4}};
    PopulationBasedTraining pbt{{.time_attr = "training_iteration",
                                 .metric = "loss",
                                 .mode = "min",
                                 .perturbation_interval = 4,
                                 .hyperparam_mutations = {{"lr", uniform(0, 1)}},
                                 .seed = 4}};
    Runner r{search, pbt, 8, 8, 40};
    r.step = learn;
    r.initial_value = 30;
    r.run();
    CHECK(r.exploits > 0);
    CHECK(r.exploits == pbt.num_perturbations());
    CHECK(plain.best().second >= 2.0);
    std::printf("PBT vs the same 8 trials without it: best loss %.3f vs %.3f\n",
                r.best().second, plain.best().second);
    CHECK(r.best().second < plain.best().second - 1.0);
  }
}
