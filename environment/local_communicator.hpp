// LocalCommunicator: collectives between ranks that are threads of one process, through
// shared memory.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "environment/communicator.hpp"

namespace caftrain {

/// The ranks of one process that form a group; shared by their `LocalCommunicator`s.
class LocalGroup;

/// A `Communicator` for ranks that are threads of the same process (local placement):
/// collectives read and write the peers' tensors directly instead of copying them
/// through TCP. A collective returns once its tensors are posted. The rank whose post
/// completes it (the last to arrive) does its work at once, reducing on arrival: in DDP
/// that is inside its backward, while the bucket is in cache and the other ranks go on
/// computing. Every rank that waits claims chunks of what is left until none is, then
/// waits for the rest; a rank that posted but has not waited yet never delays the others
/// (`CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL=0` leaves all the work to the waits). CPU tensors of any floating or integer dtype; the k-th collective of every rank
/// must be the same operation on tensors of the same numel and dtype (checked:
/// `Error(rank_mismatch)`). Closing any rank's communicator fails every pending and future
/// collective of the group at once.
class LocalCommunicator : public Communicator {
 public:
  // -- constructors -----------------------------------------------------------------

  /// One communicator per rank of a new group of `size` ranks, index = rank.
  static std::vector<std::shared_ptr<LocalCommunicator>>
  create_group(int size, std::chrono::milliseconds timeout = std::chrono::seconds(300));

  LocalCommunicator(std::shared_ptr<LocalGroup> group, int rank);
  ~LocalCommunicator() override;

  // -- properties -------------------------------------------------------------------

  int rank() const override;
  int size() const override;
  std::string backend() const override;
  std::chrono::milliseconds timeout() const override;

  // -- collectives ------------------------------------------------------------------

  std::shared_ptr<Work> allreduce(at::Tensor tensor, ReduceOp op = ReduceOp::sum) override;
  std::shared_ptr<Work> broadcast(at::Tensor tensor, int root = 0) override;
  std::shared_ptr<Work> allgather(at::Tensor input, at::Tensor output) override;
  /// `input` is left unchanged.
  std::shared_ptr<Work> reduce_scatter(at::Tensor input, at::Tensor output,
                                       ReduceOp op = ReduceOp::sum) override;
  std::shared_ptr<Work> barrier() override;

  // -- lifetime ---------------------------------------------------------------------

  void close() override;
  bool closed() const override;

 private:
  std::shared_ptr<LocalGroup> group_;
  int rank_;
};

} // namespace caftrain
