#include "environment/local_communicator.hpp"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>

#include <torch/torch.h>

#include "core/error.hpp"

namespace caftrain {

namespace {

/// Elements per unit of work a waiting rank claims: large enough that claiming costs
/// nothing next to the copy, small enough that two ranks split a bucket evenly.
constexpr int64_t kChunkElements = 64 * 1024;

enum class OpKind { allreduce, broadcast, allgather, reduce_scatter, barrier };

const char* name_of(OpKind kind) {
  switch (kind) {
    case OpKind::allreduce: return "allreduce";
    case OpKind::broadcast: return "broadcast";
    case OpKind::allgather: return "allgather";
    case OpKind::reduce_scatter: return "reduce_scatter";
    case OpKind::barrier: return "barrier";
  }
  return "?";
}

/// One collective of the group: every rank's tensors and the progress of its work.
struct Op {
  OpKind kind = OpKind::barrier;
  ReduceOp reduce = ReduceOp::sum;
  int root = 0;
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  uint64_t seq = 0;
  std::vector<at::Tensor> inputs;
  std::vector<at::Tensor> outputs;
  int posted = 0;
  int64_t chunks_per_part = 0;
  int64_t chunks = 0;
  std::atomic<int64_t> next_chunk{0};
  int64_t done_chunks = 0;
  bool complete = false;
  std::exception_ptr error;
};

void combine(at::Tensor& acc, const at::Tensor& other, ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg: acc.add_(other); break;
    case ReduceOp::product: acc.mul_(other); break;
    case ReduceOp::min: at::minimum_out(acc, acc, other); break;
    case ReduceOp::max: at::maximum_out(acc, acc, other); break;
  }
}

/// Processes chunk `c` of `op` (no lock held: each chunk has exactly one owner).
void run_chunk(Op& op, int size, int64_t c) {
  auto part = c / op.chunks_per_part;     // which rank's part (allgather, reduce_scatter)
  auto sub = c % op.chunks_per_part;      // which piece of it
  // op.numel is the whole tensor (allreduce, broadcast) or one rank's part (the others).
  auto begin = sub * kChunkElements;
  auto len = std::min(kChunkElements, op.numel - begin);
  if (len <= 0)
    return;
  switch (op.kind) {
    case OpKind::allreduce: {
      auto acc = op.outputs[0].narrow(0, begin, len);
      for (int r = 1; r < size; ++r)
        combine(acc, op.outputs[static_cast<size_t>(r)].narrow(0, begin, len), op.reduce);
      if (op.reduce == ReduceOp::avg)
        acc.div_(size);
      for (int r = 1; r < size; ++r)
        op.outputs[static_cast<size_t>(r)].narrow(0, begin, len).copy_(acc);
      break;
    }
    case OpKind::broadcast: {
      auto src = op.outputs[static_cast<size_t>(op.root)].narrow(0, begin, len);
      for (int r = 0; r < size; ++r)
        if (r != op.root)
          op.outputs[static_cast<size_t>(r)].narrow(0, begin, len).copy_(src);
      break;
    }
    case OpKind::allgather: {
      auto src = op.inputs[static_cast<size_t>(part)].narrow(0, begin, len);
      for (int r = 0; r < size; ++r)
        op.outputs[static_cast<size_t>(r)].narrow(0, part * op.numel + begin, len).copy_(src);
      break;
    }
    case OpKind::reduce_scatter: {
      auto acc = op.outputs[static_cast<size_t>(part)].narrow(0, begin, len);
      acc.copy_(op.inputs[0].narrow(0, part * op.numel + begin, len));
      for (int r = 1; r < size; ++r)
        combine(acc, op.inputs[static_cast<size_t>(r)].narrow(0, part * op.numel + begin, len),
                op.reduce);
      if (op.reduce == ReduceOp::avg)
        acc.div_(size);
      break;
    }
    case OpKind::barrier: break;
  }
}

at::Tensor flat(const at::Tensor& t, int rank, const char* op, const char* role) {
  auto where = "local rank " + std::to_string(rank) + ": " + op + ": " + role;
  if (!t.defined())
    throw Error(Errc::invalid_argument, where + " is an undefined tensor");
  if (!t.device().is_cpu())
    throw Error(Errc::invalid_argument,
                where + " is on " + t.device().str() +
                  "; the local communicator takes CPU tensors (use the NCCL backend for GPUs)");
  if (!t.is_contiguous())
    throw Error(Errc::invalid_argument, where + " is not contiguous; pass tensor.contiguous()");
  return t.view({-1});
}

} // namespace

// -- the group ------------------------------------------------------------------------------

class LocalGroup {
 public:
  LocalGroup(int size, std::chrono::milliseconds timeout)
    : size_(size), timeout_(timeout), next_seq_(static_cast<size_t>(size), 0) {
    // CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL=0 leaves all the work to wait() (to measure).
    auto* env = std::getenv("CAFTRAIN_LOCAL_REDUCE_ON_ARRIVAL");
    reduce_on_arrival_ = !(env && std::string(env) == "0");
  }

  int size() const noexcept {
    return size_;
  }

  std::chrono::milliseconds timeout() const noexcept {
    return timeout_;
  }

  std::shared_ptr<Op> post(int rank, OpKind kind, ReduceOp reduce, int root, at::Tensor in,
                           at::Tensor out) {
    std::unique_lock<std::mutex> guard(mtx_);
    if (closed_)
      throw Error(Errc::collective_aborted, "local rank " + std::to_string(rank) + ": " +
                                              name_of(kind) + " after the group was closed");
    auto seq = next_seq_[static_cast<size_t>(rank)]++;
    auto& slot = ops_[seq];
    auto numel = out.defined() ? (kind == OpKind::reduce_scatter ? out.numel() : in.numel()) : 0;
    auto dtype = in.defined() ? in.scalar_type() : c10::ScalarType::Undefined;
    if (!slot) {
      slot = std::make_shared<Op>();
      slot->kind = kind;
      slot->reduce = reduce;
      slot->root = root;
      slot->numel = numel;
      slot->dtype = dtype;
      slot->seq = seq;
      slot->inputs.resize(static_cast<size_t>(size_));
      slot->outputs.resize(static_cast<size_t>(size_));
    } else if (slot->kind != kind || slot->numel != numel || slot->dtype != dtype ||
               slot->root != root || slot->reduce != reduce) {
      auto op = slot;
      op->error = std::make_exception_ptr(
        Error(Errc::rank_mismatch,
              "collective #" + std::to_string(seq) + " differs between ranks: rank " +
                std::to_string(rank) + " issued " + name_of(kind) + " of " +
                std::to_string(numel) + " elements, another rank " + name_of(op->kind) + " of " +
                std::to_string(op->numel) + "; every rank must issue the same collectives in "
                                            "the same order"));
      op->complete = true;
      cv_.notify_all();
      std::rethrow_exception(op->error);
    }
    auto op = slot;
    op->inputs[static_cast<size_t>(rank)] = std::move(in);
    op->outputs[static_cast<size_t>(rank)] = std::move(out);
    if (++op->posted == size_) {
      bool per_rank = kind == OpKind::allgather || kind == OpKind::reduce_scatter;
      op->chunks_per_part = std::max<int64_t>(1, (op->numel + kChunkElements - 1) / kChunkElements);
      op->chunks = kind == OpKind::barrier || op->numel == 0
                     ? 0
                     : op->chunks_per_part * (per_rank ? size_ : 1);
      if (op->chunks == 0)
        op->complete = true;
      ops_.erase(seq); // everyone has it; the Works keep it alive
      cv_.notify_all();
      // Reduce on arrival: the rank whose tensors complete the collective does its work
      // now (in DDP, inside its backward, while the buckets it just wrote are in cache and
      // the other ranks go on computing), sharing chunks with any rank already waiting.
      if (reduce_on_arrival_)
        work_on(*op, guard);
    }
    return op;
  }

  void wait(Op& op, int rank, std::chrono::milliseconds timeout) {
    if (timeout.count() == 0)
      timeout = timeout_;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    std::unique_lock<std::mutex> guard(mtx_);
    auto ready = [&] { return closed_ || op.complete || op.posted == size_; };
    if (!cv_.wait_until(guard, deadline, ready))
      throw timed_out(op, rank, timeout, "not every rank has issued it");
    check(op, rank);
    work_on(op, guard);
    if (!cv_.wait_until(guard, deadline, [&] { return closed_ || op.complete; }))
      throw timed_out(op, rank, timeout, "its work did not finish");
    check(op, rank);
  }

  bool completed(const Op& op) {
    std::lock_guard<std::mutex> guard(mtx_);
    return op.complete;
  }

  std::exception_ptr error(const Op& op) {
    std::lock_guard<std::mutex> guard(mtx_);
    if (op.error)
      return op.error;
    if (closed_ && !op.complete)
      return std::make_exception_ptr(aborted(op, -1));
    return nullptr;
  }

  void close() {
    {
      std::lock_guard<std::mutex> guard(mtx_);
      closed_ = true;
    }
    cv_.notify_all();
  }

  bool closed() {
    std::lock_guard<std::mutex> guard(mtx_);
    return closed_;
  }

 private:
  /// Claims chunks of `op` and runs them (without the lock) until none are left; a
  /// chunk's failure becomes the collective's.
  void work_on(Op& op, std::unique_lock<std::mutex>& guard) {
    while (!op.complete) {
      auto c = op.next_chunk.fetch_add(1);
      if (c >= op.chunks)
        break;
      guard.unlock();
      std::exception_ptr failure;
      try {
        run_chunk(op, size_, c);
      } catch (...) {
        failure = std::current_exception();
      }
      guard.lock();
      if (failure && !op.error)
        op.error = failure;
      if (++op.done_chunks == op.chunks) {
        op.complete = true;
        cv_.notify_all();
      }
    }
  }

  void check(Op& op, int rank) {
    if (op.error)
      std::rethrow_exception(op.error);
    if (closed_ && !op.complete)
      throw aborted(op, rank);
  }

  Error aborted(const Op& op, int rank) {
    return Error(Errc::collective_aborted,
                 "local rank " + std::to_string(rank) + ": " + name_of(op.kind) + " #" +
                   std::to_string(op.seq) + " aborted: the group was closed");
  }

  Error timed_out(const Op& op, int rank, std::chrono::milliseconds timeout, const char* why) {
    std::string missing;
    for (int r = 0; r < size_; ++r)
      if (!op.outputs[static_cast<size_t>(r)].defined() && op.kind != OpKind::barrier)
        missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    return Error(Errc::collective_timeout,
                 "local rank " + std::to_string(rank) + ": " + name_of(op.kind) + " #" +
                   std::to_string(op.seq) + " timed out after " + std::to_string(timeout.count()) +
                   " ms: " + why + (missing.empty() ? "" : " (missing ranks: " + missing + ")"));
  }

  int size_;
  std::chrono::milliseconds timeout_;
  std::mutex mtx_;
  std::condition_variable cv_;
  std::map<uint64_t, std::shared_ptr<Op>> ops_;
  std::vector<uint64_t> next_seq_;
  bool closed_ = false;
  bool reduce_on_arrival_ = true;
};

// -- work -----------------------------------------------------------------------------------

namespace {

class LocalWork : public Work {
 public:
  LocalWork(std::shared_ptr<LocalGroup> group, std::shared_ptr<Op> op, int rank)
    : group_(std::move(group)), op_(std::move(op)), rank_(rank) {
    // nop
  }

  void wait(std::chrono::milliseconds timeout) override {
    group_->wait(*op_, rank_, timeout);
  }

  bool is_completed() const override {
    return group_->completed(*op_) || exception() != nullptr;
  }

  std::exception_ptr exception() const override {
    return group_->error(*op_);
  }

 private:
  std::shared_ptr<LocalGroup> group_;
  std::shared_ptr<Op> op_;
  int rank_;
};

} // namespace

// -- LocalCommunicator --------------------------------------------------------------------

std::vector<std::shared_ptr<LocalCommunicator>>
LocalCommunicator::create_group(int size, std::chrono::milliseconds timeout) {
  if (size < 1)
    throw Error(Errc::invalid_argument, "a local group needs at least 1 rank");
  if (timeout.count() <= 0)
    throw Error(Errc::invalid_argument, "a local group needs a positive timeout");
  auto group = std::make_shared<LocalGroup>(size, timeout);
  std::vector<std::shared_ptr<LocalCommunicator>> result;
  for (int r = 0; r < size; ++r)
    result.push_back(std::make_shared<LocalCommunicator>(group, r));
  return result;
}

LocalCommunicator::LocalCommunicator(std::shared_ptr<LocalGroup> group, int rank)
  : group_(std::move(group)), rank_(rank) {
  // nop
}

LocalCommunicator::~LocalCommunicator() = default;

int LocalCommunicator::rank() const {
  return rank_;
}

int LocalCommunicator::size() const {
  return group_->size();
}

std::string LocalCommunicator::backend() const {
  return "local";
}

std::chrono::milliseconds LocalCommunicator::timeout() const {
  return group_->timeout();
}

std::shared_ptr<Work> LocalCommunicator::allreduce(at::Tensor tensor, ReduceOp op) {
  auto t = flat(tensor, rank_, "allreduce", "tensor");
  if (op == ReduceOp::avg && !at::isFloatingType(t.scalar_type()))
    throw Error(Errc::invalid_argument, "allreduce: avg of an integer tensor would truncate; "
                                        "use sum and divide, or a floating tensor");
  return std::make_shared<LocalWork>(group_, group_->post(rank_, OpKind::allreduce, op, 0, t, t), rank_);
}

std::shared_ptr<Work> LocalCommunicator::broadcast(at::Tensor tensor, int root) {
  if (root < 0 || root >= size())
    throw Error(Errc::invalid_argument, "broadcast: root " + std::to_string(root) +
                                          " is not a rank of this group of " +
                                          std::to_string(size()));
  auto t = flat(tensor, rank_, "broadcast", "tensor");
  return std::make_shared<LocalWork>(
    group_, group_->post(rank_, OpKind::broadcast, ReduceOp::sum, root, t, t), rank_);
}

std::shared_ptr<Work> LocalCommunicator::allgather(at::Tensor input, at::Tensor output) {
  auto in = flat(input, rank_, "allgather", "input");
  auto out = flat(output, rank_, "allgather", "output");
  if (out.numel() != in.numel() * size() || out.scalar_type() != in.scalar_type())
    throw Error(Errc::invalid_argument,
                "allgather: output must hold size() * input.numel() = " +
                  std::to_string(in.numel() * size()) + " elements of the input's dtype, has " +
                  std::to_string(out.numel()));
  return std::make_shared<LocalWork>(
    group_, group_->post(rank_, OpKind::allgather, ReduceOp::sum, 0, in, out), rank_);
}

std::shared_ptr<Work> LocalCommunicator::reduce_scatter(at::Tensor input, at::Tensor output,
                                                        ReduceOp op) {
  auto in = flat(input, rank_, "reduce_scatter", "input");
  auto out = flat(output, rank_, "reduce_scatter", "output");
  if (in.numel() != out.numel() * size() || out.scalar_type() != in.scalar_type())
    throw Error(Errc::invalid_argument,
                "reduce_scatter: input must hold size() * output.numel() = " +
                  std::to_string(out.numel() * size()) + " elements of the output's dtype, has " +
                  std::to_string(in.numel()));
  if (op == ReduceOp::avg && !at::isFloatingType(out.scalar_type()))
    throw Error(Errc::invalid_argument, "reduce_scatter: avg of an integer tensor would truncate");
  return std::make_shared<LocalWork>(
    group_, group_->post(rank_, OpKind::reduce_scatter, op, 0, in, out), rank_);
}

std::shared_ptr<Work> LocalCommunicator::barrier() {
  return std::make_shared<LocalWork>(
    group_, group_->post(rank_, OpKind::barrier, ReduceOp::sum, 0, at::Tensor(), at::Tensor()),
    rank_);
}

void LocalCommunicator::close() {
  group_->close();
}

bool LocalCommunicator::closed() const {
  return group_->closed();
}

} // namespace caftrain
