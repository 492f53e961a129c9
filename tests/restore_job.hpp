// The job of the restore test, shared by tests/restore_child.cpp (which runs it in a process
// of its own, to be killed) and tests/test_restore.cpp (which restores and re-runs it), so
// that both run exactly the same code.
#pragma once

#include <cstdint>
#include <string>

#include "actors/run_config.hpp"

namespace caftrain::test {

/// Optimizer steps of the job: 2 epochs of 12 steps on each of 2 ranks.
constexpr int64_t kRestoreJobSteps = 24;

/// A checkpoint is attached to every this many reports (one report per step).
constexpr int64_t kRestoreJobCheckpointEvery = 2;

/// The train function: a small classifier on seeded random data with DDP, reporting every
/// step and resuming from `train::get_checkpoint()`. Config: "step_sleep_ms" (default 0)
/// pauses each step, so that a process running it can be killed mid-run.
void restore_job(const Config& config);

/// The options of the job's run: 2 workers, run `name` under `storage`.
TorchTrainerOptions restore_job_options(const std::string& storage, const std::string& name,
                                        int64_t step_sleep_ms);

} // namespace caftrain::test
