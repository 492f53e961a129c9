// Communicator: the collective operations a strategy needs, as asynchronous work.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>

namespace caftrain {

/// How a reduction combines the ranks' values.
enum class ReduceOp { sum, avg, min, max, product };

const char* to_string(ReduceOp op);

/// Handle to a collective in flight (c10d's `Work`). The tensors a collective reads and
/// writes must stay alive and untouched until it completes; the handle keeps them alive.
class Work {
 public:
  virtual ~Work();

  /// Blocks until the collective completes, fails or `timeout` passes (zero: the
  /// communicator's own timeout). Throws `Error(collective_timeout)` on timeout and
  /// rethrows the collective's failure (`collective_aborted` when the communicator was
  /// closed, `rank_mismatch` when ranks passed incompatible tensors).
  virtual void wait(std::chrono::milliseconds timeout = std::chrono::milliseconds{0}) = 0;

  /// True once the collective has finished, successfully or not.
  virtual bool is_completed() const = 0;

  /// The failure, or null while running or after success.
  virtual std::exception_ptr exception() const = 0;
};

/// A fixed group of ranks that run collectives together (c10d's ProcessGroup). The group
/// never changes: when membership changes, the trainer tears it down and every rank
/// rendezvouses again under a new key prefix. Every rank must issue the same collectives
/// in the same order; each call returns at once and the work proceeds in the background in
/// issue order. Every collective carries a timeout, and `close()` on any rank makes the
/// pending and future collectives of every rank fail promptly instead of hanging.
class Communicator {
 public:
  virtual ~Communicator();

  // -- properties -------------------------------------------------------------------

  virtual int rank() const = 0;
  virtual int size() const = 0;

  /// "gloo" or "nccl".
  virtual std::string backend() const = 0;

  /// Timeout of each collective.
  virtual std::chrono::milliseconds timeout() const = 0;

  // -- collectives ------------------------------------------------------------------

  /// Reduces `tensor` (contiguous) in place over all ranks.
  virtual std::shared_ptr<Work> allreduce(at::Tensor tensor, ReduceOp op = ReduceOp::sum) = 0;

  /// Copies `tensor` of rank `root` into `tensor` of every other rank.
  virtual std::shared_ptr<Work> broadcast(at::Tensor tensor, int root = 0) = 0;

  /// Concatenates every rank's `input` (same numel on every rank) into `output`, which
  /// holds size() * input.numel() elements, rank r's part at offset r * input.numel().
  virtual std::shared_ptr<Work> allgather(at::Tensor input, at::Tensor output) = 0;

  /// Reduces `input` (size() * output.numel() elements) over all ranks and leaves rank r
  /// the r-th chunk of the result in `output`.
  virtual std::shared_ptr<Work> reduce_scatter(at::Tensor input, at::Tensor output,
                                               ReduceOp op = ReduceOp::sum) = 0;

  /// Completes once every rank has called it.
  virtual std::shared_ptr<Work> barrier() = 0;

  // -- lifetime ---------------------------------------------------------------------

  /// Aborts: pending and future collectives on every rank fail with
  /// `Error(collective_aborted)` promptly. Idempotent; safe from any thread.
  virtual void close() = 0;

  /// True after `close()`.
  virtual bool closed() const = 0;
};

} // namespace caftrain
