// Restoring a run whose process died: a child process runs a job and is SIGKILLed mid-run;
// this process continues the run from its directory and ends where an undisturbed run ends.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "helpers.hpp"
#include "restore_job.hpp"

using namespace caftrain;

namespace {

namespace fs = std::filesystem;

using System = test::ActorSystem;

/// A child process (fork + exec) with stdout and stderr in a log file; killed and reaped
/// when the object dies, so that no failed assertion leaves it running.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& args, const std::string& log) : log_(log) {
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ < 0)
      throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      // Only async-signal-safe calls between fork and exec: this process has threads.
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }

  ~ChildProcess() {
    kill_and_reap();
  }

  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  /// True while the child has not exited.
  bool running() {
    if (reaped_)
      return false;
    if (::waitpid(pid_, &status_, WNOHANG) == pid_)
      reaped_ = true;
    return !reaped_;
  }

  /// SIGKILLs the child if it still runs and waits for it; returns its wait status.
  int kill_and_reap() {
    if (!reaped_) {
      ::kill(pid_, SIGKILL);
      while (::waitpid(pid_, &status_, 0) < 0 && errno == EINTR) {
        // retry
      }
      reaped_ = true;
    }
    return status_;
  }

  /// What the child printed.
  std::string log() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = 0;
};

/// Names of the committed checkpoint directories of a run, sorted.
std::vector<std::string> checkpoint_dirs(const std::string& run_dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (auto& entry : fs::directory_iterator(run_dir, ec)) {
    auto name = entry.path().filename().string();
    if (name.rfind("checkpoint_", 0) == 0 && entry.is_directory())
      names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// Every report of a run as it completes, including those a restart redoes.
class ReportRecorder : public RunCallback {
 public:
  void on_report(const ReportRecord& record) override {
    std::lock_guard<std::mutex> guard(mtx_);
    reports_.emplace_back(record.index, record.attempt);
  }

  std::vector<std::pair<int64_t, int64_t>> reports() const {
    std::lock_guard<std::mutex> guard(mtx_);
    return reports_;
  }

 private:
  mutable std::mutex mtx_;
  std::vector<std::pair<int64_t, int64_t>> reports_;
};

} // namespace

TEST_CASE("A run whose process was killed mid-run is restored from its latest checkpoint and ends like an undisturbed run", "[restore]") {
  test::TempDir dir;
  auto run_dir = dir / "killed";
  // 60 ms per step: the kill lands between two checkpoints, well before the job ends.
  auto child = std::make_unique<ChildProcess>(
    std::vector<std::string>{CAFTRAIN_RESTORE_CHILD, dir.path(), "killed", "60"}, dir / "child.log");
  // Wait for 2 checkpoints, and for the report of the newest to be in the history: the
  // kill then falls into training, not between a commit and its history line.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  std::vector<std::string> found;
  for (;;) {
    found = checkpoint_dirs(run_dir);
    if (found.size() >= 2 &&
        read_text(run_dir + "/history.jsonl").find(found.back()) != std::string::npos)
      break;
    INFO(child->log());
    REQUIRE(child->running());
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto status = child->kill_and_reap();
  INFO(child->log());
  // It was killed, not finished on its own.
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGKILL);
  child.reset();

  CHECK(TorchTrainer::can_restore(run_dir));
  auto checkpoints = find_checkpoints(run_dir);
  REQUIRE(checkpoints.size() >= 2);
  auto latest = checkpoints.back().metadata().report_index;
  REQUIRE(latest + 1 < test::kRestoreJobSteps);

  // Read from disk, the interrupted run says it has not ended, and what it had done.
  auto interrupted = Result::from_path(run_dir);
  REQUIRE(interrupted.error);
  CHECK(interrupted.error->code == Errc::bad_state);
  CHECK_THAT(interrupted.error->message, Catch::Matchers::Contains("has not ended"));
  REQUIRE(interrupted.checkpoint);
  CHECK(interrupted.checkpoint->path() == checkpoints.back().path());
  CHECK(interrupted.attempts == 1);
  CHECK(static_cast<int64_t>(interrupted.metrics_history.size()) >= latest + 1);

  System s;
  auto recorder = std::make_shared<ReportRecorder>();
  TorchTrainerOptions overrides;
  overrides.run.callbacks = {recorder};
  auto restored = TorchTrainer::restore(s.sys, run_dir, test::restore_job, overrides);
  CHECK(restored.name() == "killed");
  auto result = restored.fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());

  // (No SECTIONs: each would run the child again.)
  // The restored attempt is the second and starts at the report after the latest checkpoint.
  CHECK(result.attempts == 2);
  auto live = recorder->reports();
  REQUIRE(!live.empty());
  CHECK(live.front().first == latest + 1);
  CHECK(live.back().first == test::kRestoreJobSteps - 1);
  for (auto& [index, attempt] : live)
    CHECK(attempt == 1);

  // The history holds every index once: the killed process's up to the checkpoint (read
  // back from history.jsonl), then the restored attempt's.
  REQUIRE(result.metrics_history.size() == static_cast<size_t>(test::kRestoreJobSteps));
  for (size_t i = 0; i < result.metrics_history.size(); ++i) {
    auto& rec = result.metrics_history[i];
    CAPTURE(i);
    CHECK(rec.index == static_cast<int64_t>(i));
    CHECK(rec.metrics.at("step") == static_cast<double>(i + 1));
    CHECK(rec.attempt == (rec.index <= latest ? 0 : 1));
  }

  // From disk, the run is now finished, with the same history and attempts.
  auto stored = Result::from_path(run_dir);
  CHECK(stored.ok());
  CHECK(stored.attempts == 2);
  CHECK(stored.metrics_history.size() == result.metrics_history.size());
  REQUIRE(stored.checkpoint);
  CHECK(stored.checkpoint->path() == result.checkpoint->path());

  // Losses and final weights are those of an undisturbed run of the job in this process.
  auto clean = TorchTrainer(s.sys, test::restore_job, test::restore_job_options(dir.path(), "clean", 0)).fit();
  REQUIRE(clean.ok());
  REQUIRE(clean.metrics_history.size() == result.metrics_history.size());
  for (size_t i = 0; i < clean.metrics_history.size(); ++i) {
    CAPTURE(i);
    CHECK(result.metrics_history[i].metrics.at("loss") == clean.metrics_history[i].metrics.at("loss"));
  }
  REQUIRE(result.checkpoint);
  REQUIRE(clean.checkpoint);
  CHECK(result.checkpoint->metadata().report_index == test::kRestoreJobSteps - 1);
  auto ours = result.checkpoint->model_state_dict();
  auto theirs = clean.checkpoint->model_state_dict();
  REQUIRE(ours.size() == theirs.size());
  for (auto& item : ours) {
    CAPTURE(item.key());
    CHECK(torch::equal(item.value(), theirs[item.key()]));
  }
}

TEST_CASE("can_restore is false and restore refuses for a directory that is not a run", "[restore]") {
  test::TempDir dir;
  CHECK_FALSE(TorchTrainer::can_restore(dir.path()));
  CHECK_FALSE(TorchTrainer::can_restore(dir / "missing"));
  System s;
  CHECK_THROWS_WITH(TorchTrainer::restore(s.sys, dir.path(), test::restore_job),
                    Catch::Matchers::Contains(dir.path()) &&
                      Catch::Matchers::Contains("is not a run directory"));
}
