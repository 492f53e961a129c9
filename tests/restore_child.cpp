// The process test_restore.cpp kills: runs the restore job to completion unless killed.
//
//   build/tests/caftrain_restore_child <storage_path> <run_name> <step_sleep_ms>
//
// Exits 0 when the run finished, 1 when it failed, 2 on bad arguments.
#include <caf/all.hpp>

#include <iostream>
#include <string>

#include "caftrain.hpp"
#include "restore_job.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: caftrain_restore_child <storage_path> <run_name> <step_sleep_ms>\n";
    return 2;
  }
  caf::actor_system_config cfg;
  caftrain::init(cfg);
  caf::actor_system sys{cfg};
  auto options = caftrain::test::restore_job_options(argv[1], argv[2], std::stoll(argv[3]));
  auto result = caftrain::TorchTrainer(sys, caftrain::test::restore_job, options).fit();
  if (!result.ok()) {
    std::cerr << "caftrain_restore_child: " << result.error->message << std::endl;
    return 1;
  }
  return 0;
}
