#include "actors/worker.hpp"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <cstdlib>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <list>
#include <mutex>
#include <thread>

#include <caf/all.hpp>
#include <torch/torch.h>

#include "actors/checkpoint_transfer.hpp"
#include "actors/messages.hpp"
#include "actors/process_launcher.hpp"
#include "actors/torch_trainer.hpp"
#include "core/error.hpp"
#include "environment/actor_store.hpp"
#include "checkpoint/files.hpp"
#include "environment/gloo_communicator.hpp"
#ifdef CAFTRAIN_WITH_NCCL
#include "environment/nccl_communicator.hpp"
#endif
#include "train/session.hpp"

namespace caftrain {

namespace {

/// The address this machine's gloo ranks bind and advertise, configured per machine as
/// PyTorch does it: GLOO_SOCKET_IFNAME names an interface (its first IPv4 address is
/// used), else CAFTRAIN_GLOO_HOSTNAME an address or host name; default 127.0.0.1 (every
/// rank on this machine).
std::string gloo_address() {
  if (const char* name = std::getenv("GLOO_SOCKET_IFNAME"); name && *name) {
    std::string ifname(name);
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) != 0)
      throw Error(Errc::unavailable, std::string("GLOO_SOCKET_IFNAME: cannot list interfaces: ") +
                                       std::strerror(errno));
    std::string found, names;
    for (auto* i = list; i; i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET)
        continue;
      names += (names.empty() ? "" : ", ") + std::string(i->ifa_name);
      if (ifname == i->ifa_name && found.empty()) {
        char text[INET_ADDRSTRLEN] = {0};
        ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text, sizeof(text));
        found = text;
      }
    }
    ::freeifaddrs(list);
    if (found.empty())
      throw Error(Errc::invalid_config, "GLOO_SOCKET_IFNAME '" + ifname +
                                          "' is no interface with an IPv4 address on this machine; "
                                          "those with one: " + names);
    return found;
  }
  if (const char* host = std::getenv("CAFTRAIN_GLOO_HOSTNAME"); host && *host)
    return host;
  return "127.0.0.1";
}

} // namespace

// -- the session a training thread talks to ------------------------------------------------

/// The worker-side session: implements train::report & co. over messages to the trainer.
class ActorSession : public Session {
 public:
  ActorSession(caf::actor_system& sys, WorkerSpec spec)
    : sys_(sys), spec_(std::move(spec)), next_index_(spec_.first_report_index) {
    // nop
  }

  const WorkerContext& context() const override {
    return spec_.context;
  }

  std::shared_ptr<Communicator> communicator() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return communicator_;
  }

  bool stop_requested() const override {
    return stop_.load();
  }

  std::string stop_reason() const override {
    std::lock_guard<std::mutex> guard(mtx_);
    return stop_reason_;
  }

  const Config& config() const override {
    return spec_.run->options.train_loop_config;
  }

  void heartbeat() override {
    last_beat_.store(std::chrono::steady_clock::now().time_since_epoch().count());
  }

  /// Time since the training thread last showed progress; none while it waits in
  /// `train::report` for the other ranks (the round's report_timeout covers those).
  std::chrono::milliseconds since_heartbeat() const {
    if (waiting_in_report_.load())
      return std::chrono::milliseconds{0};
    auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    return std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::duration(now - last_beat_.load()));
  }

  void report_snapshot(const Metrics& metrics, CheckpointFiles files, bool wait) override {
    heartbeat();
    flush(); // one background report at a time; its failure surfaces here
    if (wait)
      return report_files(metrics, files);
    std::lock_guard<std::mutex> guard(reporter_mtx_);
    reporter_ = std::thread([this, metrics, files = std::move(files)] {
      pthread_setname_np(pthread_self(), "caftrain.report");
      lower_thread_priority(); // the training threads keep the cores
      try {
        report_files(metrics, files);
      } catch (...) {
        std::lock_guard<std::mutex> guard(reporter_mtx_);
        reporter_error_ = std::current_exception();
      }
    });
  }

  void flush() override {
    std::thread reporter;
    {
      std::lock_guard<std::mutex> guard(reporter_mtx_);
      reporter = std::move(reporter_);
    }
    if (reporter.joinable())
      reporter.join(); // without the lock: the reporter takes it to store its failure
    std::exception_ptr error;
    {
      std::lock_guard<std::mutex> guard(reporter_mtx_);
      std::swap(error, reporter_error_);
    }
    if (error)
      std::rethrow_exception(error);
  }

  ~ActorSession() override {
    std::thread reporter;
    {
      std::lock_guard<std::mutex> guard(reporter_mtx_);
      reporter = std::move(reporter_);
    }
    if (reporter.joinable())
      reporter.join();
  }

  std::optional<Checkpoint> latest_checkpoint() const override {
    std::optional<Checkpoint> latest;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      latest = latest_ ? latest_ : spec_.checkpoint;
    }
    if (!latest || spec_.shared_storage)
      return latest;
    return local_copy(*latest);
  }

  void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint,
              const train::ReportArgs& args) override {
    heartbeat();
    if (stop_requested())
      throw Error(Errc::cancelled, "train::report after the attempt was stopped: " + stop_reason());
    WorkerReport r;
    r.rank = spec_.context.world_rank;
    r.attempt = spec_.context.attempt;
    r.index = next_index_++;
    r.metrics = metrics;
    r.checkpoint_dir_name = args.checkpoint_dir_name;
    auto& run = spec_.run->options.run;
    struct Waiting {
      ActorSession& s;
      explicit Waiting(ActorSession& s) : s(s) {
        s.waiting_in_report_.store(true);
      }
      ~Waiting() {
        s.heartbeat();
        s.waiting_in_report_.store(false);
      }
    };
    Waiting waiting(*this); // blocked by the others, not stalled
    if (checkpoint)
      r.checkpoint_dir = spec_.shared_storage ? checkpoint->path() : send_checkpoint(checkpoint->path(), r);
    caf::scoped_actor self{sys_};
    self->request(spec_.trainer, run.report_timeout + std::chrono::seconds(30), report_atom::value, r)
      .receive([&](ack_atom, Checkpoint& persisted) {
                 if (!persisted.valid())
                   return;
                 std::lock_guard<std::mutex> guard(mtx_);
                 latest_ = std::move(persisted);
               },
               [&](caf::error& err) {
                 auto e = to_run_error(err, r.rank, r.attempt);
                 throw Error(e.code == Errc::none ? Errc::worker_failed : e.code,
                             "train::report #" + std::to_string(r.index) + " on rank " +
                               std::to_string(r.rank) + " failed: " + e.message);
               });
  }

  /// Writes `files` into a staging directory beside the run's checkpoints (same file
  /// system: the persister moves them, taking their digests from the digests file), or
  /// of this process when it does not see the run's storage (not fsynced: they are sent),
  /// and reports it.
  void report_files(const Metrics& metrics, const CheckpointFiles& files) {
    if (files.empty())
      return report(metrics, std::nullopt, {});
    static std::atomic<uint64_t> counter{0};
    auto& ctx = spec_.context;
    auto root = spec_.shared_storage ? std::filesystem::path(ctx.run_dir) / ".staging"
                                     : std::filesystem::path(transfer::local_root()) / "staging";
    auto dir = root / ("a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank) + "-" +
                       std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec)
      throw Error(Errc::io_error, "cannot create checkpoint staging directory '" + dir.string() +
                                    "': " + ec.message());
    write_staged_files(dir.string(), files, /*sync=*/spec_.shared_storage);
    report(metrics, Checkpoint::from_directory(dir.string()), {});
  }

  /// Sends the files of the checkpoint directory `dir` to the trainer (this process
  /// does not see the run's storage); the directory they now have on the driver. A
  /// staging directory of this process is removed once sent.
  std::string send_checkpoint(const std::string& dir, const WorkerReport& r) {
    auto name = "a" + std::to_string(r.attempt) + "-r" + std::to_string(r.rank) + "-i" +
                std::to_string(r.index) + "-" + std::to_string(::getpid());
    auto timeout = spec_.run->options.run.report_timeout + std::chrono::seconds(30);
    auto remote = transfer::upload(sys_, spec_.files, dir, name, timeout);
    auto staging = std::filesystem::path(transfer::local_root()) / "staging";
    if (dir.compare(0, staging.string().size(), staging.string()) == 0) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
    return remote;
  }

  /// A copy of the driver's checkpoint `ckpt` on this machine (fetched once; the copy of
  /// an older checkpoint is removed when a newer one is fetched). The rank shards of a
  /// sharded checkpoint are fetched only when named (`transfer::Fetch`).
  Checkpoint local_copy(const Checkpoint& ckpt) const {
    std::lock_guard<std::mutex> guard(copy_mtx_);
    if (copy_ && copy_of_ == ckpt.path())
      return *copy_;
    auto dir = std::filesystem::path(transfer::local_root()) / "checkpoints" /
               std::filesystem::path(ckpt.path()).filename();
    if (copy_) {
      transfer::forget_copy(copy_->path());
      copy_.reset();
    }
    auto timeout = spec_.run->options.run.report_timeout + std::chrono::seconds(30);
    // A sharded checkpoint's rank shards arrive when this rank's load names them.
    copy_ = transfer::download(sys_, spec_.files, ckpt, dir.string(), timeout,
                               transfer::Fetch::shards_on_demand);
    copy_of_ = ckpt.path();
    return *copy_;
  }

  /// Rendezvous of this attempt's communicator (world_size > 1).
  void connect() {
    auto& ctx = spec_.context;
    if (ctx.world_size <= 1)
      return;
    if (spec_.communicator) {
      std::lock_guard<std::mutex> guard(mtx_);
      communicator_ = spec_.communicator;
      if (stop_.load())
        communicator_->close();
      return;
    }
    auto store = std::make_shared<PrefixStore>("attempt_" + std::to_string(ctx.attempt),
                                               std::make_shared<ActorStore>(sys_, spec_.store));
    std::shared_ptr<Communicator> comm;
    if (resolve_backend(spec_.run->options) == "nccl") {
#ifdef CAFTRAIN_WITH_NCCL
      NcclOptions options;
      options.timeout = spec_.run->options.run.collective_timeout;
      c10::Device device(ctx.device); // the worker's "cuda:<index>"
      if (device.is_cuda() && device.has_index())
        options.device = device.index();
      comm = NcclCommunicator::create(store, static_cast<int>(ctx.world_rank),
                                      static_cast<int>(ctx.world_size), options);
#else
      throw Error(Errc::unavailable,
                  "TorchConfig.backend \"nccl\": this build of caftrain has no NCCL backend; "
                  "rebuild it where CUDA and NCCL are installed (-DCAFTRAIN_WITH_NCCL=ON, "
                  "against a CUDA-enabled libtorch), or use the \"gloo\" backend");
#endif
    } else {
      GlooOptions options;
      options.timeout = spec_.run->options.run.collective_timeout;
      // CAFTRAIN_GLOO_CHECK_SIGNATURES=0 turns the cross-rank check off (as PyTorch's
      // TORCH_DISTRIBUTED_DEBUG turns its own on): for measuring what it costs.
      if (const char* check = std::getenv("CAFTRAIN_GLOO_CHECK_SIGNATURES"))
        options.check_signatures = std::string(check) != "0";
      options.hostname = gloo_address();
      comm = GlooCommunicator::create(store, static_cast<int>(ctx.world_rank),
                                      static_cast<int>(ctx.world_size), options);
    }
    std::lock_guard<std::mutex> guard(mtx_);
    communicator_ = comm;
    if (stop_.load())
      communicator_->close();
  }

  /// Stops the attempt on this rank: later checks throw, the communicator closes (which
  /// wakes every peer waiting on this rank at once).
  void request_stop(const std::string& reason) {
    std::shared_ptr<Communicator> comm;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      if (stop_reason_.empty())
        stop_reason_ = reason;
      stop_ = true;
      comm = communicator_;
    }
    if (comm)
      comm->close();
  }

  void close_communicator() {
    std::shared_ptr<Communicator> comm;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      comm = std::move(communicator_);
    }
    if (comm)
      comm->close();
  }

  const WorkerSpec& spec() const noexcept {
    return spec_;
  }

  caf::actor_system& system() noexcept {
    return sys_;
  }

 private:
  caf::actor_system& sys_;
  WorkerSpec spec_;
  int64_t next_index_;
  mutable std::mutex mtx_;
  std::shared_ptr<Communicator> communicator_;
  /// The checkpoint the latest completed report of this rank persisted.
  std::optional<Checkpoint> latest_;
  /// Without the run's storage: the local copy of a checkpoint on the driver.
  mutable std::mutex copy_mtx_;
  mutable std::optional<Checkpoint> copy_;
  mutable std::string copy_of_;
  std::atomic<bool> stop_{false};
  std::string stop_reason_;
  std::atomic<int64_t> last_beat_{std::chrono::steady_clock::now().time_since_epoch().count()};
  std::atomic<bool> waiting_in_report_{false};
  std::mutex reporter_mtx_;
  std::thread reporter_;
  std::exception_ptr reporter_error_;
};

// -- the threads ----------------------------------------------------------------------------

namespace {

/// How often a worker actor looks at its thread's heartbeat.
constexpr auto kTick = std::chrono::milliseconds(250);

/// Every training thread of this process, by run, so that a finished run's threads are
/// joined (not left running while the program exits).
class ThreadRegistry {
 public:
  void add(const std::string& run, int64_t attempt, std::thread thread,
           std::shared_ptr<std::atomic<bool>> done) {
    std::lock_guard<std::mutex> guard(mtx_);
    entries_.push_back({run, attempt, std::move(thread), std::move(done)});
  }

  void abandon(const std::string& run, int64_t attempt) {
    std::lock_guard<std::mutex> guard(mtx_);
    for (auto& e : entries_)
      if (e.run == run && e.attempt == attempt && !e.done->load())
        e.abandoned = true;
  }

  size_t join(const std::string& run, std::chrono::milliseconds grace) {
    auto deadline = std::chrono::steady_clock::now() + grace;
    std::list<Entry> mine;
    {
      std::lock_guard<std::mutex> guard(mtx_);
      for (auto i = entries_.begin(); i != entries_.end();) {
        if (i->run == run)
          mine.splice(mine.end(), entries_, i++);
        else
          ++i;
      }
    }
    size_t left = 0;
    for (auto& e : mine) {
      // The trainer already waited a grace period for an abandoned thread.
      while (!e.abandoned && !e.done->load() && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      if (e.done->load()) {
        e.thread.join();
      } else {
        e.thread.detach();
        ++left;
      }
    }
    return left;
  }

  ~ThreadRegistry() {
    for (auto& e : entries_) {
      if (e.done->load())
        e.thread.join();
      else
        e.thread.detach();
    }
  }

 private:
  struct Entry {
    std::string run;
    int64_t attempt = 0;
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
    /// The trainer stopped waiting for it (it did not stop within the grace period).
    bool abandoned = false;
  };

  std::mutex mtx_;
  std::list<Entry> entries_;
};

ThreadRegistry& registry() {
  static ThreadRegistry instance;
  return instance;
}

std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

void train_thread(std::shared_ptr<ActorSession> session, std::shared_ptr<std::atomic<bool>> done) {
  WorkerExit exit;
  caf::actor trainer;
  std::function<void(const WorkerExit&)> on_exit;
  {
    auto& spec = session->spec();
    auto& ctx = spec.context;
    exit.rank = ctx.world_rank;
    exit.attempt = ctx.attempt;
    trainer = spec.trainer;
    on_exit = spec.on_exit;
    // Named, rather than inheriting the name of the CAF thread that started it.
    pthread_setname_np(pthread_self(), ("caftrain.rank" + std::to_string(ctx.world_rank)).substr(0, 15).c_str());
    ScopedWorker scope(session.get());
    at::set_num_threads(static_cast<int>(std::max<int64_t>(1, ctx.num_threads)));
    auto fail = [&](Errc code, const std::string& what) {
      exit.failed = true;
      exit.error = {code, "rank " + std::to_string(ctx.world_rank) + ": " + what, ctx.world_rank,
                    ctx.attempt};
    };
    try {
      session->connect();
      spec.run->train_func(spec.run->options.train_loop_config);
      session->flush(); // background reports count before the rank is done
    } catch (const Error& e) {
      fail(e.code(), e.what());
    } catch (const c10::Error& e) {
      fail(Errc::worker_failed, first_line(e.what()));
    } catch (const std::exception& e) {
      fail(Errc::worker_failed, e.what());
    } catch (...) {
      fail(Errc::worker_failed, "train_func threw a non-standard exception");
    }
    // Tell the trainer first, so that the cause of a failure reaches it before the
    // aborts its peers see once this rank's communicator closes.
    if (on_exit)
      on_exit(exit);
    else
      caf::anon_send(trainer, worker_exit_atom::value, exit);
    session->close_communicator(); // wakes peers still waiting on this rank
    try {
      session->flush(); // a background report still in flight ends once the trainer stops it
    } catch (...) {
      // the failure already sent is the cause
    }
    session.reset();
  }
  trainer = nullptr;
  done->store(true);
}

} // namespace

caf::behavior worker_actor(caf::stateful_actor<WorkerState>* self, WorkerSpec spec) {
  auto run = spec.run->name;
  auto attempt = spec.context.attempt;
  auto session = std::make_shared<ActorSession>(self->system(), std::move(spec));
  self->state.session = session;
  self->attach_functor([session](const caf::error& reason) {
    session->request_stop(reason ? session->system().render(reason) : "worker stopped");
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  registry().add(run, attempt, std::thread(train_thread, session, done), done);
  auto heartbeat = session->spec().run->options.run.heartbeat_timeout;
  if (heartbeat.count() > 0)
    self->delayed_send(self, kTick, tick_atom::value);
  return {
    [=](status_atom) { return self->state.session->context().world_rank; },
    [=](tick_atom) {
      auto& s = *self->state.session;
      if (done->load())
        return;
      if (auto& watchdog = s.spec().watchdog)
        self->send(watchdog, alive_atom::value);
      auto silent = s.since_heartbeat();
      if (silent > heartbeat) {
        auto& ctx = s.context();
        self->send(s.spec().trainer, stalled_atom::value, ctx.world_rank, ctx.attempt,
                   std::chrono::duration<double>(silent).count());
        return; // reported once; the trainer stops the attempt
      }
      self->delayed_send(self, kTick, tick_atom::value);
    },
  };
}

size_t join_worker_threads(const std::string& run, std::chrono::milliseconds grace) {
  return registry().join(run, grace);
}

void abandon_worker_threads(const std::string& run, int64_t attempt) {
  registry().abandon(run, attempt);
}

} // namespace caftrain
