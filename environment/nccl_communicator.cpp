#include "environment/nccl_communicator.hpp"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "core/error.hpp"
#include "environment/store.hpp"

// Non-blocking communicators (what makes the rendezvous and the collectives time out),
// ncclAvg, bfloat16 and ncclRemoteError all exist since NCCL 2.14.
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "caftrain's NCCL backend needs NCCL 2.14 or later (or -DCAFTRAIN_WITH_NCCL=OFF)"
#endif

namespace caftrain {

namespace {

using Clock = std::chrono::steady_clock;

// -- constants ------------------------------------------------------------------------

/// Store key under which rank 0 publishes the NCCL unique id of the attempt.
constexpr const char* kUniqueIdKey = "nccl_unique_id";

/// How long a host poll spins before it starts to sleep: a small collective completes
/// within tens of microseconds, and a sleep costs at least as much.
constexpr std::chrono::microseconds kSpinFor{100};

/// First and longest sleep between two polls once spinning is over; the longest bounds
/// how late a wait notices completion, an error or a close.
constexpr std::chrono::microseconds kFirstSleep{20};
constexpr std::chrono::microseconds kLongestSleep{1000};

/// How long the destructor lets the GPU finish the kernels of aborted collectives, which
/// read and write the tensors the communicator still references. An aborted NCCL kernel
/// ends within milliseconds, but a collective whose stream still waits for computation
/// on the default stream starts only after that computation.
constexpr std::chrono::milliseconds kDrainGrace{2000};

// -- helpers --------------------------------------------------------------------------

std::string ms(std::chrono::milliseconds t) {
  return std::to_string(t.count()) + " ms";
}

std::exception_ptr make_error(Errc code, const std::string& message) {
  return std::make_exception_ptr(Error(code, message));
}

std::string message_of(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

std::string cuda_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

/// Throws `Error(worker_failed)` when a CUDA runtime call failed: the CUDA context of
/// this rank is unusable, which makes this rank the cause of the failure.
void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess)
    throw Error(Errc::worker_failed, what + " failed (" + cuda_text(e) + ")");
}

/// NCCL's failure `result` as our Error. NCCL reports `ncclRemoteError` when a peer
/// exited or the network failed: this rank fails as a consequence (`collective_aborted`,
/// which the trainer ranks below the cause). Anything else went wrong on this rank.
Error nccl_error(ncclComm_t comm, ncclResult_t result, const std::string& what) {
  std::string text = ncclGetErrorString(result);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0')
      text += ": " + std::string(last);
  }
  if (result == ncclRemoteError)
    return Error(Errc::collective_aborted,
                 what + ": a peer exited or the network failed (NCCL: " + text + ")");
  return Error(Errc::worker_failed, what + " (NCCL: " + text + ")");
}

/// Sets the calling thread's CUDA device while alive (CUDA's current device is
/// per-thread state of the caller's, which we must leave as we found it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_)
      check_cuda(cudaSetDevice(device_), "cudaSetDevice(" + std::to_string(device_) + ")");
  }

  ~DeviceGuard() {
    if (previous_ != device_)
      cudaSetDevice(previous_);
  }

  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

/// Paces a host poll: spins for `kSpinFor`, then sleeps doubling intervals.
class Backoff {
 public:
  void pause() {
    if (Clock::now() - start_ < kSpinFor) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, kLongestSleep);
  }

 private:
  Clock::time_point start_ = Clock::now();
  std::chrono::microseconds sleep_ = kFirstSleep;
};

// -- element types and reductions -----------------------------------------------------

/// NCCL's type for `dtype`, false for the dtypes we do not reduce (the same set as gloo's).
bool nccl_type_of(at::ScalarType dtype, ncclDataType_t& type) {
  switch (dtype) {
    case at::kFloat: type = ncclFloat32; return true;
    case at::kDouble: type = ncclFloat64; return true;
    case at::kHalf: type = ncclFloat16; return true;
    case at::kBFloat16: type = ncclBfloat16; return true;
    case at::kInt: type = ncclInt32; return true;
    case at::kLong: type = ncclInt64; return true;
    case at::kByte: type = ncclUint8; return true;
    default: return false;
  }
}

ncclDataType_t nccl_type(const at::Tensor& tensor) {
  ncclDataType_t type = ncclFloat32;
  nccl_type_of(tensor.scalar_type(), type); // checked by check_nccl_tensor
  return type;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::min: return ncclMin;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::product: return ncclProd;
  }
  throw Error(Errc::invalid_argument,
              "unknown ReduceOp " + std::to_string(static_cast<int>(op)));
}

/// Queues one collective on `stream`; returns NCCL's result (ncclInProgress included).
using Launch = std::function<ncclResult_t(ncclComm_t comm, cudaStream_t stream)>;

// -- work -----------------------------------------------------------------------------

/// One collective: its tensors, the events that order it, and its outcome. The outcome is
/// found by whoever looks (`wait`, `is_completed`) or decided by an abort; the first
/// decision wins.
class NcclWork : public Work {
 public:
  NcclWork(std::string name, int device, std::chrono::milliseconds timeout,
           std::vector<at::Tensor> tensors, std::weak_ptr<NcclCommunicator::State> state)
    : name(std::move(name)),
      device(device),
      issued(Clock::now()),
      timeout_(timeout),
      tensors_(std::move(tensors)),
      state_(std::move(state)) {
    // nop
  }

  ~NcclWork() override {
    // Destroying an event whose work is pending is fine: CUDA frees it once done.
    if (ready != nullptr)
      cudaEventDestroy(ready);
    if (done != nullptr)
      cudaEventDestroy(done);
  }

  NcclWork(const NcclWork&) = delete;
  NcclWork& operator=(const NcclWork&) = delete;

  void wait(std::chrono::milliseconds timeout) override;

  bool is_completed() const override {
    return poll();
  }

  std::exception_ptr exception() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return error_;
  }

  /// Decides the outcome unless it is decided already.
  void complete(std::exception_ptr error) const {
    std::lock_guard<std::mutex> guard(mtx_);
    if (decided_)
      return;
    decided_ = true;
    error_ = std::move(error);
  }

  bool decided() const {
    std::lock_guard<std::mutex> guard(mtx_);
    return decided_;
  }

  /// "nccl rank 0 of 2 (cuda:0): allreduce", the prefix of every message about it.
  const std::string name;
  const int device;
  const Clock::time_point issued;
  /// Recorded on the legacy default stream at issue; the communicator's stream waits for it.
  cudaEvent_t ready = nullptr;
  /// Recorded on the communicator's stream after the collective (set while issuing).
  cudaEvent_t done = nullptr;
  /// True once `done` is recorded, i.e. the collective is queued on the GPU.
  bool queued = false;

 private:
  /// Observes the collective; true once its outcome is decided.
  bool poll() const;

  const std::chrono::milliseconds timeout_;
  /// Referenced until the GPU has finished with them (see State::inflight).
  const std::vector<at::Tensor> tensors_;
  const std::weak_ptr<NcclCommunicator::State> state_;
  mutable std::mutex mtx_;
  mutable bool decided_ = false;
  mutable std::exception_ptr error_;
};

} // namespace

// -- shared state ---------------------------------------------------------------------

struct NcclCommunicator::State {
  State(ncclComm_t comm, cudaStream_t stream, int rank, int size, int device,
        std::chrono::milliseconds timeout)
    : rank(rank),
      size(size),
      device(device),
      timeout(timeout),
      prefix("nccl rank " + std::to_string(rank) + " of " + std::to_string(size) + " (cuda:" +
             std::to_string(device) + "): "),
      comm(comm),
      stream(stream) {
    // nop
  }

  ~State() {
    // shut_down() has aborted `comm`; the stream's pending work, if any, still completes.
    cudaStreamDestroy(stream);
  }

  const int rank;
  const int size;
  const int device;
  const std::chrono::milliseconds timeout;
  /// "nccl rank 0 of 2 (cuda:0): ", the start of every message.
  const std::string prefix;
  /// This state itself, for the work it issues (set by `create`).
  std::weak_ptr<State> self;

  /// Held while issuing, so collectives reach NCCL in issue order, one at a time (NCCL
  /// takes no new call on a communicator while the last one is in progress).
  std::mutex issue_mtx;
  /// Guards the members below and every NCCL call on `comm`: NCCL's calls on one
  /// communicator are not thread-safe, and `ncclCommAbort` frees it.
  std::mutex mtx;
  /// Null once aborted (by close, a timeout or an error).
  ncclComm_t comm;
  cudaStream_t stream;
  bool closed = false;
  /// Why the communicator was aborted by a failure; non-empty refuses every later one.
  std::string failure;
  /// Work queued on the GPU whose `done` event has not been seen yet. The list holds its
  /// tensors: freed earlier, the caching allocator would hand their memory to computation
  /// on the default stream while the communicator's stream still uses it.
  std::vector<std::shared_ptr<NcclWork>> inflight;

  // -- issuing ----------------------------------------------------------------------

  std::shared_ptr<Work> issue(const char* op, std::vector<at::Tensor> tensors,
                              const Launch& launch) {
    auto work = std::make_shared<NcclWork>(prefix + op, device, timeout, std::move(tensors), self);
    std::lock_guard<std::mutex> issuing(issue_mtx);
    std::unique_lock<std::mutex> guard(mtx);
    if (comm == nullptr) {
      work->complete(refusal(*work));
      return work;
    }
    prune_locked();
    try {
      DeviceGuard device_guard(device);
      try {
        queue_locked(guard, *work, launch);
        inflight.push_back(work);
      } catch (...) {
        fail_locked(*work, std::current_exception());
        // NCCL may have queued part of the collective: keep its tensors until the stream
        // is past it (decided already, the work cannot pass for a success).
        if (work->done != nullptr && cudaEventRecord(work->done, stream) == cudaSuccess)
          inflight.push_back(work);
      }
    } catch (...) {
      fail_locked(*work, std::current_exception()); // the device could not be selected
    }
    return work;
  }

  /// Queues `work` on the communicator's stream behind the caller's default stream, and
  /// its `done` event behind it.
  void queue_locked(std::unique_lock<std::mutex>& guard, NcclWork& work, const Launch& launch) {
    check_cuda(cudaEventCreateWithFlags(&work.ready, cudaEventDisableTiming),
               work.name + ": cudaEventCreateWithFlags");
    check_cuda(cudaEventCreateWithFlags(&work.done, cudaEventDisableTiming),
               work.name + ": cudaEventCreateWithFlags");
    // After everything the caller queued on the default stream so far.
    check_cuda(cudaEventRecord(work.ready, cudaStreamLegacy),
               work.name + ": cudaEventRecord on the default stream");
    check_cuda(cudaStreamWaitEvent(stream, work.ready, 0), work.name + ": cudaStreamWaitEvent");
    settle(guard, work, launch(comm, stream));
    check_cuda(cudaEventRecord(work.done, stream), work.name + ": cudaEventRecord");
    work.queued = true;
  }

  /// Waits while NCCL queues the collective (a non-blocking communicator returns
  /// ncclInProgress while it connects ranks), releasing `guard` between polls so that
  /// `close` and the waits of other work go on. Throws when NCCL fails, the timeout passes,
  /// or the communicator is aborted meanwhile.
  void settle(std::unique_lock<std::mutex>& guard, const NcclWork& work, ncclResult_t result) {
    for (Backoff backoff; result == ncclInProgress;) {
      if (Clock::now() >= work.issued + timeout)
        throw Error(Errc::collective_timeout,
                    work.name + " could not be queued within " + ms(timeout) +
                      ": NCCL connects ranks at their first collectives, and a rank has not "
                      "issued it; the communicator was aborted (rendezvous again)");
      guard.unlock();
      backoff.pause();
      guard.lock();
      if (comm == nullptr)
        throw Error(Errc::collective_aborted,
                    work.name + " aborted while NCCL queued it: " +
                      (closed ? std::string("the communicator was closed") : failure));
      auto queried = ncclCommGetAsyncError(comm, &result);
      if (queried != ncclSuccess)
        result = queried;
    }
    if (result != ncclSuccess)
      throw nccl_error(comm, result, work.name);
  }

  std::exception_ptr refusal(const NcclWork& work) const {
    if (closed)
      return make_error(Errc::collective_aborted,
                        work.name + " refused: the communicator is closed; rendezvous again "
                                    "for a new one");
    return make_error(Errc::collective_aborted,
                      work.name + " refused: an earlier collective failed on this "
                                  "communicator (" + failure + "); rendezvous again");
  }

  // -- completion and failure -------------------------------------------------------

  /// Drops the work whose `done` event has passed, deciding its outcome where nothing
  /// has yet: success, or the CUDA error the event reports.
  void prune_locked() {
    auto finished = [](const std::shared_ptr<NcclWork>& work) {
      auto state = cudaEventQuery(work->done);
      if (state == cudaErrorNotReady)
        return false;
      work->complete(state == cudaSuccess
                       ? nullptr
                       : make_error(Errc::worker_failed,
                                    work->name + ": the GPU failed (" + cuda_text(state) + ")"));
      return true;
    };
    inflight.erase(std::remove_if(inflight.begin(), inflight.end(), finished), inflight.end());
  }

  /// Fails `culprit` with `error` and aborts the communicator for every other pending
  /// collective, unless it is aborted already.
  void fail_locked(const NcclWork& culprit, std::exception_ptr error) {
    culprit.complete(error);
    if (comm == nullptr)
      return;
    failure = message_of(error);
    abort_locked(Errc::collective_aborted, "aborted after " + culprit.name + " failed");
  }

  /// Aborts the communicator when NCCL reports an asynchronous error.
  void check_async_locked() {
    if (comm == nullptr)
      return;
    ncclResult_t async = ncclSuccess;
    auto queried = ncclCommGetAsyncError(comm, &async);
    if (queried != ncclSuccess)
      async = queried;
    if (async == ncclSuccess || async == ncclInProgress)
      return;
    auto error = nccl_error(comm, async, prefix + "the communicator failed");
    failure = error.what();
    abort_locked(error.code(), failure);
  }

  /// Decides every pending collective (success when its kernels have finished, `code` with
  /// `reason` otherwise), then aborts the NCCL communicator, which ends its kernels.
  void abort_locked(Errc code, const std::string& reason) {
    for (auto& work : inflight) {
      if (work->decided())
        continue;
      if (cudaEventQuery(work->done) == cudaSuccess)
        work->complete(nullptr);
      else
        work->complete(make_error(code, work->name + " failed: " + reason));
    }
    try {
      DeviceGuard device_guard(device);
      ncclCommAbort(comm);
    } catch (const Error& e) {
      // Abort all the same: a communicator left alive keeps its kernels spinning.
      spdlog::warn("caftrain: {}aborting without selecting the device: {}", prefix, e.what());
      ncclCommAbort(comm);
    }
    comm = nullptr;
    prune_locked();
  }

  // -- lifetime ---------------------------------------------------------------------

  void close() {
    std::lock_guard<std::mutex> guard(mtx);
    if (closed)
      return;
    closed = true;
    if (comm != nullptr)
      abort_locked(Errc::collective_aborted, "the communicator was closed");
  }

  void shut_down() {
    close();
    std::unique_lock<std::mutex> guard(mtx);
    auto deadline = Clock::now() + kDrainGrace;
    for (Backoff backoff; Clock::now() < deadline;) {
      prune_locked();
      if (inflight.empty())
        return;
      guard.unlock();
      backoff.pause();
      guard.lock();
    }
    prune_locked();
    if (inflight.empty())
      return;
    // The GPU may still write into these tensors: rather than let the caching allocator
    // hand their memory out again, keep them for good.
    spdlog::warn("caftrain: {}{} aborted collective(s) still running on the GPU after {}; "
                 "their tensors are kept until the process ends",
                 prefix, inflight.size(), ms(kDrainGrace));
    auto* kept = new std::vector<std::shared_ptr<NcclWork>>(std::move(inflight)); // never freed
    static_cast<void>(kept);
    inflight.clear();
  }

  // -- argument checks --------------------------------------------------------------

  void check_tensor(const char* op, const char* role, const at::Tensor& tensor) const {
    check_nccl_tensor(tensor, device, prefix + op + ": " + role);
  }

  void check_same_dtype(const char* op, const at::Tensor& input, const at::Tensor& output) const {
    if (input.scalar_type() != output.scalar_type())
      throw Error(Errc::invalid_argument,
                  prefix + op + ": input has dtype " + c10::toString(input.scalar_type()) +
                    " but output has " + c10::toString(output.scalar_type()) +
                    "; they must match");
  }

  void check_op(const char* op, ReduceOp reduce_op, const at::Tensor& tensor) const {
    if (reduce_op == ReduceOp::avg && !at::isFloatingType(tensor.scalar_type()))
      throw Error(Errc::invalid_argument,
                  prefix + op + ": avg of an integer tensor (" +
                    c10::toString(tensor.scalar_type()) +
                    ") would truncate; reduce with sum and divide in floating point");
  }
};

// -- work -----------------------------------------------------------------------------

namespace {

bool NcclWork::poll() const {
  if (decided())
    return true;
  auto event = cudaEventQuery(done);
  auto state = state_.lock();
  if (!state) {
    // The communicator is gone; its destructor decided everything it had queued.
    complete(make_error(Errc::collective_aborted,
                        name + " aborted: the communicator was destroyed"));
    return true;
  }
  // Not blocking: the holder may be an abort, which decides this work before it calls
  // ncclCommAbort (tens of milliseconds or more); the next poll looks again.
  std::unique_lock<std::mutex> guard(state->mtx, std::try_to_lock);
  if (!guard.owns_lock())
    return decided();
  // An abort decides every pending collective before it ends their kernels, so an event
  // that had passed before we took the lock is a collective that did complete.
  if (decided())
    return true;
  if (event == cudaSuccess) {
    complete(nullptr);
    return true;
  }
  if (event != cudaErrorNotReady) {
    state->fail_locked(*this, make_error(Errc::worker_failed,
                                         name + ": the GPU failed (" + cuda_text(event) + ")"));
    return true;
  }
  state->check_async_locked();
  return decided();
}

void NcclWork::wait(std::chrono::milliseconds timeout) {
  auto limit = timeout.count() > 0 ? timeout : timeout_;
  auto deadline = Clock::now() + limit;
  if (queued) {
    // c10d's ordering: GPU work queued on the default stream from now on runs after the
    // collective, whether or not the host wait below succeeds.
    DeviceGuard device_guard(device);
    check_cuda(cudaStreamWaitEvent(cudaStreamLegacy, done, 0),
               name + ": cudaStreamWaitEvent on the default stream");
  }
  for (Backoff backoff; !poll(); backoff.pause()) {
    auto now = Clock::now();
    if (now < deadline)
      continue;
    if (now < issued + timeout_)
      throw Error(Errc::collective_timeout,
                  name + " did not complete within " + ms(limit) +
                    " (Work::wait); it goes on: wait again, or close the communicator");
    if (auto state = state_.lock()) {
      std::lock_guard<std::mutex> guard(state->mtx);
      if (!decided()) // it may have completed since the poll
        state->fail_locked(*this, make_error(Errc::collective_timeout,
                                             name + " timed out after " + ms(timeout_) +
                                               ": a rank has not issued it, or is stuck before "
                                               "it; the communicator was aborted (rendezvous "
                                               "again)"));
    }
  }
  if (auto error = exception())
    std::rethrow_exception(error);
}

} // namespace

// -- free functions -------------------------------------------------------------------

void check_nccl_tensor(const at::Tensor& tensor, int device, const std::string& what) {
  if (!tensor.defined())
    throw Error(Errc::invalid_argument, what + " is an undefined tensor");
  if (tensor.layout() != at::kStrided)
    throw Error(Errc::invalid_argument, what + " is not a dense tensor; pass tensor.to_dense()");
  ncclDataType_t type = ncclFloat32;
  if (!nccl_type_of(tensor.scalar_type(), type))
    throw Error(Errc::invalid_argument,
                what + " has dtype " + c10::toString(tensor.scalar_type()) +
                  ", which the nccl communicator does not support; convert it to float32, "
                  "float64, float16, bfloat16, int32, int64 or uint8");
  if (!tensor.is_contiguous())
    throw Error(Errc::invalid_argument,
                what + " is not contiguous (sizes " + c10::str(tensor.sizes()) + ", strides " +
                  c10::str(tensor.strides()) +
                  "); pass tensor.contiguous() and copy the result back");
  auto cuda = "cuda:" + std::to_string(device);
  if (!tensor.is_cuda())
    throw Error(Errc::invalid_argument,
                what + " is on " + tensor.device().str() +
                  "; the nccl communicator takes CUDA tensors only: move it with "
                  "tensor.to(\"" + cuda + "\"), or use the local or gloo backend for CPU tensors");
  if (tensor.device().index() != device)
    throw Error(Errc::invalid_argument,
                what + " is on " + tensor.device().str() + " but this rank's communicator drives " +
                  cuda + "; move it with tensor.to(\"" + cuda + "\")");
}

// -- constructors ---------------------------------------------------------------------

std::shared_ptr<NcclCommunicator> NcclCommunicator::create(std::shared_ptr<Store> store,
                                                           int rank, int size,
                                                           NcclOptions options) {
  if (!store)
    throw Error(Errc::invalid_argument, "NcclCommunicator::create needs a store");
  if (size < 1 || rank < 0 || rank >= size)
    throw Error(Errc::invalid_argument,
                "NcclCommunicator::create: rank " + std::to_string(rank) + " of size " +
                  std::to_string(size) + " is invalid; need 0 <= rank < size");
  if (options.timeout.count() <= 0)
    throw Error(Errc::invalid_argument,
                "NcclOptions::timeout is " + ms(options.timeout) + "; it must be positive");
  if (options.device < -1)
    throw Error(Errc::invalid_argument,
                "NcclOptions::device is " + std::to_string(options.device) +
                  "; pass a CUDA device index, or -1 for rank % the number of devices");
  auto deadline = Clock::now() + options.timeout;
  auto who = "nccl rank " + std::to_string(rank) + " of " + std::to_string(size);

  int count = 0;
  auto counted = cudaGetDeviceCount(&count);
  if (counted != cudaSuccess || count == 0)
    throw Error(Errc::unavailable,
                who + ": no CUDA GPU is visible to this process (" +
                  (counted != cudaSuccess ? cuda_text(counted) : std::string("0 devices")) +
                  "); the nccl backend reduces CUDA tensors: train on CPU with the local or "
                  "gloo backend, or run on a machine with a GPU and its driver");
  int device = options.device == -1 ? rank % count : options.device;
  if (device >= count)
    throw Error(Errc::unavailable,
                who + ": NcclOptions::device is " + std::to_string(device) +
                  " but this process sees " + std::to_string(count) +
                  " CUDA device(s); pick one below " + std::to_string(count) +
                  ", or -1 for rank % the number of devices");
  who += " (cuda:" + std::to_string(device) + ")";

  ncclUniqueId id;
  if (rank == 0) {
    auto made = ncclGetUniqueId(&id);
    if (made != ncclSuccess)
      throw Error(Errc::unavailable,
                  who + ": ncclGetUniqueId failed (" + std::string(ncclGetErrorString(made)) +
                    "); NCCL needs a network interface for its rendezvous (NCCL_SOCKET_IFNAME "
                    "picks one; NCCL_DEBUG=WARN says more)");
    store->set(kUniqueIdKey, std::vector<char>(id.internal, id.internal + sizeof(id.internal)));
  } else {
    std::vector<char> value;
    try {
      value = store->get(kUniqueIdKey, options.timeout);
    } catch (const Error& e) {
      throw Error(e.code(), who + ": rendezvous failed: rank 0 did not publish the NCCL unique "
                                  "id within " + ms(options.timeout) +
                              " (did every rank start, with the same store prefix?): " + e.what());
    }
    if (value.size() != sizeof(id.internal))
      throw Error(Errc::rank_mismatch,
                  who + ": the store holds an NCCL unique id of " + std::to_string(value.size()) +
                    " bytes, not " + std::to_string(sizeof(id.internal)) +
                    "; every rank must use the same NCCL version and a fresh store prefix");
    std::memcpy(id.internal, value.data(), value.size());
  }

  DeviceGuard device_guard(device);
  cudaStream_t stream = nullptr;
  auto created = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (created != cudaSuccess)
    throw Error(Errc::unavailable,
                who + ": cannot create a CUDA stream (" + cuda_text(created) + ")");
  // Non-blocking: NCCL initialises in the background and we poll, so that a rank that
  // never comes costs a timeout instead of a hang.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  auto result = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  for (Backoff backoff; result == ncclInProgress;) {
    if (Clock::now() >= deadline) {
      ncclCommAbort(comm);
      cudaStreamDestroy(stream);
      throw Error(Errc::collective_timeout,
                  who + ": rendezvous did not complete within " + ms(options.timeout) +
                    " (did every rank start, with the same store prefix?)");
    }
    backoff.pause();
    auto queried = ncclCommGetAsyncError(comm, &result);
    if (queried != ncclSuccess)
      result = queried;
  }
  if (result != ncclSuccess) {
    auto error = nccl_error(comm, result, who + ": NCCL could not initialise the communicator");
    if (comm != nullptr)
      ncclCommAbort(comm);
    cudaStreamDestroy(stream);
    throw error;
  }
  auto state = std::make_shared<State>(comm, stream, rank, size, device, options.timeout);
  state->self = state;
  return std::shared_ptr<NcclCommunicator>(new NcclCommunicator(std::move(state)));
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<State> state) : state_(std::move(state)) {
  // nop
}

NcclCommunicator::~NcclCommunicator() {
  state_->shut_down();
}

// -- properties -----------------------------------------------------------------------

int NcclCommunicator::rank() const {
  return state_->rank;
}

int NcclCommunicator::size() const {
  return state_->size;
}

std::string NcclCommunicator::backend() const {
  return "nccl";
}

std::chrono::milliseconds NcclCommunicator::timeout() const {
  return state_->timeout;
}

int NcclCommunicator::device() const {
  return state_->device;
}

// -- collectives ----------------------------------------------------------------------

std::shared_ptr<Work> NcclCommunicator::allreduce(at::Tensor tensor, ReduceOp op) {
  state_->check_tensor("allreduce", "tensor", tensor);
  state_->check_op("allreduce", op, tensor);
  auto count = static_cast<size_t>(tensor.numel());
  auto type = nccl_type(tensor);
  auto reduction = nccl_op(op);
  void* data = tensor.data_ptr();
  return state_->issue("allreduce", {tensor}, [=](ncclComm_t comm, cudaStream_t stream) {
    return count == 0 ? ncclSuccess
                      : ncclAllReduce(data, data, count, type, reduction, comm, stream);
  });
}

std::shared_ptr<Work> NcclCommunicator::broadcast(at::Tensor tensor, int root) {
  state_->check_tensor("broadcast", "tensor", tensor);
  if (root < 0 || root >= size())
    throw Error(Errc::invalid_argument, state_->prefix + "broadcast: root " +
                                          std::to_string(root) + " is not a rank (0 to " +
                                          std::to_string(size() - 1) + ")");
  auto count = static_cast<size_t>(tensor.numel());
  auto type = nccl_type(tensor);
  void* data = tensor.data_ptr();
  return state_->issue("broadcast", {tensor}, [=](ncclComm_t comm, cudaStream_t stream) {
    return count == 0 ? ncclSuccess
                      : ncclBroadcast(data, data, count, type, root, comm, stream);
  });
}

std::shared_ptr<Work> NcclCommunicator::allgather(at::Tensor input, at::Tensor output) {
  state_->check_tensor("allgather", "input", input);
  state_->check_tensor("allgather", "output", output);
  state_->check_same_dtype("allgather", input, output);
  if (output.numel() != size() * input.numel())
    throw Error(Errc::invalid_argument,
                state_->prefix + "allgather: output has " + std::to_string(output.numel()) +
                  " elements but must hold size() * input.numel() = " +
                  std::to_string(size()) + " * " + std::to_string(input.numel()));
  auto count = static_cast<size_t>(input.numel());
  auto type = nccl_type(input);
  const void* in = input.data_ptr();
  void* out = output.data_ptr();
  return state_->issue("allgather", {input, output}, [=](ncclComm_t comm, cudaStream_t stream) {
    return count == 0 ? ncclSuccess : ncclAllGather(in, out, count, type, comm, stream);
  });
}

std::shared_ptr<Work> NcclCommunicator::reduce_scatter(at::Tensor input, at::Tensor output,
                                                       ReduceOp op) {
  state_->check_tensor("reduce_scatter", "input", input);
  state_->check_tensor("reduce_scatter", "output", output);
  state_->check_same_dtype("reduce_scatter", input, output);
  state_->check_op("reduce_scatter", op, input);
  if (input.numel() != size() * output.numel())
    throw Error(Errc::invalid_argument,
                state_->prefix + "reduce_scatter: input has " + std::to_string(input.numel()) +
                  " elements but must hold size() * output.numel() = " +
                  std::to_string(size()) + " * " + std::to_string(output.numel()));
  auto count = static_cast<size_t>(output.numel());
  auto type = nccl_type(input);
  auto reduction = nccl_op(op);
  const void* in = input.data_ptr();
  void* out = output.data_ptr();
  return state_->issue("reduce_scatter", {input, output},
                       [=](ncclComm_t comm, cudaStream_t stream) {
                         return count == 0 ? ncclSuccess
                                           : ncclReduceScatter(in, out, count, type, reduction,
                                                               comm, stream);
                       });
}

std::shared_ptr<Work> NcclCommunicator::barrier() {
  // Zeroed on the default stream, which the collective waits for like any other.
  auto flag = at::zeros({1}, at::TensorOptions(at::kInt).device(at::kCUDA, state_->device));
  void* data = flag.data_ptr();
  return state_->issue("barrier", {flag}, [=](ncclComm_t comm, cudaStream_t stream) {
    return ncclAllReduce(data, data, 1, ncclInt32, ncclSum, comm, stream);
  });
}

// -- lifetime -------------------------------------------------------------------------

void NcclCommunicator::close() {
  state_->close();
}

bool NcclCommunicator::closed() const {
  std::lock_guard<std::mutex> guard(state_->mtx);
  return state_->closed;
}

} // namespace caftrain
