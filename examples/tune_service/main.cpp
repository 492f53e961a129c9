// A CAF service that runs two hyperparameter searches at once, by messages alone: it
// starts both experiments, receives every trial's results as messages, stops a trial of
// its own accord, and prints each experiment's best config when it ends.
//
//   build/examples/tune_service
//
// Both experiments share the process's resource pool (one CPU per trial): on 2 cores, two
// trials run at any time, whichever experiment they belong to. Prints one line per result
// (`[quadratic] a1b2c_00003 iter 4 loss=0.0121 -> CONTINUE`), then the two best configs.
#include <caf/all.hpp>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <memory>
#include <thread>

#include "caftrain.hpp"

namespace {

namespace tune = caftrain::tune;
using search_atom = caf::atom_constant<caf::atom("search")>;

/// A stand-in for training: a learning curve towards (x - 0.3)^2 + (y + 0.2)^2.
void quadratic(const caftrain::Config& c) {
  auto x = c.get<double>("x");
  auto y = c.get<double>("y");
  for (int t = 1; t <= 8; ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    caftrain::train::report({{"loss", (x - 0.3) * (x - 0.3) + (y + 0.2) * (y + 0.2) + 0.2 / t}});
  }
}

/// Another: accuracy rises with the "width" and falls with too high a learning rate.
void accuracy(const caftrain::Config& c) {
  auto width = static_cast<double>(c.get<int64_t>("width"));
  auto lr = c.get<double>("lr");
  for (int t = 1; t <= 8; ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    auto acc = 1.0 - 1.0 / std::sqrt(width) - std::abs(std::log10(lr) + 2) * 0.05 - 0.3 / t;
    caftrain::train::report({{"acc", acc}});
  }
}

struct ServiceState {
  std::vector<std::unique_ptr<tune::Tuner>> experiments;
  std::map<caf::actor_addr, std::string> names;
  int running = 0;
  bool stopped_one = false;
};

caf::behavior service(caf::stateful_actor<ServiceState>* self) {
  auto start = [=](const std::string& name, caftrain::TrainFunc fn, tune::TunerOptions o) {
    o.run_config.name = name + "_" + std::to_string(::getpid());
    o.run_config.storage_path = "runs/tune_service";
    o.verbose = 0;
    auto& tuner = self->state.experiments.emplace_back(
      std::make_unique<tune::Tuner>(self->system(), std::move(fn), std::move(o)));
    auto actor = tuner->start();
    self->state.names[actor.address()] = name;
    ++self->state.running;
    self->send(actor, caftrain::subscribe_atom::value, caf::actor{self});
    std::cout << "service: started experiment " << name << std::endl;
  };
  return {
    [=](search_atom) {
      tune::TunerOptions q;
      q.param_space = {{"x", tune::uniform(-1, 1)}, {"y", tune::uniform(-1, 1)}};
      q.tune_config = {.metric = "loss", .mode = "min", .num_samples = 6,
                       .scheduler = std::make_shared<tune::ASHAScheduler>(
                         tune::AsyncHyperBandOptions{.max_t = 8, .grace_period = 2, .reduction_factor = 2})};
      start("quadratic", quadratic, q);
      tune::TunerOptions a;
      a.param_space = {{"width", tune::choice({16, 64, 256})}, {"lr", tune::loguniform(1e-4, 1e-1)}};
      a.tune_config = {.metric = "acc", .mode = "max", .num_samples = 6};
      start("accuracy", accuracy, a);
    },
    [=](const tune::TrialReport& r) {
      std::string metric = r.metrics.count("loss") ? "loss" : "acc";
      std::cout << "[" << self->state.names[caf::actor_cast<caf::actor_addr>(self->current_sender())]
                << "] " << r.trial << " iter " << r.metrics.at("training_iteration") << " " << metric
                << "=" << std::setprecision(4) << r.metrics.at(metric) << " -> " << r.decision << std::endl;
      // The service's own decision: the first accuracy trial below 0.8 at iteration 3 ends.
      if (!self->state.stopped_one && r.metrics.count("acc") && r.metrics.at("training_iteration") == 3 &&
          r.metrics.at("acc") < 0.8) {
        self->state.stopped_one = true;
        std::cout << "service: stopping trial " << r.trial << std::endl;
        self->send(caf::actor_cast<caf::actor>(self->current_sender()), tune::stop_trial_atom::value, r.trial);
      }
    },
    [=](bool) {
      // the answer of stop_trial_atom
    },
    [=](caftrain::done_atom, const tune::ResultGrid& grid) {
      auto name = self->state.names[caf::actor_cast<caf::actor_addr>(self->current_sender())];
      auto& best = grid.get_best_result();
      std::cout << "service: " << name << " ended with " << grid.size() << " trials; best "
                << best.trial_id << " " << best.config.to_string() << " " << grid.metric() << "="
                << best.metrics.at(grid.metric()) << std::endl;
      if (--self->state.running == 0)
        self->quit();
    },
  };
}

} // namespace

int main() {
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  auto svc = sys.spawn(service);
  caf::anon_send(svc, search_atom::value);
  sys.await_all_actors_done();
}
