// Worker processes: a run with ScalingConfig.worker_mode "process" starts this program
// again once per rank (as torchrun or mpirun do; the code is already there), and the
// program, reaching the same TorchTrainer, runs that rank instead of a run.
//
// How a program becomes a worker: `caftrain::init(cfg)` finds the variables the trainer
// set (CAFTRAIN_WORKER_HUB and friends) and loads CAF's middleman; the program then goes
// on as usual until it constructs the matching TorchTrainer (the n-th with worker_mode
// "process", as in the driver); its `fit()` or `start()` connects to the run's trainer actor,
// trains the rank with the train function of this process, and ends the process. Every
// other TorchTrainer of a worker process is inert: no run directory, no actor, and its
// `fit()` returns a Result whose error says it was skipped. So the code before `fit()`
// runs in every worker, as with torchrun: it should build the model and data, not start
// other jobs.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <caf/fwd.hpp>

namespace caftrain {

struct TorchTrainerOptions;
struct RunSpec;

/// True in a worker process started by a run (also before `caftrain::init`).
bool is_worker_process() noexcept;

/// The arguments (after argv[0]) worker processes get. Default: this program's own. A
/// program whose workers need others (a test binary running one test case, say) sets them
/// before `fit()`. Worker processes on this machine always run this very binary
/// (/proc/self/exe).
void set_worker_arguments(std::vector<std::string> args);

/// The command line of worker processes: argv[0] as this program was started, then
/// `set_worker_arguments`' arguments, else this program's own.
std::vector<std::string> worker_command();

namespace detail {

/// What a worker process learns from its environment.
struct WorkerProcessEnv {
  /// Where the run's hub listens.
  std::string hub_host;
  uint16_t hub_port = 0;
  /// The rank's key at the hub (one per rank and attempt).
  std::string key;
  /// The run's name in the driver, and the number of its TorchTrainer there.
  std::string run_name;
  int64_t job = 0;
  /// A warm spare (FailureConfig::warm_spares): its hello waits until a restart needs it.
  bool spare = false;
};

/// Reads the worker variables (once per process); loads the middleman into `cfg` when
/// this is a worker process or a driver that can start them. Called by `caftrain::init`.
void detect_worker_process(caf::actor_system_config& cfg);

/// The worker variables, when this is a worker process.
const std::optional<WorkerProcessEnv>& worker_process_env() noexcept;

/// The number of the next TorchTrainer with worker_mode "process" (0, 1, ...).
int64_t next_job();

/// Numbers the next such TorchTrainer 0 again: for a program that is several programs in
/// one, such as a test binary (each test case starts its worker processes for itself).
void restart_job_numbering();

/// True when `spec` is the run this worker process was started for.
bool is_my_job(const RunSpec& spec) noexcept;

/// Connects to the run's hub, trains the rank this process was started for with
/// `spec.train_func`, tells the launcher how it ended, and ends the process (exit status
/// 0 when the rank succeeded, 1 when it failed, 3 when it could not reach the run).
[[noreturn]] void run_worker_process(caf::actor_system& system, const RunSpec& spec);

} // namespace detail

} // namespace caftrain
