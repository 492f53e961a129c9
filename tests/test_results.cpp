// What a run leaves behind and how it is picked up again: Result::from_path,
// Result::get_best_checkpoint, checkpoints with names of their own, and resuming a run by
// its name.
#include <catch2/catch.hpp>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "actors/run_files.hpp"
#include "helpers.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;

using System = test::ActorSystem;

/// A checkpoint directory (not yet committed) of one file, state.txt, holding `text`.
Checkpoint write_checkpoint(const std::string& scratch, const std::string& text) {
  static std::atomic<int> counter{0};
  auto dir = fs::path(scratch) / ("ckpt-" + std::to_string(counter++));
  fs::create_directories(dir);
  std::ofstream(dir / "state.txt") << text;
  return Checkpoint::from_directory(dir.string());
}

std::string read_state(const Checkpoint& checkpoint) {
  std::ifstream in(checkpoint.file("state.txt"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// One worker; reports "acc" and "loss" from the config's lists with a checkpoint each
/// time, starting after the report its checkpoint (train::get_checkpoint) holds, and
/// throws at report "fail_at" (-1: never).
void scored_job(const Config& c) {
  static const double acc[] = {0.2, 0.7, 0.9, 0.5, 0.6, 0.8};
  static const double loss[] = {1.0, 0.6, 0.3, 0.4, 0.5, 0.2};
  int64_t first = 0;
  if (auto ckpt = train::get_checkpoint())
    first = std::stoll(read_state(*ckpt)) + 1;
  for (int64_t i = first; i < c.get<int64_t>("reports"); ++i) {
    if (i == c.get<int64_t>("fail_at", -1))
      throw std::runtime_error("injected failure at report " + std::to_string(i));
    train::report({{"acc", acc[i]}, {"loss", loss[i]}, {"i", double(i)}},
                  write_checkpoint(c.get<std::string>("scratch"), std::to_string(i)));
  }
}

TorchTrainerOptions scored_options(const test::TempDir& dir, int64_t reports, int64_t fail_at = -1) {
  TorchTrainerOptions o;
  o.train_loop_config = {{"reports", reports}, {"fail_at", fail_at}, {"scratch", dir / "scratch"}};
  o.run.storage_path = dir.path();
  o.run.name = "run";
  o.run.checkpoint = {.num_to_keep = 2,
                      .checkpoint_score_attribute = "acc",
                      .checkpoint_score_order = "max"};
  return o;
}

std::vector<std::string> paths(const std::vector<std::pair<Checkpoint, Metrics>>& items) {
  std::vector<std::string> result;
  for (auto& [checkpoint, metrics] : items)
    result.push_back(checkpoint.path());
  return result;
}

/// Collects what spdlog's default logger prints while alive.
class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)) {
    spdlog::default_logger()->sinks().push_back(sink_);
  }
  ~LogCapture() {
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
  }
  std::string text() {
    sink_->flush();
    return out_.str();
  }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> sink_;
};

} // namespace

TEST_CASE("Result::from_path reads a finished run back as fit returned it, best checkpoints in the run's order", "[results]") {
  test::TempDir dir;
  System s;
  TorchTrainer trainer(s.sys, scored_job, scored_options(dir, 4));
  auto live = trainer.fit();
  INFO((live.error ? live.error->message : ""));
  REQUIRE(live.ok());
  auto stored = Result::from_path(trainer.path());
  CHECK(stored.ok());
  CHECK(stored.path == fs::absolute(trainer.path()).lexically_normal().string());
  CHECK(stored.metrics == live.metrics);
  CHECK(stored.attempts == 1);
  REQUIRE(stored.metrics_history.size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(stored.metrics_history[i].index == live.metrics_history[i].index);
    CHECK(stored.metrics_history[i].attempt == 0);
    CHECK(stored.metrics_history[i].metrics == live.metrics_history[i].metrics);
    CHECK(stored.metrics_history[i].all_metrics == live.metrics_history[i].all_metrics);
    CHECK(stored.metrics_history[i].checkpoint_path == live.metrics_history[i].checkpoint_path);
  }
  REQUIRE(stored.checkpoint);
  CHECK(stored.checkpoint->path() == live.checkpoint->path());
  CHECK(read_state(*stored.checkpoint) == "3");
  // num_to_keep 2 by "acc" (max) keeps 0.9 and 0.7, plus the latest (0.5): best first.
  CHECK(paths(stored.best_checkpoints) == paths(live.best_checkpoints));
  REQUIRE(stored.best_checkpoints.size() == 3);
  CHECK(stored.best_checkpoints[0].second.at("acc") == 0.9);
  CHECK(stored.best_checkpoints[1].second.at("acc") == 0.7);
  CHECK(stored.best_checkpoints[2].second.at("acc") == 0.5);
}

TEST_CASE("Result::from_path of a failed run carries its error and the checkpoints before it", "[results]") {
  test::TempDir dir;
  System s;
  TorchTrainer trainer(s.sys, scored_job, scored_options(dir, 4, 2));
  auto live = trainer.fit();
  REQUIRE(live.error);
  auto stored = Result::from_path(trainer.path());
  REQUIRE(stored.error);
  CHECK(stored.error->code == live.error->code);
  CHECK(stored.error->code == Errc::worker_failed);
  CHECK(stored.error->rank == 0);
  CHECK(stored.error->message == live.error->message);
  CHECK_THAT(stored.error->message, Contains("injected failure at report 2"));
  CHECK(stored.attempts == 1);
  CHECK(stored.metrics_history.size() == 2);
  REQUIRE(stored.checkpoint);
  CHECK(read_state(*stored.checkpoint) == "1");
}

TEST_CASE("Result::from_path refuses a missing folder, a folder without a run and a corrupt run file, naming them", "[results]") {
  test::TempDir dir;
  CHECK_THROWS_WITH(Result::from_path(dir / "missing"),
                    Contains(dir / "missing") && Contains("not a directory"));
  CHECK_THROWS_WITH(Result::from_path(dir.path()), Contains(dir.path()) && Contains("holds no run"));
  std::ofstream(dir / "run.json") << "{\"name\": ";
  try {
    Result::from_path(dir.path());
    FAIL("a corrupt run.json was accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Errc::corrupt_checkpoint);
    CHECK_THAT(e.what(), Contains(dir / "run.json") && Contains("not valid"));
  }
}

TEST_CASE("get_best_checkpoint picks the best kept checkpoint by any reported metric, max or min", "[results]") {
  test::TempDir dir;
  System s;
  auto o = scored_options(dir, 6);
  o.run.checkpoint = {};
  auto result = TorchTrainer(s.sys, scored_job, o).fit();
  REQUIRE(result.ok());
  REQUIRE(result.best_checkpoints.size() == 6);
  auto by_acc = result.get_best_checkpoint("acc", "max");
  REQUIRE(by_acc);
  CHECK(read_state(*by_acc) == "2"); // acc 0.9
  auto by_loss = result.get_best_checkpoint("loss", "min");
  REQUIRE(by_loss);
  CHECK(read_state(*by_loss) == "5"); // loss 0.2
  CHECK(read_state(*result.get_best_checkpoint("acc", "min")) == "0");
  SECTION("an unknown metric or mode is an error listing what exists") {
    CHECK_THROWS_WITH(result.get_best_checkpoint("accuracy", "max"),
                      Contains("'accuracy'") && Contains("acc, i, loss"));
    CHECK_THROWS_WITH(result.get_best_checkpoint("acc", "maximum"),
                      Contains("'maximum'") && Contains("\"max\" or \"min\""));
  }
}

TEST_CASE("get_best_checkpoint never picks a NaN score, and has nothing to pick without checkpoints", "[results]") {
  test::TempDir dir;
  auto nan = std::numeric_limits<double>::quiet_NaN();
  Result r;
  CHECK_FALSE(r.get_best_checkpoint("acc", "max"));
  for (double acc : {0.4, nan, 0.8, nan})
    r.best_checkpoints.emplace_back(write_checkpoint(dir.path(), std::to_string(acc)), Metrics{{"acc", acc}});
  CHECK(read_state(*r.get_best_checkpoint("acc", "max")) == std::to_string(0.8));
  CHECK(read_state(*r.get_best_checkpoint("acc", "min")) == std::to_string(0.4));
  Result all_nan;
  all_nan.best_checkpoints.emplace_back(write_checkpoint(dir.path(), "x"), Metrics{{"acc", nan}});
  CHECK_FALSE(all_nan.get_best_checkpoint("acc", "max"));
}

TEST_CASE("A checkpoint reported with checkpoint_dir_name lands under that name, and a taken name fails the run and keeps the first", "[results]") {
  test::TempDir dir;
  System s;
  auto fn = [&](const Config&) {
    train::report({{"i", 0.0}}, write_checkpoint(dir / "scratch", "first"), {.checkpoint_dir_name = "best"});
    train::report({{"i", 1.0}}, write_checkpoint(dir / "scratch", "second"));
    train::report({{"i", 2.0}}, write_checkpoint(dir / "scratch", "third"), {.checkpoint_dir_name = "best"});
  };
  auto o = scored_options(dir, 0);
  o.run.checkpoint = {};
  o.run.failure.max_failures = 2; // a bad name is a configuration error: never retried
  TorchTrainer trainer(s.sys, fn, o);
  auto result = trainer.fit();
  REQUIRE(result.error);
  CHECK(result.error->code == Errc::invalid_config);
  CHECK_THAT(result.error->message, Contains("checkpoint_dir_name 'best' already exists"));
  CHECK(result.attempts == 1);
  auto named = Checkpoint::open(dir / "run/best");
  CHECK_NOTHROW(named.validate());
  CHECK(read_state(named) == "first");
  CHECK(named.metadata().metrics.at("i") == 0);
  CHECK(result.metrics_history.at(0).checkpoint_path == named.path());
  // Default names stay checkpoint_<index>; both kinds are found again from disk.
  CHECK(result.checkpoint->path() == dir / "run/checkpoint_000001");
  auto found = find_checkpoints(dir / "run");
  REQUIRE(found.size() == 2);
  CHECK(found[0].path() == named.path());
  auto stored = Result::from_path(dir / "run");
  CHECK(stored.best_checkpoints.size() == 2);
  SECTION("a name that is not a plain directory name is refused") {
    auto bad = [&](const Config&) {
      train::report({{"i", 0.0}}, write_checkpoint(dir / "scratch", "x"), {.checkpoint_dir_name = "../x"});
    };
    auto o2 = o;
    o2.run.name = "bad";
    auto r = TorchTrainer(s.sys, bad, o2).fit();
    REQUIRE(r.error);
    CHECK_THAT(r.error->message, Contains("'../x' is not a plain directory name"));
    CHECK_FALSE(fs::exists(dir / "x"));
  }
}

TEST_CASE("A new TorchTrainer with the name and storage path of an earlier run resumes it from its latest checkpoint, with its history, and says so", "[results]") {
  test::TempDir dir;
  System s;
  auto first = TorchTrainer(s.sys, scored_job, scored_options(dir, 3)).fit();
  REQUIRE(first.ok());
  LogCapture log;
  TorchTrainer again(s.sys, scored_job, scored_options(dir, 6));
  CHECK_THAT(log.text(), Contains("resuming run 'run'") && Contains("checkpoint_000002"));
  // The options given now apply; the log names what changed.
  CHECK_THAT(log.text(), Contains("train_loop_config") && Contains("the new ones apply"));
  CHECK(read_run_file(again.path()).options.train_loop_config.get<int64_t>("reports") == 6);
  auto result = again.fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  CHECK(result.attempts == 2); // attempts keep counting
  REQUIRE(result.metrics_history.size() == 6);
  for (size_t i = 0; i < 6; ++i) {
    CAPTURE(i);
    CHECK(result.metrics_history[i].index == static_cast<int64_t>(i));
    CHECK(result.metrics_history[i].metrics.at("i") == static_cast<double>(i));
    CHECK(result.metrics_history[i].attempt == (i < 3 ? 0 : 1));
  }
  // The earlier run's kept checkpoints count for retention and for the best ones.
  REQUIRE(result.checkpoint);
  CHECK(read_state(*result.checkpoint) == "5");
  REQUIRE(!result.best_checkpoints.empty());
  CHECK(read_state(result.best_checkpoints.front().first) == "2"); // acc 0.9, of the first run
  CHECK(Result::from_path(again.path()).metrics_history.size() == 6);
}

TEST_CASE("A run directory that holds no run, or whose run file is corrupt, is refused naming it", "[results]") {
  test::TempDir dir;
  System s;
  fs::create_directories(dir / "run");
  std::ofstream(dir / "run/notes.txt") << "not a run";
  CHECK_THROWS_WITH(TorchTrainer(s.sys, scored_job, scored_options(dir, 1)),
                    Contains(dir / "run") && Contains("holds no run"));
  std::ofstream(dir / "run/run.json") << "[1, 2";
  try {
    TorchTrainer(s.sys, scored_job, scored_options(dir, 1));
    FAIL("a corrupt run.json was accepted");
  } catch (const Error& e) {
    CHECK(e.code() == Errc::corrupt_checkpoint);
    CHECK_THAT(e.what(), Contains(dir / "run/run.json") && Contains("not valid"));
  }
}
