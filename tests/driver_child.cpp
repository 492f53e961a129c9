// A driver the worker-process and cluster tests start as a process of its own.
//
//   build/tests/caftrain_driver_child <storage_path> <out_dir> [<head address> <token file>]
//     starts a run of 2 worker processes (itself, started again) that write their pid to
//     <out>/worker-<rank> and then train forever. Never ends by itself; exits 1 when the
//     run fails. With a head's address (or $CAFTRAIN_ADDRESS, as a job of `caftrain
//     submit`) its workers run on that cluster's nodes.
//
//   build/tests/caftrain_driver_child job <storage_path> [<exit status>]
//     a job of `caftrain submit`: connects to $CAFTRAIN_ADDRESS, runs 2 worker processes
//     that report 3 steps each, prints "job_child: ok, <n> reports" and exits with
//     <exit status> (default 0); 1 when the run fails.
//
// Exits 2 on bad arguments.
#include <caf/all.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "caftrain.hpp"

namespace {

int job(caf::actor_system& sys, const std::string& storage, int exit_status) {
  std::printf("job_child: driver pid %d, cluster at %s\n", static_cast<int>(::getpid()),
              caftrain::default_address().c_str());
  std::fflush(stdout);
  caftrain::connect(sys, caftrain::default_address());
  caftrain::TorchTrainerOptions o;
  o.scaling.num_workers = 2;
  o.scaling.worker_mode = "process";
  o.run.name = "job_child";
  o.run.storage_path = storage;
  auto result = caftrain::TorchTrainer(sys, [](const caftrain::Config&) {
    for (int step = 0; step < 3; ++step)
      caftrain::train::report({{"step", static_cast<double>(step)}});
  }, o).fit();
  if (!result.ok()) {
    std::printf("job_child: the run failed: %s\n", result.error ? result.error->message.c_str() : "?");
    return 1;
  }
  std::printf("job_child: ok, %zu reports\n", result.metrics_history.size());
  return exit_status;
}

} // namespace

int main(int argc, char** argv) {
  bool is_job = argc >= 3 && std::string(argv[1]) == "job";
  if (!(is_job && argc <= 4) && argc != 3 && argc != 5) {
    std::cerr << "usage: caftrain_driver_child <storage_path> <out_dir> [<head address> <token file>]\n"
                 "       caftrain_driver_child job <storage_path> [<exit status>]\n";
    return 2;
  }
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  if (is_job)
    return job(sys, argv[2], argc == 4 ? std::stoi(argv[3]) : 0);
  if (argc == 5)
    caftrain::connect(sys, argv[3], {.token_file = argv[4]});
  else if (!caftrain::default_address().empty())
    caftrain::connect(sys, caftrain::default_address());
  caftrain::TorchTrainerOptions o;
  o.train_loop_config = {{"out", std::string(argv[2])}};
  o.scaling.num_workers = 2;
  o.scaling.worker_mode = "process";
  o.run.name = "driver_child";
  o.run.storage_path = argv[1];
  auto result = caftrain::TorchTrainer(sys, [](const caftrain::Config& c) {
    auto rank = caftrain::train::get_context().world_rank;
    std::ofstream(c.get<std::string>("out") + "/worker-" + std::to_string(rank)) << ::getpid() << "\n";
    for (;;) {
      caftrain::train::session().heartbeat();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }, o).fit();
  std::cerr << "caftrain_driver_child: " << (result.error ? result.error->message : "ended") << std::endl;
  return 1;
}
