// Whether this process hosts one rank alone (a worker process) or may host several
// (threads of a driver, trials of a Tuner). Set once by the worker-process entry point;
// read where per-process state (libtorch's CPU generator) is saved per rank.
#pragma once

namespace caftrain {

/// Marks this process as the home of exactly one rank (its whole life).
void set_single_rank_process() noexcept;

/// True in a worker process: process-wide state (libtorch's default CPU generator) is
/// that rank's own.
bool single_rank_process() noexcept;

} // namespace caftrain
