// Tune benchmarks.
//
// overhead: Ray Tune's published scheduling benchmark scaled to this machine. Ray ran
//   10,000 trials of 1 s on 16 CPUs in 715 s against an ideal of 625 s (+14.4%). Here N
//   trials (default 400) of S seconds (default 1) run on one slot per core; the ideal is
//   N * S / slots, and the overhead ratio is wall / ideal - 1 (target <= 2.5%). Each trial
//   is a full TorchTrainer run (trainer actor, persister, worker thread, run files) placed
//   through the resource pool, as every trial is.
//
// asha: ASHA against FIFO on a synthetic objective with a known optimum: 27 configs of x on
//   a grid, learning curves loss(x, t) = (x - 0.37)^2 + 0.5 / t, max_t 27; both must end
//   with the optimum as best config; prints the training steps each spent and the ratio.
//
//   build/bench/bench_tune --overhead [--trials 400] [--seconds 1]
//   build/bench/bench_tune --asha
#include <unistd.h>

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>

#include "caftrain.hpp"

namespace tune = caftrain::tune;
using caftrain::Config;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string storage() {
  return "/tmp/caftrain_bench_tune_" + std::to_string(::getpid());
}

int overhead(caf::actor_system& sys, int64_t trials, double seconds) {
  auto slots = static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  tune::TunerOptions o;
  o.param_space = {{"x", tune::uniform(0, 1)}};
  o.tune_config.num_samples = trials;
  o.run_config = {.name = "overhead", .storage_path = storage()};
  o.verbose = 0;
  auto sleep = std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
  tune::Tuner tuner(sys,
                    [sleep](const Config& c) {
                      std::this_thread::sleep_for(sleep);
                      caftrain::train::report({{"x", c.get<double>("x")}});
                    },
                    o);
  auto t0 = std::chrono::steady_clock::now();
  auto grid = tuner.fit();
  auto wall = seconds_since(t0);
  double ideal = static_cast<double>(trials) * seconds / static_cast<double>(slots);
  std::printf("overhead: %lld trials of %.3f s on %lld slots: wall %.2f s, ideal %.2f s\n",
              static_cast<long long>(trials), seconds, static_cast<long long>(slots), wall, ideal);
  std::printf("  terminated %zu, errors %zu\n", grid.num_terminated(), grid.num_errors());
  std::printf("  per-trial overhead %.1f ms of slot time\n",
              (wall - ideal) * static_cast<double>(slots) / static_cast<double>(trials) * 1000);
  std::printf("  overhead ratio wall/ideal - 1: %.2f%%   (Ray Tune published: 715/625 - 1 = 14.40%%; target <= 2.5%%)\n",
              (wall / ideal - 1) * 100);
  std::filesystem::remove_all(storage());
  return grid.num_terminated() == static_cast<size_t>(trials) ? 0 : 1;
}

int asha(caf::actor_system& sys) {
  std::vector<caftrain::ConfigValue> xs;
  for (int i = 0; i < 27; ++i)
    xs.emplace_back(static_cast<double>(i) / 26.0);
  const double optimum = 0.37;
  auto run = [&](std::shared_ptr<tune::TrialScheduler> scheduler, const std::string& name) {
    tune::TunerOptions o;
    o.param_space = {{"x", tune::grid_search(xs)}};
    o.tune_config = {.metric = "loss", .mode = "min", .scheduler = std::move(scheduler)};
    o.run_config = {.name = name, .storage_path = storage()};
    o.verbose = 0;
    auto t0 = std::chrono::steady_clock::now();
    auto grid = tune::Tuner(sys,
                            [optimum](const Config& c) {
                              auto x = c.get<double>("x");
                              for (int t = 1; t <= 27; ++t) {
                                std::this_thread::sleep_for(std::chrono::milliseconds(2));
                                caftrain::train::report({{"loss", (x - optimum) * (x - optimum) + 0.5 / t}});
                              }
                            },
                            o)
                  .fit();
    int64_t steps = 0;
    for (auto& t : grid)
      steps += static_cast<int64_t>(t.metrics.at("training_iteration"));
    auto best = grid.get_best_result().config.get<double>("x");
    std::printf("  %-5s best x %.4f, %lld training steps, %.2f s\n", name.c_str(), best,
                static_cast<long long>(steps), seconds_since(t0));
    return std::make_pair(steps, best);
  };
  std::printf("asha: 27 configs, max_t 27, optimum x = %.2f (nearest grid point %.4f)\n", optimum,
              std::round(optimum * 26) / 26);
  auto fifo = run(nullptr, "fifo");
  auto asha = run(std::make_shared<tune::ASHAScheduler>(tune::AsyncHyperBandOptions{
                    .max_t = 27, .grace_period = 1, .reduction_factor = 3}),
                  "asha");
  std::printf("  ratio FIFO/ASHA training steps: %.2f  (same best config: %s)\n",
              static_cast<double>(fifo.first) / static_cast<double>(asha.first),
              fifo.second == asha.second ? "yes" : "no");
  std::filesystem::remove_all(storage());
  return fifo.second == asha.second ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  bool run_overhead = false, run_asha = false;
  int64_t trials = 400;
  double seconds = 1.0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--overhead")
      run_overhead = true;
    else if (a == "--asha")
      run_asha = true;
    else if (a == "--trials" && i + 1 < argc)
      trials = std::stoll(argv[++i]);
    else if (a == "--seconds" && i + 1 < argc)
      seconds = std::stod(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_tune [--overhead [--trials N] [--seconds S]] [--asha]\n");
      return 2;
    }
  }
  if (!run_overhead && !run_asha)
    run_overhead = run_asha = true;
  spdlog::set_level(spdlog::level::warn);
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  int rc = 0;
  if (run_asha)
    rc |= asha(sys);
  if (run_overhead)
    rc |= overhead(sys, trials, seconds);
  return rc;
}
