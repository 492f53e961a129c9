// NcclCommunicator: the Communicator over NCCL, for CUDA tensors.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "environment/communicator.hpp"

namespace caftrain {

class Store;

/// Options of an `NcclCommunicator`; fixed once the communicator is created.
struct NcclOptions {
  /// Timeout of the rendezvous and of every collective, counted from the moment the
  /// collective is issued. Default 30 s.
  std::chrono::milliseconds timeout{30000};
  /// CUDA device this rank drives; its tensors must live there. Default -1: rank % the
  /// number of devices this process sees (one GPU per rank, ranks of a node numbered
  /// consecutively).
  int device = -1;
};

/// A `Communicator` over NCCL (c10d's ProcessGroupNCCL): CUDA tensors of dtype float32,
/// float64, float16, bfloat16, int32, int64 or uint8, contiguous, on the communicator's
/// device. Built on the CUDA runtime and NCCL's C API only, so it compiles against a
/// CPU-only libtorch; it needs a CUDA-enabled one to do anything useful.
///
/// Streams: every collective runs on a CUDA stream of the communicator, after that stream
/// has waited for an event recorded on the legacy default stream at issue time, which is
/// where libtorch 1.13 computes unless told otherwise: the collective sees everything
/// issued before it on that stream, and the computation issued after it overlaps the
/// communication. Code computing on another stream must synchronise it with the legacy
/// default stream before issuing a collective. `Work::wait` makes the legacy default
/// stream wait for the collective (later GPU work there sees its result) and also blocks
/// the calling thread until the collective has finished, so its result can be read from
/// the host at once. Tensors stay referenced until the GPU has finished with them, even
/// when the `Work` is dropped without a wait (the role of c10d's `recordStream`).
///
/// Timeouts and failures: the communicator is non-blocking (NCCL's `blocking = 0`), so
/// that the rendezvous and each collective can be given up after `NcclOptions::timeout`.
/// A wait that passes the collective's timeout aborts the communicator (`ncclCommAbort`)
/// and throws `Error(collective_timeout)`; a wait with a shorter timeout of its own gives
/// up without aborting, and the collective goes on. An asynchronous NCCL error aborts the
/// communicator too: `collective_aborted` when NCCL blames a peer or the network
/// (`ncclRemoteError`), `worker_failed` for a failure on this rank. After an abort every
/// pending collective fails with that error and every later one with `collective_aborted`
/// (rendezvous again under a new prefix).
///
/// Unlike gloo, an aborted rank does not wake its peers: a peer inside a collective with
/// an aborted rank stalls until its own timeout passes or its own communicator is closed.
/// The trainer closes the communicator of every rank when it tears an attempt down, which
/// ends such stalls at once.
class NcclCommunicator : public Communicator {
 public:
  /// Shared by the communicator and its pending work.
  struct State;

  // -- constructors -----------------------------------------------------------------

  /// Rendezvouses `size` ranks through `store` (pass a fresh `PrefixStore` per attempt):
  /// rank 0 publishes an NCCL unique id under "nccl_unique_id", the others read it, and
  /// every rank initialises its NCCL communicator on its device. Blocks until every rank
  /// has joined. Throws `Error(unavailable)` when this process sees no CUDA GPU or not the
  /// requested device, `Error(collective_timeout)` naming this rank when the ranks do not
  /// all join within `options.timeout`, and `Error(invalid_argument)` for a bad rank,
  /// size, timeout or device.
  static std::shared_ptr<NcclCommunicator> create(std::shared_ptr<Store> store, int rank,
                                                  int size, NcclOptions options = {});

  /// Aborts the communicator unless already closed and frees its stream. Never blocks on
  /// the peers: it gives the GPU a short grace period to finish the pending collectives'
  /// kernels, then returns.
  ~NcclCommunicator() override;

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  // -- properties -------------------------------------------------------------------

  int rank() const override;
  int size() const override;
  std::string backend() const override;
  std::chrono::milliseconds timeout() const override;

  /// The CUDA device this rank drives.
  int device() const;

  // -- collectives ------------------------------------------------------------------
  //
  // Each throws `Error(invalid_argument)` at once for a tensor that `check_nccl_tensor`
  // refuses or whose size does not fit the collective. Each returns once NCCL has
  // queued the collective on the communicator's stream: at once, except for the first
  // collectives between ranks, for which NCCL connects them and the call waits for the
  // peers (up to the timeout; a collective that cannot be queued in time comes back
  // failed with `collective_timeout`).

  /// ncclAllReduce in place; avg is ncclAvg and refuses integer tensors.
  std::shared_ptr<Work> allreduce(at::Tensor tensor, ReduceOp op = ReduceOp::sum) override;

  /// ncclBroadcast in place.
  std::shared_ptr<Work> broadcast(at::Tensor tensor, int root = 0) override;

  /// ncclAllGather into `output`.
  std::shared_ptr<Work> allgather(at::Tensor input, at::Tensor output) override;

  /// ncclReduceScatter; `input` is left untouched. avg refuses integer tensors.
  std::shared_ptr<Work> reduce_scatter(at::Tensor input, at::Tensor output,
                                       ReduceOp op = ReduceOp::sum) override;

  /// An allreduce of one int32 on the device; its `wait` returns once every rank came.
  std::shared_ptr<Work> barrier() override;

  // -- lifetime ---------------------------------------------------------------------

  /// Aborts this rank's NCCL communicator: this rank's pending and future collectives
  /// fail with `collective_aborted` at once. The peers are not told (see the class
  /// comment): close every rank's communicator to end a collective everywhere.
  void close() override;

  bool closed() const override;

 private:
  explicit NcclCommunicator(std::shared_ptr<State> state);

  std::shared_ptr<State> state_;
};

/// Checks that `tensor` can take part in an NCCL collective of a communicator on CUDA
/// device `device`: defined, dense, of a supported dtype, contiguous, and on that device.
/// Throws `Error(invalid_argument)` whose message starts with `what` and names the fix.
/// Every collective checks its tensors with it.
void check_nccl_tensor(const at::Tensor& tensor, int device, const std::string& what);

} // namespace caftrain
