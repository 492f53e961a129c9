// A driver the worker-process tests kill: starts a run of 2 worker processes (itself,
// started again) that write their pid to <out>/worker-<rank> and then train forever.
//
//   build/tests/caftrain_driver_child <storage_path> <out_dir> [<head address> <token file>]
//
// With a head's address it connects to that cluster and the workers run on its nodes.
// Never ends by itself; exits 2 on bad arguments, 1 when the run fails.
#include <caf/all.hpp>

#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "caftrain.hpp"

int main(int argc, char** argv) {
  if (argc != 3 && argc != 5) {
    std::cerr << "usage: caftrain_driver_child <storage_path> <out_dir> [<head address> <token file>]\n";
    return 2;
  }
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  if (argc == 5)
    caftrain::connect(sys, argv[3], {.token_file = argv[4]});
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
