#include "environment/gloo_communicator.hpp"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <pthread.h>
#include <signal.h>
#include <time.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "core/error.hpp"
#include "environment/store.hpp"

namespace caftrain {

namespace {

// -- constants ------------------------------------------------------------------------

/// Messages up to this many bytes per peer use BCUBE. BCUBE needs 2 * log2(size) rounds
/// against the ring's 2 * (size - 1) (the ring also cuts every message into at least
/// 2 * size segments), so it wins while latency dominates; but it stages the whole
/// message in a scratch buffer and does not overlap reduction with transfer, so the ring
/// wins once bandwidth dominates. The ring's extra latency grows with the number of
/// peers, and so does the crossover: on loopback it lies near 256 KiB for 2 ranks and
/// near 1 MiB for 4.
constexpr size_t kBcubeBytesPerPeer = 256 * 1024;

/// Upper bound of BCUBE's message size whatever the number of ranks, which bounds its
/// scratch allocation (one more copy of the message).
constexpr size_t kBcubeMaxBytes = 4 * 1024 * 1024;

/// Slot prefix of our ring reduce-scatter. gloo's own collectives use 0x01 to 0x08
/// (gloo/types.h); a prefix of our own keeps our point-to-point messages apart from theirs.
constexpr uint8_t kReduceScatterSlotPrefix = 0x40;

/// Slot prefix of the fingerprints every rank sends its peers before a collective runs.
constexpr uint8_t kFingerprintSlotPrefix = 0x41;

/// How long the destructor waits for the communication thread to end before it detaches
/// it: an idle or finishing thread ends within microseconds, while one blocked in gloo
/// waits out the collective's timeout (closing our own connections does not wake it).
constexpr std::chrono::milliseconds kJoinGrace{100};

// -- element types and reductions -----------------------------------------------------

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

/// gloo has no bfloat16: combine in float and round back.
template <class Op>
void reduce_bfloat16(void* c, const void* a, const void* b, size_t n) {
  auto* z = static_cast<c10::BFloat16*>(c);
  auto* x = static_cast<const c10::BFloat16*>(a);
  auto* y = static_cast<const c10::BFloat16*>(b);
  for (size_t i = 0; i < n; ++i)
    z[i] = c10::BFloat16(Op{}(static_cast<float>(x[i]), static_cast<float>(y[i])));
}

struct MinOf {
  float operator()(float x, float y) const {
    return std::min(x, y);
  }
};

struct MaxOf {
  float operator()(float x, float y) const {
    return std::max(x, y);
  }
};

/// The elementwise reduction of `op` on elements of type `T` (avg reduces as a sum).
template <class T>
ReduceFn reduce_function(ReduceOp op) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (op) {
      case ReduceOp::sum:
      case ReduceOp::avg: return &reduce_bfloat16<std::plus<float>>;
      case ReduceOp::product: return &reduce_bfloat16<std::multiplies<float>>;
      case ReduceOp::min: return &reduce_bfloat16<MinOf>;
      case ReduceOp::max: return &reduce_bfloat16<MaxOf>;
    }
  } else {
    switch (op) {
      case ReduceOp::sum:
      case ReduceOp::avg: return &gloo::sum<T>;
      case ReduceOp::product: return &gloo::product<T>;
      case ReduceOp::min: return &gloo::min<T>;
      case ReduceOp::max: return &gloo::max<T>;
    }
  }
  throw Error(Errc::invalid_argument,
              "unknown ReduceOp " + std::to_string(static_cast<int>(op)));
}

/// Calls `f` with a value of the element type gloo uses for `dtype`; throws
/// `Error(invalid_argument)` for the dtypes gloo cannot reduce, `context` naming the call.
template <class F>
decltype(auto) visit_dtype(at::ScalarType dtype, const std::string& context, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(gloo::float16{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kInt: return f(int32_t{});
    case at::kLong: return f(int64_t{});
    case at::kByte: return f(uint8_t{});
    default:
      throw Error(Errc::invalid_argument,
                  context + " has dtype " + c10::toString(dtype) +
                    ", which the gloo communicator does not support; convert it to float32, "
                    "float64, float16, bfloat16, int32, int64 or uint8");
  }
}

template <class T>
T* typed(const at::Tensor& tensor) {
  return static_cast<T*>(tensor.data_ptr());
}

// -- signals --------------------------------------------------------------------------

/// Blocks SIGPIPE in the calling thread while alive, and in every thread it starts
/// meanwhile. gloo writes to its sockets with writev, which raises SIGPIPE when the peer
/// has reset the connection, and SIGPIPE kills the process by default. Blocked in the
/// threads that write (gloo's network thread and our communication thread, both started
/// in `create`), the write fails with EPIPE and the collective with an error instead,
/// and the process's signal disposition stays the caller's.
class SigpipeBlocked {
 public:
  SigpipeBlocked() {
    sigemptyset(&sigpipe_);
    sigaddset(&sigpipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &sigpipe_, &previous_);
  }

  ~SigpipeBlocked() {
    // A SIGPIPE raised in this thread meanwhile is pending: consume it, or restoring the
    // mask would deliver it.
    sigset_t pending;
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE) == 1) {
      timespec zero{0, 0};
      sigtimedwait(&sigpipe_, nullptr, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
  }

  SigpipeBlocked(const SigpipeBlocked&) = delete;
  SigpipeBlocked& operator=(const SigpipeBlocked&) = delete;

 private:
  sigset_t sigpipe_;
  sigset_t previous_;
};

// -- rendezvous -----------------------------------------------------------------------

/// Our `Store` as gloo's rendezvous store. gloo's `get` and `wait(keys)` carry no
/// timeout; they use the communicator's, so that a rank that never comes cannot block
/// the rendezvous forever.
class StoreAdapter : public gloo::rendezvous::Store {
 public:
  StoreAdapter(std::shared_ptr<caftrain::Store> store, std::chrono::milliseconds timeout)
    : store_(std::move(store)), timeout_(timeout) {
    // nop
  }

  void set(const std::string& key, const std::vector<char>& data) override {
    store_->set(key, data);
  }

  std::vector<char> get(const std::string& key) override {
    return store_->get(key, timeout_);
  }

  void wait(const std::vector<std::string>& keys) override {
    store_->wait(keys, timeout_);
  }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    store_->wait(keys, timeout);
  }

 private:
  std::shared_ptr<caftrain::Store> store_;
  std::chrono::milliseconds timeout_;
};

bool mentions_timeout(const std::string& what) {
  std::string lower(what);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return lower.find("timed out") != std::string::npos ||
         lower.find("timeout") != std::string::npos;
}

std::string ms(std::chrono::milliseconds t) {
  return std::to_string(t.count()) + " ms";
}

// -- work -----------------------------------------------------------------------------

using Collective = std::function<void(GlooCommunicator::State&, uint32_t tag)>;

/// A collective's identity on one rank, compared across ranks before it runs: gloo
/// itself cannot survive ranks that pass different sizes (its network thread throws,
/// which terminates the process).
struct Signature {
  int64_t op = 0;      // index into kOperationNames
  int64_t dtype = -1;  // at::ScalarType, -1 for none
  int64_t numel = 0;   // the per-rank element count
  int64_t detail = 0;  // ReduceOp, or the broadcast root
};

constexpr size_t kFingerprintWords = 4;
constexpr const char* kOperationNames[] = {"allreduce", "broadcast", "allgather",
                                           "reduce_scatter", "barrier"};

std::string describe(const Signature& s) {
  std::string text = kOperationNames[s.op];
  if (s.dtype >= 0)
    text += " of " + std::to_string(s.numel) + " " +
            c10::toString(static_cast<at::ScalarType>(s.dtype)) + " elements";
  if (s.op == 1)
    text += " from root " + std::to_string(s.detail);
  else if (s.op == 0 || s.op == 3)
    text += std::string(" (") + to_string(static_cast<ReduceOp>(s.detail)) + ")";
  return text;
}

Signature signature_of(const char* op, const at::Tensor& tensor, int64_t detail) {
  Signature s;
  for (size_t i = 0; i < std::size(kOperationNames); ++i)
    if (std::strcmp(op, kOperationNames[i]) == 0)
      s.op = static_cast<int64_t>(i);
  if (tensor.defined()) {
    s.dtype = static_cast<int64_t>(tensor.scalar_type());
    s.numel = tensor.numel();
  }
  s.detail = detail;
  return s;
}

/// One collective: its closure (which holds its tensors) until it runs, then its outcome.
class GlooWork : public Work {
 public:
  GlooWork(std::string name, uint32_t tag, std::chrono::milliseconds timeout, Collective fn)
    : name(std::move(name)), tag(tag), timeout_(timeout), fn_(std::move(fn)) {
    // nop
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (timeout.count() <= 0)
      timeout = timeout_;
    // Every collective runs on the communication thread, never on the waiter's: gloo
    // blocks the thread that runs one until its own timeout, whatever happens to the
    // peers, and only a waiter on this condition variable can be woken by `close()` (a
    // rank told to stop). Until 2026-12-07 a waiter whose work was next in line ran it
    // itself, saving a wake-up; an FSDP rank stopped inside a gather then sat out its
    // stop_grace and was killed.
    std::unique_lock<std::mutex> guard(mtx_);
    if (!cv_.wait_for(guard, timeout, [this] { return done_; }))
      throw Error(Errc::collective_timeout,
                  name + " did not complete within " + ms(timeout) +
                    " (Work::wait): a rank has not issued it, or is stuck before it");
    if (error_)
      std::rethrow_exception(error_);
  }

  bool is_completed() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return done_;
  }

  std::exception_ptr exception() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return error_;
  }

  /// The closure, for the communication thread to run; empty once taken or completed.
  Collective take() {
    std::lock_guard<std::mutex> guard(mtx_);
    return std::move(fn_);
  }

  /// Records the outcome and wakes the waiters; only the first call counts, so a work
  /// that `close()` aborted stays aborted when gloo gives up on it later.
  void complete(std::exception_ptr error) {
    Collective dropped; // releases the tensors of a work that never ran, outside the lock
    {
      std::lock_guard<std::mutex> guard(mtx_);
      if (done_)
        return;
      done_ = true;
      error_ = std::move(error);
      dropped = std::move(fn_);
    }
    cv_.notify_all();
  }

  /// "gloo rank 0 of 2: allreduce", the prefix of every message about this work.
  const std::string name;

  /// gloo tag: the collective's sequence number, the same on every rank.
  const uint32_t tag;

  /// What this rank asked for (`kFingerprintWords` words: operation, dtype, element
  /// count, reduction or root), and the same from every rank, filled by the exchange.
  std::vector<int64_t> fingerprints;
  std::unique_ptr<gloo::transport::UnboundBuffer> fingerprint_send;
  std::unique_ptr<gloo::transport::UnboundBuffer> fingerprint_recv;

 private:
  const std::chrono::milliseconds timeout_;
  mutable std::mutex mtx_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  Collective fn_;
};

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

} // namespace

// -- shared state ---------------------------------------------------------------------

/// Everything the communication thread touches. The thread holds shared ownership, so a
/// destructor can detach it while gloo still blocks it.
struct GlooCommunicator::State {
  State(std::shared_ptr<gloo::Context> context, std::chrono::milliseconds timeout,
        bool check_signatures)
    : context(std::move(context)),
      rank(this->context->rank),
      size(this->context->size),
      timeout(timeout),
      check_signatures(check_signatures && this->size > 1),
      prefix("gloo rank " + std::to_string(rank) + " of " + std::to_string(size) + ": ") {
    // nop
  }

  const std::shared_ptr<gloo::Context> context;
  const int rank;
  const int size;
  const std::chrono::milliseconds timeout;
  /// Whether the ranks compare each collective's signature before running it.
  const bool check_signatures;
  /// "gloo rank 0 of 2: ", the start of every message.
  const std::string prefix;

  std::mutex mtx;
  /// Signals new work, `stop`, and `thread_exited`.
  std::condition_variable cv;
  std::deque<std::shared_ptr<GlooWork>> queue;
  std::shared_ptr<GlooWork> running;
  uint32_t next_tag = 0;
  bool closed = false;
  /// Why an earlier collective failed; non-empty makes every later one fail.
  std::string failure;
  bool stop = false;
  bool thread_exited = false;
  std::thread thread;

  // -- issuing ----------------------------------------------------------------------

  std::shared_ptr<Work> enqueue(const char* op, Collective fn, Signature signature = {}) {
    std::shared_ptr<GlooWork> work;
    std::exception_ptr refused;
    {
      std::lock_guard<std::mutex> guard(mtx);
      work = std::make_shared<GlooWork>(prefix + op, next_tag++, timeout, std::move(fn));
      if (closed)
        refused = make_error(Errc::collective_aborted,
                             work->name + " refused: the communicator is closed; rendezvous "
                                          "again for a new one");
      else if (!failure.empty())
        refused = refusal(*work);
      else {
        if (check_signatures)
          post_fingerprints(*work, signature);
        queue.push_back(work);
      }
    }
    if (refused)
      work->complete(refused);
    else
      cv.notify_all();
    return work;
  }

  // -- signatures -------------------------------------------------------------------

  /// Sends this rank's signature of `work` to every peer and posts the receives of
  /// theirs, when the collective is issued: by the time it runs they have mostly
  /// arrived, so the check costs the collective little latency. Under `mtx`; gloo's
  /// sends and receives only queue (asynchronous pairs).
  void post_fingerprints(GlooWork& work, const Signature& signature) {
    SigpipeBlocked blocked; // the send may write to a socket on this thread
    auto& fp = work.fingerprints;
    fp.assign(kFingerprintWords * static_cast<size_t>(size + 1), 0);
    int64_t* mine = fp.data() + kFingerprintWords * static_cast<size_t>(size);
    mine[0] = signature.op;
    mine[1] = signature.dtype;
    mine[2] = signature.numel;
    mine[3] = signature.detail;
    constexpr size_t bytes = kFingerprintWords * sizeof(int64_t);
    const auto slot = gloo::Slot::build(kFingerprintSlotPrefix, work.tag);
    try {
      work.fingerprint_send = context->createUnboundBuffer(mine, bytes);
      work.fingerprint_recv = context->createUnboundBuffer(fp.data(), bytes * static_cast<size_t>(size));
      for (int peer = 0; peer < size; ++peer) {
        if (peer == rank)
          continue;
        work.fingerprint_recv->recv(peer, slot, bytes * static_cast<size_t>(peer), bytes);
        work.fingerprint_send->send(peer, slot, 0, bytes);
      }
    } catch (const std::exception&) {
      // The connections are gone; the collective fails when it runs, with gloo's reason.
      work.fingerprint_send.reset();
      work.fingerprint_recv.reset();
    }
  }

  /// Waits for the peers' signatures of `work` and throws `Error(rank_mismatch)` naming
  /// what each rank asked for when they differ.
  void verify_fingerprints(GlooWork& work) {
    if (!work.fingerprint_recv)
      return;
    auto fail = [&](const char* what) {
      throw Error(Errc::collective_aborted, work.name + ": " + what);
    };
    for (int peer = 0; peer + 1 < size; ++peer) {
      if (!work.fingerprint_recv->waitRecv(timeout))
        fail("the signature exchange was aborted");
      if (!work.fingerprint_send->waitSend(timeout))
        fail("the signature exchange was aborted");
    }
    auto& fp = work.fingerprints;
    std::copy(fp.begin() + static_cast<std::ptrdiff_t>(kFingerprintWords * static_cast<size_t>(size)), fp.end(),
              fp.begin() + static_cast<std::ptrdiff_t>(kFingerprintWords * static_cast<size_t>(rank)));
    auto at = [&](int r) {
      const int64_t* w = fp.data() + kFingerprintWords * static_cast<size_t>(r);
      return Signature{w[0], w[1], w[2], w[3]};
    };
    auto same = [](const Signature& a, const Signature& b) {
      return a.op == b.op && a.dtype == b.dtype && a.numel == b.numel && a.detail == b.detail;
    };
    auto reference = at(0);
    bool mismatch = false;
    for (int r = 1; r < size; ++r)
      mismatch = mismatch || !same(at(r), reference);
    if (!mismatch)
      return;
    std::string list;
    for (int r = 0; r < size; ++r)
      list += (r ? "; rank " : "rank ") + std::to_string(r) + " issued " + describe(at(r));
    throw Error(Errc::rank_mismatch,
                work.name + ": collective #" + std::to_string(work.tag) +
                  " differs between ranks (" + list +
                  "); every rank must issue the same collectives, with the same sizes, in the "
                  "same order");
  }

  std::exception_ptr refusal(const GlooWork& work) const {
    return make_error(Errc::collective_aborted,
                      work.name + " refused: an earlier collective failed on this "
                                  "communicator (" + failure + "); rendezvous again");
  }

  // -- the communication thread -----------------------------------------------------

  void run() {
    for (;;) {
      std::shared_ptr<GlooWork> work;
      {
        std::unique_lock<std::mutex> guard(mtx);
        cv.wait(guard, [this] { return stop || !queue.empty(); });
        if (queue.empty())
          break;
        work = std::move(queue.front());
        queue.pop_front();
        running = work;
      }
      execute(*work);
      std::lock_guard<std::mutex> guard(mtx);
      running.reset();
    }
    {
      std::lock_guard<std::mutex> guard(mtx);
      thread_exited = true;
    }
    cv.notify_all();
  }

  void execute(GlooWork& work) {
    auto fn = work.take();
    if (!fn)
      return; // completed by close() in the meantime
    {
      std::lock_guard<std::mutex> guard(mtx);
      if (!failure.empty()) {
        work.complete(refusal(work));
        return;
      }
    }
    try {
      verify_fingerprints(work);
      fn(*this, work.tag);
      work.complete(nullptr);
    } catch (...) {
      auto error = translate(work, std::current_exception());
      bool was_closed = false;
      {
        std::lock_guard<std::mutex> guard(mtx);
        was_closed = closed;
        if (failure.empty())
          failure = message_of(error);
      }
      // Tell the peers at once: their pending collectives fail with "connection reset"
      // instead of waiting out their timeouts.
      if (!was_closed)
        context->closeConnections();
      work.complete(error);
    }
  }

  /// gloo's exception as our Error: a timeout, or an abort (a peer closed or died).
  std::exception_ptr translate(const GlooWork& work, std::exception_ptr caught) const {
    try {
      std::rethrow_exception(caught);
    } catch (const Error&) {
      return caught;
    } catch (const std::exception& e) {
      if (mentions_timeout(e.what()))
        return make_error(Errc::collective_timeout,
                          work.name + " timed out after " + ms(timeout) +
                            ": a rank has not issued it, or is stuck (gloo: " + e.what() + ")");
      return make_error(Errc::collective_aborted,
                        work.name + " aborted: a peer closed its connection (its "
                                    "communicator was closed or failed, or it died) (gloo: " +
                          e.what() + ")");
    }
  }

  // -- lifetime ---------------------------------------------------------------------

  void close() {
    std::vector<std::shared_ptr<GlooWork>> pending;
    {
      std::lock_guard<std::mutex> guard(mtx);
      if (closed)
        return;
      closed = true;
      pending.assign(queue.begin(), queue.end());
      queue.clear();
      if (running)
        pending.push_back(running);
    }
    // Closing our connections fails the peers' pending collectives at once. It does not
    // wake our own thread if gloo blocks it (gloo waits out the timeout), hence the
    // explicit completion below.
    context->closeConnections();
    for (auto& work : pending)
      work->complete(make_error(Errc::collective_aborted,
                                work->name + " aborted: the communicator was closed"));
  }

  void shut_down() {
    close();
    bool exited = false;
    {
      std::unique_lock<std::mutex> guard(mtx);
      stop = true;
      cv.notify_all();
      exited = cv.wait_for(guard, kJoinGrace, [this] { return thread_exited; });
    }
    if (exited)
      thread.join();
    else
      thread.detach();
  }

  // -- argument checks --------------------------------------------------------------

  void check_tensor(const char* op, const char* role, const at::Tensor& tensor) const {
    auto what = prefix + op + ": " + role;
    if (!tensor.defined())
      throw Error(Errc::invalid_argument, what + " is an undefined tensor");
    if (!tensor.device().is_cpu())
      throw Error(Errc::invalid_argument,
                  what + " is on " + tensor.device().str() +
                    "; the gloo communicator takes CPU tensors only: pass tensor.cpu() or "
                    "use the nccl backend");
    if (tensor.layout() != at::kStrided)
      throw Error(Errc::invalid_argument,
                  what + " is not a dense tensor; pass tensor.to_dense()");
    if (!tensor.is_contiguous())
      throw Error(Errc::invalid_argument,
                  what + " is not contiguous (sizes " + c10::str(tensor.sizes()) +
                    ", strides " + c10::str(tensor.strides()) +
                    "); pass tensor.contiguous() and copy the result back");
    visit_dtype(tensor.scalar_type(), what, [](auto) {});
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

// -- free functions -------------------------------------------------------------------

const char* to_string(GlooAllreduceAlgorithm algorithm) {
  switch (algorithm) {
    case GlooAllreduceAlgorithm::ring: return "ring";
    case GlooAllreduceAlgorithm::bcube: return "bcube";
  }
  return "unknown";
}

GlooAllreduceAlgorithm gloo_allreduce_algorithm(size_t bytes, int size) {
  auto peers = static_cast<size_t>(std::max(size - 1, 1));
  auto limit = std::min(kBcubeBytesPerPeer * peers, kBcubeMaxBytes);
  return bytes <= limit ? GlooAllreduceAlgorithm::bcube : GlooAllreduceAlgorithm::ring;
}

// -- constructors ---------------------------------------------------------------------

std::shared_ptr<GlooCommunicator> GlooCommunicator::create(std::shared_ptr<Store> store,
                                                           int rank, int size,
                                                           GlooOptions options) {
  if (!store)
    throw Error(Errc::invalid_argument, "GlooCommunicator::create needs a store");
  if (size < 1 || rank < 0 || rank >= size)
    throw Error(Errc::invalid_argument,
                "GlooCommunicator::create: rank " + std::to_string(rank) + " of size " +
                  std::to_string(size) + " is invalid; need 0 <= rank < size");
  if (options.timeout.count() <= 0)
    throw Error(Errc::invalid_argument,
                "GlooOptions::timeout is " + ms(options.timeout) + "; it must be positive");
  SigpipeBlocked sigpipe_blocked; // inherited by the threads started below
  std::shared_ptr<gloo::transport::Device> device;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.hostname;
    device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    throw Error(Errc::invalid_argument, "GlooOptions::hostname \"" + options.hostname +
                                          "\" cannot be bound: " + e.what());
  }
  auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
  context->setTimeout(options.timeout);
  try {
    StoreAdapter adapter(std::move(store), options.timeout);
    context->connectFullMesh(adapter, device);
  } catch (const std::exception& e) {
    throw Error(Errc::collective_timeout,
                "gloo rank " + std::to_string(rank) + " of " + std::to_string(size) +
                  ": rendezvous failed within " + ms(options.timeout) +
                  " (did every rank start, with the same store prefix?): " + e.what());
  }
  auto state = std::make_shared<State>(std::move(context), options.timeout,
                                       options.check_signatures);
  state->thread = std::thread([state] {
    pthread_setname_np(pthread_self(), "caftrain.gloo");
    state->run();
  });
  return std::shared_ptr<GlooCommunicator>(new GlooCommunicator(std::move(state)));
}

GlooCommunicator::GlooCommunicator(std::shared_ptr<State> state) : state_(std::move(state)) {
  // nop
}

GlooCommunicator::~GlooCommunicator() {
  state_->shut_down();
}

// -- properties -----------------------------------------------------------------------

int GlooCommunicator::rank() const {
  return state_->rank;
}

int GlooCommunicator::size() const {
  return state_->size;
}

std::string GlooCommunicator::backend() const {
  return "gloo";
}

std::chrono::milliseconds GlooCommunicator::timeout() const {
  return state_->timeout;
}

// -- collectives ----------------------------------------------------------------------

std::shared_ptr<Work> GlooCommunicator::allreduce(at::Tensor tensor, ReduceOp op) {
  state_->check_tensor("allreduce", "tensor", tensor);
  state_->check_op("allreduce", op, tensor);
  return state_->enqueue("allreduce", [tensor, op](State& s, uint32_t tag) {
    if (tensor.numel() == 0)
      return;
    visit_dtype(tensor.scalar_type(), "tensor", [&](auto element) {
      using T = decltype(element);
      gloo::AllreduceOptions opts(s.context);
      opts.setOutput(typed<T>(tensor), static_cast<size_t>(tensor.numel()));
      opts.setReduceFunction(reduce_function<T>(op));
      auto algorithm = gloo_allreduce_algorithm(tensor.nbytes(), s.size);
      opts.setAlgorithm(algorithm == GlooAllreduceAlgorithm::bcube
                          ? gloo::AllreduceOptions::Algorithm::BCUBE
                          : gloo::AllreduceOptions::Algorithm::RING);
      opts.setTag(tag);
      opts.setTimeout(s.timeout);
      gloo::allreduce(opts);
    });
    if (op == ReduceOp::avg)
      tensor.div_(s.size);
  }, signature_of("allreduce", tensor, static_cast<int64_t>(op)));
}

std::shared_ptr<Work> GlooCommunicator::broadcast(at::Tensor tensor, int root) {
  state_->check_tensor("broadcast", "tensor", tensor);
  if (root < 0 || root >= size())
    throw Error(Errc::invalid_argument, state_->prefix + "broadcast: root " +
                                          std::to_string(root) + " is not a rank (0 to " +
                                          std::to_string(size() - 1) + ")");
  return state_->enqueue("broadcast", [tensor, root](State& s, uint32_t tag) {
    if (tensor.numel() == 0)
      return;
    visit_dtype(tensor.scalar_type(), "tensor", [&](auto element) {
      using T = decltype(element);
      gloo::BroadcastOptions opts(s.context);
      opts.setOutput(typed<T>(tensor), static_cast<size_t>(tensor.numel()));
      opts.setRoot(root);
      opts.setTag(tag);
      opts.setTimeout(s.timeout);
      gloo::broadcast(opts);
    });
  }, signature_of("broadcast", tensor, root));
}

std::shared_ptr<Work> GlooCommunicator::allgather(at::Tensor input, at::Tensor output) {
  state_->check_tensor("allgather", "input", input);
  state_->check_tensor("allgather", "output", output);
  state_->check_same_dtype("allgather", input, output);
  if (output.numel() != size() * input.numel())
    throw Error(Errc::invalid_argument,
                state_->prefix + "allgather: output has " + std::to_string(output.numel()) +
                  " elements but must hold size() * input.numel() = " +
                  std::to_string(size()) + " * " + std::to_string(input.numel()));
  return state_->enqueue("allgather", [input, output](State& s, uint32_t tag) {
    if (input.numel() == 0)
      return;
    visit_dtype(input.scalar_type(), "input", [&](auto element) {
      using T = decltype(element);
      gloo::AllgatherOptions opts(s.context);
      opts.setInput(typed<T>(input), static_cast<size_t>(input.numel()));
      opts.setOutput(typed<T>(output), static_cast<size_t>(output.numel()));
      opts.setTag(tag);
      opts.setTimeout(s.timeout);
      gloo::allgather(opts);
    });
  }, signature_of("allgather", input, 0));
}

namespace {

/// Ring reduce-scatter of `size` chunks of `chunk_bytes`: in step k (0 to size - 2) rank r
/// sends its partial result of chunk r - k - 1 to rank r + 1 and receives rank r - 1's
/// partial result of chunk r - k - 2, which it combines with its own input. After the
/// last step chunk r holds every rank's contribution. Step 0 sends straight from the
/// input, the last step receives straight into the output, and the steps between pass
/// the partial results through two scratch chunks, so the input stays untouched.
void ring_reduce_scatter(GlooCommunicator::State& s, uint32_t tag, const at::Tensor& input,
                         const at::Tensor& output, ReduceFn reduce, size_t element_size) {
  const int n = s.size;
  const size_t chunk_bytes = output.nbytes();
  const size_t count = chunk_bytes / element_size;
  auto* in = static_cast<char*>(input.data_ptr());
  auto* out = static_cast<char*>(output.data_ptr());
  auto chunk = [&](int c) { return ((c % n) + n) % n; };
  if (n == 1) {
    if (out != in)
      std::memcpy(out, in, chunk_bytes);
    return;
  }
  const auto slot = gloo::Slot::build(kReduceScatterSlotPrefix, tag);
  auto in_buf = s.context->createUnboundBuffer(in, input.nbytes());
  auto out_buf = s.context->createUnboundBuffer(out, chunk_bytes);
  std::unique_ptr<char[]> scratch;
  std::unique_ptr<gloo::transport::UnboundBuffer> scratch_buf;
  if (n > 2) {
    scratch.reset(new char[2 * chunk_bytes]);
    scratch_buf = s.context->createUnboundBuffer(scratch.get(), 2 * chunk_bytes);
  }
  const int next = (s.rank + 1) % n;
  const int prev = (s.rank + n - 1) % n;
  auto check = [&](bool completed) {
    // Only abortWaitSend/abortWaitRecv make gloo's waits return false; we never call them.
    if (!completed)
      throw Error(Errc::collective_aborted, s.prefix + "reduce_scatter: a gloo wait was aborted");
  };
  for (int k = 0; k + 1 < n; ++k) {
    const bool first = k == 0;
    const bool last = k + 2 == n;
    // Send from the input or from the scratch half filled in the previous step.
    auto* send_buf = first ? in_buf.get() : scratch_buf.get();
    size_t send_offset = first ? chunk(s.rank - 1) * chunk_bytes : ((k - 1) % 2) * chunk_bytes;
    // Receive into the output or into the other scratch half.
    auto* recv_buf = last ? out_buf.get() : scratch_buf.get();
    size_t recv_offset = last ? 0 : (k % 2) * chunk_bytes;
    recv_buf->recv(prev, slot, recv_offset, chunk_bytes);
    send_buf->send(next, slot, send_offset, chunk_bytes);
    check(recv_buf->waitRecv(s.timeout));
    char* partial = static_cast<char*>(recv_buf->ptr) + recv_offset;
    reduce(partial, partial, in + chunk(s.rank - k - 2) * chunk_bytes, count);
    check(send_buf->waitSend(s.timeout));
  }
}

} // namespace

std::shared_ptr<Work> GlooCommunicator::reduce_scatter(at::Tensor input, at::Tensor output,
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
  return state_->enqueue("reduce_scatter", [input, output, op](State& s, uint32_t tag) {
    if (output.numel() == 0)
      return;
    visit_dtype(input.scalar_type(), "input", [&](auto element) {
      using T = decltype(element);
      ring_reduce_scatter(s, tag, input, output, reduce_function<T>(op), sizeof(T));
    });
    if (op == ReduceOp::avg)
      output.div_(s.size);
  }, signature_of("reduce_scatter", output, static_cast<int64_t>(op)));
}

std::shared_ptr<Work> GlooCommunicator::barrier() {
  return state_->enqueue("barrier", [](State& s, uint32_t tag) {
    gloo::BarrierOptions opts(s.context);
    opts.setTag(tag);
    opts.setTimeout(s.timeout);
    gloo::barrier(opts);
  }, signature_of("barrier", at::Tensor(), 0));
}

// -- lifetime -------------------------------------------------------------------------

void GlooCommunicator::close() {
  state_->close();
}

bool GlooCommunicator::closed() const {
  std::lock_guard<std::mutex> guard(state_->mtx);
  return state_->closed;
}

} // namespace caftrain
