// Catch2 entry point of caftrain's tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include "actors/worker_process.hpp"

namespace {

/// Worker processes of a run (ScalingConfig.worker_mode "process") start this binary
/// again: for the test case that runs, not for every test.
class WorkerCommand : public Catch::TestEventListenerBase {
 public:
  using TestEventListenerBase::TestEventListenerBase;

  void testCaseStarting(Catch::TestCaseInfo const& info) override {
    std::string spec;
    for (char c : info.name) {
      if (c == '\\' || c == ',' || c == '[' || c == ']' || c == '*' || c == '"')
        spec += '\\';
      spec += c;
    }
    caftrain::set_worker_arguments({spec});
    caftrain::detail::restart_job_numbering();
  }
};

} // namespace

CATCH_REGISTER_LISTENER(WorkerCommand)
