#include "actors/run_files.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "checkpoint/files.hpp"
#include "core/error.hpp"
#include "core/metrics_json.hpp"

namespace caftrain {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// -- records ------------------------------------------------------------------------------

json record_json(const ReportRecord& rec) {
  json all = json::array();
  for (auto& m : rec.all_metrics)
    all.push_back(metrics_to_json(m));
  return {{"index", rec.index},         {"attempt", rec.attempt},
          {"metrics", metrics_to_json(rec.metrics)}, {"all_metrics", all},
          {"checkpoint", rec.checkpoint_path},    {"timestamp", rec.timestamp}};
}

ReportRecord record_of(const json& j, const std::string& run) {
  ReportRecord rec;
  rec.run = run;
  rec.index = j.value("index", int64_t{-1});
  rec.attempt = j.value("attempt", int64_t{0});
  rec.metrics = metrics_from_json(j.value("metrics", json::object()));
  for (auto& m : j.value("all_metrics", json::array()))
    rec.all_metrics.push_back(metrics_from_json(m));
  rec.checkpoint_path = j.value("checkpoint", "");
  rec.timestamp = j.value("timestamp", 0.0);
  return rec;
}

Errc errc_named(const std::string& name) {
  for (int code = 0; code <= static_cast<int>(Errc::bad_state); ++code)
    if (name == to_string(static_cast<Errc>(code)))
      return static_cast<Errc>(code);
  return Errc::worker_failed;
}

// -- run.json -----------------------------------------------------------------------------

json config_json(const Config& c) {
  json config = json::object();
  for (auto& [k, v] : c.values())
    std::visit([&, key = k](const auto& x) { config[key] = x; }, v);
  return config;
}

Config config_of(const json& j) {
  Config config;
  for (auto& [k, v] : j.items()) {
    if (v.is_boolean())
      config.set(k, v.get<bool>());
    else if (v.is_number_integer())
      config.set(k, v.get<int64_t>());
    else if (v.is_number())
      config.set(k, v.get<double>());
    else
      config.set(k, v.get<std::string>());
  }
  return config;
}

json run_json(const std::string& name, const TorchTrainerOptions& o) {
  auto config = config_json(o.train_loop_config);
  auto& keep = o.run.checkpoint.num_to_keep;
  return {
    {"name", name},
    {"train_loop_config", config},
    {"backend", o.torch_config.backend},
    {"num_workers", o.scaling.num_workers},
    {"use_gpu", o.scaling.use_gpu},
    {"worker_mode", o.scaling.worker_mode},
    {"cpus_per_worker", o.scaling.resources_per_worker.cpus},
    {"gpus_per_worker", o.scaling.resources_per_worker.gpus},
    {"max_failures", o.run.failure.max_failures},
    {"num_to_keep", keep ? json(*keep) : json(nullptr)},
    {"checkpoint_score_attribute", o.run.checkpoint.checkpoint_score_attribute},
    {"checkpoint_score_order", o.run.checkpoint.checkpoint_score_order},
    {"stop", metrics_to_json(o.run.stop)},
    {"resume_from_checkpoint", o.resume_from_checkpoint},
  };
}

std::string run_file(const std::string& dir) {
  return (fs::path(dir) / kRunFile).string();
}

} // namespace

std::string config_to_json(const Config& config) {
  return config_json(config).dump();
}

Config config_from_json(const std::string& text) {
  auto j = json::parse(text, nullptr, false);
  if (!j.is_object())
    throw Error(Errc::invalid_argument, "not a JSON object of config values: " + text.substr(0, 80));
  try {
    return config_of(j);
  } catch (const json::exception& e) {
    throw Error(Errc::invalid_argument, std::string("config values must be scalars: ") + e.what());
  }
}

std::string expand_home(const std::string& path) {
  if (path.rfind("~/", 0) == 0 || path == "~") {
    const char* home = std::getenv("HOME");
    return std::string(home ? home : "/tmp") + path.substr(1);
  }
  return path;
}

std::string storage_root(const std::string& storage_path) {
  return expand_home(storage_path.empty() ? std::string("~/caftrain_results") : storage_path);
}

std::string timestamped_name(const std::string& prefix) {
  auto t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char when[64];
  std::strftime(when, sizeof(when), "_%Y-%m-%d_%H-%M-%S", &tm);
  char suffix[8];
  std::snprintf(suffix, sizeof(suffix), "_%04x", std::random_device{}() & 0xffff);
  return prefix + when + suffix;
}

void write_run_file(const std::string& dir, const std::string& name,
                    const TorchTrainerOptions& options) {
  write_file_atomic(run_file(dir), run_json(name, options).dump(2));
}

bool has_run_file(const std::string& dir) {
  std::error_code ec;
  return fs::is_regular_file(run_file(dir), ec);
}

StoredRun read_run_file(const std::string& dir) {
  auto path = run_file(dir);
  if (!has_run_file(dir))
    throw Error(Errc::invalid_config, "'" + dir + "' is not a run directory (it has no " +
                                        kRunFile + "); pass the directory of a TorchTrainer run");
  auto bytes = read_file(path);
  StoredRun stored;
  auto& o = stored.options;
  try {
    auto j = json::parse(bytes.begin(), bytes.end());
    stored.name = j.at("name").get<std::string>();
    o.train_loop_config = config_of(j.at("train_loop_config"));
    o.torch_config.backend = j.value("backend", "auto");
    o.scaling.num_workers = j.at("num_workers").get<int64_t>();
    o.scaling.use_gpu = j.at("use_gpu").get<bool>();
    o.scaling.worker_mode = j.value("worker_mode", "thread");
    o.scaling.resources_per_worker.cpus = j.value("cpus_per_worker", 0.0);
    o.scaling.resources_per_worker.gpus = j.value("gpus_per_worker", 0.0);
    o.run.name = stored.name;
    o.run.failure.max_failures = j.at("max_failures").get<int64_t>();
    if (!j.at("num_to_keep").is_null())
      o.run.checkpoint.num_to_keep = j.at("num_to_keep").get<int64_t>();
    o.run.checkpoint.checkpoint_score_attribute =
      j.at("checkpoint_score_attribute").get<std::string>();
    o.run.checkpoint.checkpoint_score_order = j.at("checkpoint_score_order").get<std::string>();
    o.run.stop = metrics_from_json(j.value("stop", json::object()));
    o.resume_from_checkpoint = j.value("resume_from_checkpoint", "");
  } catch (const json::exception& e) {
    throw Error(Errc::corrupt_checkpoint, "the run file '" + path + "' is not valid (" + e.what() +
                                            "); restore it from a backup, or remove the run "
                                            "directory to start the run afresh");
  }
  return stored;
}

std::vector<std::string> run_file_changes(const StoredRun& stored, const TorchTrainerOptions& options) {
  auto before = run_json(stored.name, stored.options);
  auto after = run_json(stored.name, options);
  std::vector<std::string> changes;
  for (auto& [key, value] : after.items())
    if (before[key] != value)
      changes.push_back(key + ": " + before[key].dump() + " -> " + value.dump());
  return changes;
}

void append_history(const std::string& dir, const ReportRecord& record) {
  std::ofstream out(fs::path(dir) / kHistoryFile, std::ios::app);
  out << record_json(record).dump() << '\n';
  if (!out)
    spdlog::warn("caftrain: cannot append to {}/{}", dir, kHistoryFile);
}

std::vector<ReportRecord> read_history(const std::string& dir, const std::string& run) {
  std::map<int64_t, ReportRecord> by_index;
  std::ifstream in(fs::path(dir) / kHistoryFile);
  for (std::string line; std::getline(in, line);) {
    auto j = json::parse(line, nullptr, false);
    if (!j.is_object())
      continue; // a line cut short by a crash
    try {
      auto rec = record_of(j, run);
      if (rec.index >= 0)
        by_index[rec.index] = std::move(rec);
    } catch (const json::exception&) {
      // a line of the wrong shape: skipped like a cut one
    } catch (const Error&) {
      // a metric that is no number: skipped likewise
    }
  }
  std::vector<ReportRecord> result;
  for (auto& [index, rec] : by_index)
    result.push_back(std::move(rec));
  return result;
}

void write_result_file(const Result& r) {
  json history = json::array();
  for (auto& rec : r.metrics_history)
    history.push_back(record_json(rec));
  json j = {{"metrics", metrics_to_json(r.metrics)},
            {"history", history},
            {"checkpoint", r.checkpoint ? r.checkpoint->path() : ""},
            {"attempts", r.attempts},
            {"error", r.error ? r.error->message : ""},
            {"error_code", r.error ? to_string(r.error->code) : ""},
            {"error_rank", r.error ? r.error->rank : -1},
            {"error_attempt", r.error ? r.error->attempt : 0},
            {"finished_at", now_seconds()}};
  try {
    write_file_atomic((fs::path(r.path) / kResultFile).string(), j.dump(2));
  } catch (const Error& e) {
    spdlog::warn("caftrain: cannot write {}: {}", kResultFile, e.what());
  }
}

std::optional<StoredResult> read_result_file(const std::string& dir, const std::string& run) {
  auto path = fs::path(dir) / kResultFile;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    return std::nullopt;
  try {
    auto bytes = read_file(path.string());
    auto j = json::parse(bytes.begin(), bytes.end());
    StoredResult stored;
    for (auto& rec : j.at("history"))
      stored.history.push_back(record_of(rec, run));
    stored.attempts = j.value("attempts", int64_t{0});
    auto message = j.value("error", "");
    auto code = j.value("error_code", "");
    if (!message.empty() || !code.empty())
      stored.error = RunError{code.empty() ? Errc::worker_failed : errc_named(code), message,
                              j.value("error_rank", int64_t{-1}), j.value("error_attempt", int64_t{0})};
    return stored;
  } catch (const std::exception& e) {
    spdlog::warn("caftrain: ignoring unreadable {}: {}", path.string(), e.what());
    return std::nullopt;
  }
}

void remove_result_file(const std::string& dir) {
  std::error_code ec;
  fs::remove(fs::path(dir) / kResultFile, ec);
}

} // namespace caftrain
