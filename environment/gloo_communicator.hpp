// GlooCommunicator: the Communicator over gloo's TCP transport, for CPU tensors.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "environment/communicator.hpp"

namespace caftrain {

class Store;

/// Options of a `GlooCommunicator`; fixed once the communicator is created.
struct GlooOptions {
  /// Timeout of the rendezvous and of every collective. Default 30 s.
  std::chrono::milliseconds timeout{30000};
  /// Host name or address the TCP transport binds to and advertises to its peers.
  /// Default "127.0.0.1": every rank on this machine.
  std::string hostname = "127.0.0.1";
  /// Compare every collective's operation, dtype and size across the ranks before it
  /// runs, and fail it with `Error(rank_mismatch)` naming each rank's request when they
  /// differ. Without the check such a mismatch terminates the process inside gloo. The
  /// signatures travel when a collective is issued, so the check costs little latency
  /// (`bench_allreduce` measures it). Default true.
  bool check_signatures = true;
};

/// The allreduce algorithms of gloo that `GlooCommunicator` chooses between.
enum class GlooAllreduceAlgorithm {
  /// Pipelined ring: bandwidth-optimal, 2 * (size - 1) steps.
  ring,
  /// Recursive halving over groups of two: 2 * log2(size) steps, for small messages.
  bcube,
};

/// The enumerator's name, e.g. "ring".
const char* to_string(GlooAllreduceAlgorithm algorithm);

/// The algorithm `GlooCommunicator::allreduce` uses for `bytes` over `size` ranks.
GlooAllreduceAlgorithm gloo_allreduce_algorithm(size_t bytes, int size);

/// A `Communicator` over gloo (c10d's ProcessGroupGloo): CPU tensors of dtype float32,
/// float64, float16, bfloat16, int32, int64 or uint8, contiguous. Every collective is
/// queued on one communication thread per communicator and runs in issue order (a caller
/// that waits, with the full timeout, on the collective next in line runs it on its own
/// thread instead, which saves a thread hand-over on busy machines), each
/// with its own gloo tag (the issue sequence number), so consecutive collectives never
/// cross. A failed collective closes this rank's connections, which fails the peers'
/// pending collectives at once; the communicator is unusable afterwards and every later
/// collective fails with `collective_aborted` (rendezvous again under a new prefix).
/// Ranks must pass tensors of the same numel and dtype: gloo cannot detect a mismatch
/// and terminates the process (an exception escapes its network thread).
class GlooCommunicator : public Communicator {
 public:
  /// Shared by the communicator, its communication thread and its pending work.
  struct State;

  // -- constructors -----------------------------------------------------------------

  /// Rendezvouses `size` ranks through `store` (pass a fresh `PrefixStore` per attempt)
  /// and connects every pair of them over TCP. Blocks until every rank has joined;
  /// throws `Error(collective_timeout)` naming this rank when they do not within
  /// `options.timeout`, and `Error(invalid_argument)` for a bad rank, size or timeout.
  static std::shared_ptr<GlooCommunicator> create(std::shared_ptr<Store> store, int rank,
                                                  int size, GlooOptions options = {});

  /// Closes the communicator and returns without waiting for a collective stuck in
  /// gloo: the communication thread owns what it touches and ends on its own.
  ~GlooCommunicator() override;

  GlooCommunicator(const GlooCommunicator&) = delete;
  GlooCommunicator& operator=(const GlooCommunicator&) = delete;

  // -- properties -------------------------------------------------------------------

  int rank() const override;
  int size() const override;
  std::string backend() const override;
  std::chrono::milliseconds timeout() const override;

  // -- collectives ------------------------------------------------------------------
  //
  // Each throws `Error(invalid_argument)` at once for a tensor that is not a contiguous
  // CPU tensor of a supported dtype, or whose size does not fit the collective.

  /// Sum, min, max and product are gloo's reductions; avg is a sum divided by size()
  /// and refuses integer tensors. The algorithm is `gloo_allreduce_algorithm`'s choice.
  std::shared_ptr<Work> allreduce(at::Tensor tensor, ReduceOp op = ReduceOp::sum) override;

  std::shared_ptr<Work> broadcast(at::Tensor tensor, int root = 0) override;

  std::shared_ptr<Work> allgather(at::Tensor input, at::Tensor output) override;

  /// A ring over gloo's point-to-point buffers: size() - 1 steps, in each of which rank
  /// r sends one chunk to rank r + 1 and receives one from rank r - 1, so every rank sends
  /// (size() - 1) / size() of `input`. `input` is left untouched (the partial sums travel
  /// through two scratch chunks of output's size).
  std::shared_ptr<Work> reduce_scatter(at::Tensor input, at::Tensor output,
                                       ReduceOp op = ReduceOp::sum) override;

  std::shared_ptr<Work> barrier() override;

  // -- lifetime ---------------------------------------------------------------------

  /// Closes this rank's connections, which fails the peers' pending collectives at once
  /// ("connection reset"), fails this rank's pending and future work with
  /// `collective_aborted` at once, and wakes the communication thread if gloo blocks it.
  void close() override;

  bool closed() const override;

 private:
  explicit GlooCommunicator(std::shared_ptr<State> state);

  std::shared_ptr<State> state_;
};

} // namespace caftrain
