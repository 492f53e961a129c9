// Trial schedulers: FIFO, ASHA, HyperBand, median stopping and PBT, with the decisions of
// Ray Tune's schedulers worked out by hand.
#include <catch2/catch.hpp>

#include <cmath>
#include <map>

#include "core/error.hpp"
#include "tune/async_hyperband_scheduler.hpp"
#include "tune/fifo_scheduler.hpp"
#include "tune/hyperband_scheduler.hpp"
#include "tune/median_stopping_rule.hpp"
#include "tune/population_based_training.hpp"

#include "tune_test_util.hpp"

using namespace caftrain;
using namespace caftrain::tune;
using test::error_of;

namespace {

using D = TrialScheduler::Decision;
using K = TrialCommand::Kind;

void add(TrialScheduler& s, const TrialId& id, Config config = {}) {
  s.on_trial_add(id, config);
}

D report(TrialScheduler& s, const TrialId& id, double t, const std::string& metric, double value,
         const std::string& time_attr = "training_iteration", ResultContext ctx = {}) {
  return s.on_trial_result(id, {{time_attr, t}, {metric, value}}, ctx);
}

std::vector<std::pair<K, TrialId>> kinds(const std::vector<TrialCommand>& cmds) {
  std::vector<std::pair<K, TrialId>> out;
  for (auto& c : cmds)
    out.emplace_back(c.kind, c.trial);
  return out;
}

} // namespace

TEST_CASE("FIFO continues every trial and starts pending trials before paused ones",
          "[tune][scheduler]") {
  FIFOScheduler fifo;
  add(fifo, "a");
  CHECK(report(fifo, "a", 1, "loss", 9) == D::CONTINUE);
  CHECK(fifo.choose_trial_to_run({{"p1", TrialStatus::PAUSED}, {"n1", TrialStatus::PENDING},
                                  {"n2", TrialStatus::PENDING}}) == TrialId{"n1"});
  CHECK(fifo.choose_trial_to_run({{"p1", TrialStatus::PAUSED}}) == TrialId{"p1"});
  CHECK_FALSE(fifo.choose_trial_to_run({}));
  CHECK(fifo.take_commands().empty());
}

TEST_CASE("a scheduler takes the Tuner's metric and mode unless it has its own",
          "[tune][scheduler]") {
  ASHAScheduler own{{.metric = "acc", .mode = "max"}};
  CHECK_FALSE(own.set_search_properties("loss", "min"));
  ASHAScheduler none;
  CHECK_THAT(error_of([&] { add(none, "a"); }), Catch::Contains("no metric or mode"));
  CHECK(none.set_search_properties("loss", "min"));
  add(none, "a");
  CHECK(none.metric() == "loss");
  CHECK_THAT(error_of([] { ASHAScheduler{{.mode = "maximum"}}; }),
             Catch::Contains("neither \"min\" nor \"max\""));
}

TEST_CASE("ASHA stops a trial below the rung's cutoff, as Ray's _Bracket example",
          "[tune][scheduler][asha]") {
  // max_t 10, grace 1, rf 2: int(log(10) / log(2) + 1) = 4 rungs, 1 * 2^k: 8, 4, 2, 1.
  ASHAScheduler asha{{.metric = "acc", .mode = "max", .max_t = 10, .grace_period = 1,
                      .reduction_factor = 2}};
  CHECK(asha.milestones(0) == std::vector<double>{8, 4, 2, 1});
  for (auto id : {"t1", "t2", "t3", "t4"})
    add(asha, id);
  // The cutoff is the (1 - 1/2) = 50th percentile of what the rung recorded before.
  CHECK(report(asha, "t1", 1, "acc", 2) == D::CONTINUE);   // rung 1 empty: no cutoff
  CHECK(report(asha, "t2", 1, "acc", 4) == D::CONTINUE);   // cutoff {2} = 2; 4 >= 2
  CHECK(report(asha, "t3", 1, "acc", 1) == D::STOP);       // cutoff {2, 4} = 3; 1 < 3
  CHECK(report(asha, "t4", 1, "acc", 2.5) == D::CONTINUE); // cutoff {2, 4, 1} = 2
  CHECK(report(asha, "t1", 2, "acc", 3) == D::CONTINUE);   // rung 2 empty
  // Iteration 3 is past rung 2, where t2 has not recorded yet: cutoff {3} = 3; 2 < 3.
  CHECK(report(asha, "t2", 3, "acc", 2) == D::STOP);
  // Between rungs nothing is compared.
  CHECK(report(asha, "t1", 3, "acc", 0) == D::CONTINUE);
  // At max_t every trial stops (stop_last_trials).
  CHECK(report(asha, "t1", 10, "acc", 100) == D::STOP);
  // A result without the metric is no evidence.
  CHECK(asha.on_trial_result("t4", {{"training_iteration", 2}}, {}) == D::CONTINUE);
}

TEST_CASE("ASHA's cutoff is the 1 - 1/rf quantile with linear interpolation, in min mode too",
          "[tune][scheduler][asha]") {
  ASHAScheduler asha{{.metric = "loss", .mode = "min", .max_t = 100, .grace_period = 1,
                      .reduction_factor = 4}};
  // Losses 5, 4, 3, 2, 1 arrive improving: each beats the cutoff of those before it.
  for (int i = 0; i < 5; ++i) {
    auto id = "t" + std::to_string(i);
    add(asha, id);
    CHECK(report(asha, id, 1, "loss", 5 - i) == D::CONTINUE);
  }
  // Scores (-loss) {-5, -4, -3, -2, -1}: the 75th percentile has rank 0.75 * 4 = 3: -2.
  // Loss 2 scores -2, not below the cutoff: CONTINUE. Then {-5, -4, -3, -2, -2, -1}: rank
  // 0.75 * 5 = 3.75 between -2 and -2: cutoff -2; loss 2.1 scores -2.1 < -2: STOP.
  add(asha, "x");
  CHECK(report(asha, "x", 1, "loss", 2.0) == D::CONTINUE);
  add(asha, "y");
  CHECK(report(asha, "y", 1, "loss", 2.1) == D::STOP);
}

TEST_CASE("ASHA assigns trials to brackets by softmax of their rung counts",
          "[tune][scheduler][asha]") {
  // max_t 100, grace 1, rf 4: bracket s has int(log(100) / log(4) - s + 1) rungs: 4, 3, 2,
  // starting at 4^s. P(bracket) = e^(rungs - 4) normalised: 0.6652, 0.2447, 0.0900.
  ASHAScheduler asha{{.metric = "loss", .mode = "min", .brackets = 3, .seed = 9}};
  CHECK(asha.milestones(0) == std::vector<double>{64, 16, 4, 1});
  CHECK(asha.milestones(1) == std::vector<double>{64, 16, 4});
  CHECK(asha.milestones(2) == std::vector<double>{64, 16});
  std::vector<double> share(3);
  const int n = 6000;
  for (int i = 0; i < n; ++i) {
    add(asha, "t" + std::to_string(i));
    share[asha.bracket_of("t" + std::to_string(i))] += 1.0 / n;
  }
  CHECK(share[0] == Approx(0.6652).margin(0.02));
  CHECK(share[1] == Approx(0.2447).margin(0.02));
  CHECK(share[2] == Approx(0.0900).margin(0.015));
}

TEST_CASE("ASHA without stop_last_trials lets trials run past max_t once judged",
          "[tune][scheduler][asha]") {
  ASHAScheduler asha{{.metric = "acc", .mode = "max", .max_t = 10, .grace_period = 1,
                      .reduction_factor = 2, .stop_last_trials = false}};
  add(asha, "a");
  add(asha, "b");
  CHECK(report(asha, "a", 8, "acc", 5) == D::CONTINUE); // records at rung 8
  CHECK(report(asha, "b", 8, "acc", 6) == D::CONTINUE);
  // a already recorded at 8, the highest rung: the decision stands, no new cutoff.
  CHECK(report(asha, "a", 12, "acc", 1) == D::CONTINUE);
  // A finished trial's last result still counts at its rung.
  add(asha, "c");
  asha.on_trial_complete("c", {{"training_iteration", 1}, {"acc", 10}});
  add(asha, "d");
  CHECK(report(asha, "d", 1, "acc", 9) == D::STOP); // cutoff {10} = 10
  CHECK_THAT(error_of([] { ASHAScheduler{{.max_t = 5, .grace_period = 10}}; }),
             Catch::Contains("grace_period must be <= max_t"));
  CHECK_THAT(error_of([] { ASHAScheduler{{.reduction_factor = 1}}; }),
             Catch::Contains("reduction_factor must be > 1"));
}

TEST_CASE("HyperBand sizes its brackets as Ray and fills them in order",
          "[tune][scheduler][hyperband]") {
  // max_t 9, eta 3: s_max_1 = round(log 9 / log 3) + 1 = 3 brackets per band;
  // n0(s) = ceil(3 / (s + 1) * 3^s): 3, 5, 9; r0(s) = int(9 * 3^-s): 9, 3, 1.
  HyperBandScheduler hb{{.metric = "acc", .mode = "max", .max_t = 9, .reduction_factor = 3}};
  CHECK(hb.brackets_per_band() == 3);
  CHECK(hb.bracket_size(0) == std::pair<int64_t, int64_t>{3, 9});
  CHECK(hb.bracket_size(1) == std::pair<int64_t, int64_t>{5, 3});
  CHECK(hb.bracket_size(2) == std::pair<int64_t, int64_t>{9, 1});
  for (int i = 0; i < 18; ++i)
    add(hb, "t" + std::to_string(i));
  CHECK(hb.bracket_of("t0") == std::pair<std::size_t, int64_t>{0, 0});
  CHECK(hb.bracket_of("t2") == std::pair<std::size_t, int64_t>{0, 0});
  CHECK(hb.bracket_of("t3") == std::pair<std::size_t, int64_t>{0, 1});
  CHECK(hb.bracket_of("t7") == std::pair<std::size_t, int64_t>{0, 1});
  CHECK(hb.bracket_of("t8") == std::pair<std::size_t, int64_t>{0, 2});
  CHECK(hb.bracket_of("t16") == std::pair<std::size_t, int64_t>{0, 2});
  CHECK(hb.bracket_of("t17") == std::pair<std::size_t, int64_t>{1, 0}); // 3 + 5 + 9 = 17
  CHECK(hb.milestone_of("t3") == 3);
}

TEST_CASE("HyperBand pauses trials at the milestone and halves the bracket when all arrive",
          "[tune][scheduler][hyperband]") {
  HyperBandScheduler hb{{.metric = "acc", .mode = "max", .max_t = 9, .reduction_factor = 3}};
  for (auto id : {"a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"})
    add(hb, id); // a*: bracket s = 0 (3 trials); b*: bracket s = 1 (5 trials, milestone 3)
  std::map<TrialId, double> acc = {{"b0", 0.1}, {"b1", 0.5}, {"b2", 0.3}, {"b3", 0.9},
                                   {"b4", 0.7}};
  for (auto& [id, a] : acc) {
    CHECK(report(hb, id, 1, "acc", a) == D::CONTINUE);
    CHECK(report(hb, id, 2, "acc", a) == D::CONTINUE);
  }
  for (auto id : {"b0", "b1", "b2", "b3"})
    CHECK(report(hb, id, 3, "acc", acc[id]) == D::PAUSE); // b4 has not arrived
  CHECK(hb.take_commands().empty());
  // b4 arrives: n = ceil(5 / 3) = 2 survive, the best two by acc: b3 (0.9) and b4 (0.7).
  // The milestone becomes int(min(3 * 3, 9 - 3)) = 6 (Ray replaces the milestone).
  CHECK(report(hb, "b4", 3, "acc", acc["b4"]) == D::CONTINUE);
  CHECK(kinds(hb.take_commands()) == std::vector<std::pair<K, TrialId>>{
                                       {K::stop, "b0"}, {K::stop, "b2"}, {K::stop, "b1"},
                                       {K::resume, "b3"}});
  CHECK(hb.milestone_of("b3") == 6);
  for (auto id : {"b0", "b2", "b1"})
    hb.on_trial_remove(id); // the runner confirms the stops: nothing more happens
  CHECK(hb.take_commands().empty());
  CHECK(report(hb, "b4", 4, "acc", 0.7) == D::CONTINUE);
  CHECK(report(hb, "b4", 6, "acc", 0.7) == D::PAUSE);
  // b3 reaches 6 last: no halvings left, the bracket is done: b3 STOP, paused b4 stopped.
  CHECK(report(hb, "b3", 6, "acc", 0.9) == D::STOP);
  CHECK(kinds(hb.take_commands()) == std::vector<std::pair<K, TrialId>>{{K::stop, "b4"}});
  hb.on_trial_complete("b3", {});
  hb.on_trial_remove("b4");
  CHECK(hb.take_commands().empty());
}

TEST_CASE("a HyperBand trial that fails lets its bracket halve without it",
          "[tune][scheduler][hyperband]") {
  HyperBandScheduler hb{{.metric = "loss", .mode = "min", .max_t = 9, .reduction_factor = 3}};
  for (auto id : {"a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"})
    add(hb, id);
  // Four of bracket s = 1 reach milestone 3 and pause; b4 fails before reporting.
  CHECK(report(hb, "b0", 3, "loss", 4) == D::PAUSE);
  CHECK(report(hb, "b1", 3, "loss", 1) == D::PAUSE);
  CHECK(report(hb, "b2", 3, "loss", 3) == D::PAUSE);
  CHECK(report(hb, "b3", 3, "loss", 2) == D::PAUSE);
  hb.on_trial_error("b4");
  // n = ceil(5 / 3) = 2 (of the bracket's size, not of the live trials): the two lowest
  // losses b1 and b3 resume; sorted by -loss the losers come first, b0 then b2.
  CHECK(kinds(hb.take_commands()) == std::vector<std::pair<K, TrialId>>{
                                       {K::stop, "b0"}, {K::stop, "b2"}, {K::resume, "b3"},
                                       {K::resume, "b1"}});
}

TEST_CASE("HyperBand starts pending trials of the least complete bracket, never paused ones",
          "[tune][scheduler][hyperband]") {
  HyperBandScheduler hb{{.metric = "acc", .mode = "max", .max_t = 9, .reduction_factor = 3}};
  std::vector<TrialInfo> startable;
  for (auto id : {"a0", "a1", "a2", "b0", "b1"}) {
    add(hb, id);
    startable.push_back({id, TrialStatus::PENDING});
  }
  // All brackets at 0%: band order, bracket s = 0 first.
  CHECK(hb.choose_trial_to_run(startable) == TrialId{"a0"});
  // a0 trains 1 of bracket s = 0's work 3 * 9 = 27: bracket s = 1 (0%) is now behind.
  report(hb, "a0", 1, "acc", 0.5);
  startable.erase(startable.begin());
  CHECK(hb.choose_trial_to_run(startable) == TrialId{"b0"});
  CHECK_FALSE(hb.choose_trial_to_run({{"b0", TrialStatus::PAUSED}}));
  // Without stop_last_trials the last round runs on past max_t.
  HyperBandScheduler open{{.metric = "acc", .mode = "max", .max_t = 9, .reduction_factor = 3,
                           .stop_last_trials = false}};
  add(open, "x");
  CHECK(report(open, "x", 9, "acc", 1) == D::CONTINUE);
  CHECK(report(open, "x", 20, "acc", 1) == D::CONTINUE);
}

TEST_CASE("the median stopping rule stops a trial whose best is worse than the median of "
          "running means", "[tune][scheduler][median]") {
  MedianStoppingRule rule{{.time_attr = "training_iteration", .metric = "loss", .mode = "min",
                           .grace_period = 1, .min_samples_required = 2}};
  for (auto id : {"A", "B", "C", "D", "E"})
    add(rule, id);
  // A: loss 100 at t = 0 (before the grace period: never in a mean), then 1, 1, 1.
  CHECK(report(rule, "A", 0, "loss", 100) == D::CONTINUE);
  for (int t = 1; t <= 3; ++t)
    CHECK(report(rule, "A", t, "loss", 1) == D::CONTINUE); // no other trial yet
  for (int t = 1; t <= 3; ++t)
    CHECK(report(rule, "B", t, "loss", 3) == D::CONTINUE); // 1 other < 2 samples
  // E at t = 1: means over [1, 1] of A, B: 1 and 3, median 2; E's best 2 ties: CONTINUE.
  CHECK(report(rule, "E", 1, "loss", 2) == D::CONTINUE);
  // C at t = 1: A 1, B 3, E 2: median 2 < C's best 10: STOP.
  CHECK(report(rule, "C", 1, "loss", 10) == D::STOP);
  // D at t = 1: A 1, B 3, E 2, C 10: median 2.5 > 1.5: CONTINUE.
  CHECK(report(rule, "D", 1, "loss", 1.5) == D::CONTINUE);
  // D at t = 2: only A and B have results at t >= 2: means over [1, 2] 1 and 3, median 2;
  // D's best so far is 1.5 (not its latest 2.5): CONTINUE.
  CHECK(report(rule, "D", 2, "loss", 2.5) == D::CONTINUE);
  CHECK(report(rule, "D", 3, "loss", 5) == D::CONTINUE);
  // F at t = 1: A 1, B 3, E 2, C 10, D 1.5 (its mean over [1, 1]): median 2 < 2.2: STOP.
  // Had A's loss of 100 before the grace period counted, A's mean would be 50.5, the
  // median 3, and F would go on.
  add(rule, "F");
  CHECK(report(rule, "F", 1, "loss", 2.2) == D::STOP);
}

TEST_CASE("without hard_stop the median rule pauses a losing trial and never judges it again",
          "[tune][scheduler][median]") {
  MedianStoppingRule rule{{.time_attr = "training_iteration", .metric = "acc", .mode = "max",
                           .grace_period = 1, .min_samples_required = 2, .hard_stop = false}};
  for (auto id : {"A", "B", "C"})
    add(rule, id);
  report(rule, "A", 1, "acc", 0.9);
  report(rule, "B", 1, "acc", 0.7);
  // Median of 0.9 and 0.7 is 0.8; C's best 0.1 is worse: PAUSE, resumed FIFO later.
  CHECK(report(rule, "C", 1, "acc", 0.1) == D::PAUSE);
  CHECK(report(rule, "C", 2, "acc", 0.0) == D::CONTINUE);
}

TEST_CASE("with too few samples the median rule yields to waiting trials once per time slice",
          "[tune][scheduler][median]") {
  MedianStoppingRule rule{{.time_attr = "training_iteration", .metric = "loss", .mode = "min",
                           .grace_period = 0, .min_time_slice = 1}};
  add(rule, "A");
  auto waiting = ResultContext{.waiting_trials = 1};
  CHECK(report(rule, "A", 1, "loss", 1, "training_iteration", {}) == D::CONTINUE); // none wait
  CHECK(report(rule, "A", 2, "loss", 1, "training_iteration", waiting) == D::PAUSE);
  CHECK(report(rule, "A", 3, "loss", 1, "training_iteration", waiting) == D::CONTINUE); // 3-2 = 1, not > 1
  CHECK(report(rule, "A", 4, "loss", 1, "training_iteration", waiting) == D::PAUSE);
}

TEST_CASE("PBT's bottom trial clones a top trial's checkpoint with an explored config",
          "[tune][scheduler][pbt]") {
  PopulationBasedTraining pbt{{.time_attr = "training_iteration",
                               .metric = "acc",
                               .mode = "max",
                               .perturbation_interval = 10,
                               .hyperparam_mutations = {{"lr", uniform(0.001, 1)}},
                               .resample_probability = 0,
                               .seed = 3}};
  std::map<TrialId, double> lr = {{"a", 0.1}, {"b", 0.2}, {"c", 0.3}, {"d", 0.4}};
  for (auto& [id, x] : lr)
    add(pbt, id, Config{{"lr", x}, {"batch", int64_t{64}}});
  auto at = [&](const TrialId& id, double t, double acc, ResultContext ctx = {}) {
    return report(pbt, id, t, "acc", acc, "training_iteration", ctx);
  };
  // Before the interval nothing is ranked.
  CHECK(at("a", 5, 0.0) == D::CONTINUE);
  // At 10, ranking those with a score. a alone: no quantiles.
  CHECK(at("a", 10, 0.1, {.checkpoint = "ckpt/a10"}) == D::CONTINUE);
  // a, b: ceil(2 * 0.25) = 1 per quantile: b is top and keeps ckpt/b10 (a is bottom,
  // but only the reporting trial acts on its rank).
  CHECK(at("b", 10, 0.2, {.checkpoint = "ckpt/b10"}) == D::CONTINUE);
  // a, b, c: ceil(0.75) = 1: c is top (0.9) and keeps ckpt/c10.
  CHECK(at("c", 10, 0.9, {.checkpoint = "ckpt/c10"}) == D::CONTINUE);
  CHECK(pbt.take_commands().empty());
  // a, b, c, d: ceil(1) = 1: d (0.05) is the bottom; its donor is the top, c.
  CHECK(at("d", 10, 0.05, {.checkpoint = "ckpt/d10"}) == D::PAUSE);
  auto cmds = pbt.take_commands();
  REQUIRE(cmds.size() == 1);
  CHECK(cmds[0].kind == K::exploit);
  CHECK(cmds[0].trial == "d");
  CHECK(cmds[0].donor == "c");
  CHECK(cmds[0].checkpoint == "ckpt/c10");
  // Explore perturbs c's lr 0.3 by 1.2 or 0.8; the constant batch size is c's too.
  double new_lr = cmds[0].config.get<double>("lr");
  CHECK((new_lr == Approx(0.36) || new_lr == Approx(0.24)));
  CHECK(cmds[0].config.get<int64_t>("batch") == 64);
  CHECK(pbt.config_of("d") == cmds[0].config);
  CHECK(pbt.num_perturbations() == 1);
  // d took over c's perturbation time (10): at 15 it is not due.
  CHECK(at("d", 15, 0.5) == D::CONTINUE);
  // While other trials wait, a due trial yields (time-sharing).
  CHECK(at("b", 20, 0.3, {.waiting_trials = 2}) == D::PAUSE);
  CHECK(pbt.take_commands().empty());
}

TEST_CASE("PBT never clones a trial that has not checkpointed", "[tune][scheduler][pbt]") {
  PopulationBasedTraining pbt{{.time_attr = "training_iteration",
                               .metric = "loss",
                               .mode = "min",
                               .perturbation_interval = 10,
                               .hyperparam_mutations = {{"lr", {0.01, 0.1, 1.0}}}}};
  for (auto id : {"a", "b"})
    add(pbt, id, Config{{"lr", 0.1}});
  // b is the top trial (loss 1) but reports no checkpoint; a (loss 5) is the bottom one.
  CHECK(report(pbt, "b", 10, "loss", 1, "training_iteration") == D::CONTINUE);
  CHECK(report(pbt, "a", 10, "loss", 5, "training_iteration", {.checkpoint = "ckpt/a"}) ==
        D::CONTINUE);
  CHECK(pbt.take_commands().empty());
  CHECK(pbt.num_perturbations() == 0);
  // Next round b checkpoints while on top, and a then clones it.
  CHECK(report(pbt, "b", 20, "loss", 1, "training_iteration", {.checkpoint = "ckpt/b20"}) ==
        D::CONTINUE);
  CHECK(report(pbt, "a", 20, "loss", 5, "training_iteration") == D::PAUSE);
  auto cmds = pbt.take_commands();
  REQUIRE(cmds.size() == 1);
  CHECK(cmds[0].donor == "b");
  CHECK(cmds[0].checkpoint == "ckpt/b20");
}

TEST_CASE("PBT's explore shifts list values, multiplies numbers and resamples",
          "[tune][scheduler][pbt]") {
  std::map<std::string, Mutation> list = {{"lr", {0.001, 0.01, 0.1}}};
  std::map<std::string, Mutation> number = {{"batch", randint(16, 256)}};
  std::set<double> from_middle;
  std::set<double> from_end;
  std::set<int64_t> batches;
  Rng rng{1};
  for (int i = 0; i < 200; ++i) {
    from_middle.insert(explore(Config{{"lr", 0.01}}, list, 0, {1.2, 0.8}, rng).get<double>("lr"));
    from_end.insert(explore(Config{{"lr", 0.1}}, list, 0, {1.2, 0.8}, rng).get<double>("lr"));
    // An integer stays an integer: int(64 * 1.2) = 76, int(64 * 0.8) = 51.
    batches.insert(explore(Config{{"batch", int64_t{64}}}, number, 0, {1.2, 0.8}, rng)
                     .get<int64_t>("batch"));
  }
  CHECK(from_middle == std::set<double>{0.001, 0.1}); // a neighbour on either side
  CHECK(from_end == std::set<double>{0.01, 0.1});     // right of the end is the end
  CHECK(batches == std::set<int64_t>{51, 76});
  // A value not in the list, or resample_probability 1, resamples.
  auto v = explore(Config{{"lr", 0.5}}, list, 0, {1.2, 0.8}, rng).get<double>("lr");
  CHECK((v == 0.001 || v == 0.01 || v == 0.1));
  for (int i = 0; i < 50; ++i) {
    auto b = explore(Config{{"batch", int64_t{64}}}, number, 1, {1.2, 0.8}, rng).get<int64_t>("batch");
    REQUIRE(b >= 16);
    REQUIRE(b < 256);
  }
  // A function resamples by being called, and is perturbed like a domain otherwise.
  std::map<std::string, Mutation> fn = {{"wd", Mutation{[] { return ConfigValue{0.5}; }}}};
  CHECK(explore(Config{{"wd", 0.1}}, fn, 1, {1.2, 0.8}, rng).get<double>("wd") == 0.5);
  auto wd = explore(Config{{"wd", 0.1}}, fn, 0, {2.0}, rng).get<double>("wd");
  CHECK(wd == Approx(0.2));
  CHECK_THAT(error_of([&] { explore(Config{{"batch", "big"}}, number, 0, {1.2}, rng); }),
             Catch::Contains("only numbers can be multiplied"));
}

TEST_CASE("PBT samples mutated keys a config lacks, starts the least trained trial, and "
          "checks its options", "[tune][scheduler][pbt]") {
  PopulationBasedTraining pbt{{.time_attr = "training_iteration",
                               .metric = "acc",
                               .mode = "max",
                               .perturbation_interval = 5,
                               .hyperparam_mutations = {{"momentum", {0.9, 0.99}},
                                                        {"lr", loguniform(1e-4, 1e-1)}}}};
  Config config{{"lr", 0.05}};
  pbt.on_trial_add("a", config);
  auto m = config.get<double>("momentum");
  CHECK((m == 0.9 || m == 0.99));
  CHECK(config.get<double>("lr") == 0.05); // present keys are kept
  add(pbt, "b", Config{{"lr", 0.01}});
  add(pbt, "c", Config{{"lr", 0.01}});
  report(pbt, "a", 5, "acc", 0.5, "training_iteration");
  report(pbt, "b", 10, "acc", 0.5, "training_iteration");
  CHECK(pbt.choose_trial_to_run({{"b", TrialStatus::PAUSED}, {"a", TrialStatus::PAUSED},
                                 {"c", TrialStatus::PENDING}}) == TrialId{"c"});
  CHECK(pbt.choose_trial_to_run({{"b", TrialStatus::PAUSED}, {"a", TrialStatus::PAUSED}}) ==
        TrialId{"a"});
  CHECK_THAT(error_of([&] { pbt.on_trial_result("a", {{"acc", 1}}, {}); }, Errc::invalid_argument),
             Catch::Contains("no 'training_iteration'"));
  CHECK_THAT(error_of([] {
               PopulationBasedTraining{{.hyperparam_mutations = {{"lr", {0.1}}},
                                        .quantile_fraction = 0.6}};
             }),
             Catch::Contains("between 0 and 0.5"));
  CHECK_THAT(error_of([] { PopulationBasedTraining{{}}; }),
             Catch::Contains("hyperparam_mutations or a custom_explore_fn"));
  CHECK_THAT(error_of([] {
               PopulationBasedTraining{{.hyperparam_mutations = {{"lr", loguniform(0, 1)}}}};
             }),
             Catch::Contains("'lr'"));
}
