// The files of a run directory besides its checkpoints: run.json (what the run was asked
// to do), history.jsonl (every report, appended as it completes) and result.json (how it
// ended). The trainer actor writes them; TorchTrainer and Result::from_path read them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "actors/result.hpp"
#include "actors/run_config.hpp"

namespace caftrain {

/// File names inside a run directory.
constexpr const char* kRunFile = "run.json";
constexpr const char* kHistoryFile = "history.jsonl";
constexpr const char* kResultFile = "result.json";

/// What run.json holds: the run's name and the options it was (last) started with.
/// Callbacks and timeouts are not stored: they are the caller's.
struct StoredRun {
  /// The run name.
  std::string name;
  /// Everything but `run.callbacks` and the `run` timeouts, which keep their defaults.
  TorchTrainerOptions options;
};

/// `path` with a leading "~" replaced by $HOME.
std::string expand_home(const std::string& path);

/// Where runs and experiments are kept: `storage_path` with "~" expanded, or
/// "~/caftrain_results" (Ray's ~/ray_results) when it is empty.
std::string storage_root(const std::string& storage_path);

/// A default run or experiment name: `prefix` + "_<local date and time>_<4 hex digits>",
/// e.g. "TorchTrainer_2026-12-02_05-40-12_a3f0".
std::string timestamped_name(const std::string& prefix);

/// A Config as a JSON object (how run.json stores train_loop_config, and how a worker
/// process receives it).
std::string config_to_json(const Config& config);

/// The Config of `config_to_json`; throws `Error(invalid_argument)` for text that is not
/// a JSON object of scalars.
Config config_from_json(const std::string& text);

/// Writes run.json of `dir` (atomically).
void write_run_file(const std::string& dir, const std::string& name,
                    const TorchTrainerOptions& options);

/// True when `dir` holds a run.json.
bool has_run_file(const std::string& dir);

/// Reads run.json of `dir`. Throws `Error(invalid_config)` when `dir` holds no run.json,
/// and `Error(corrupt_checkpoint)` naming the file and the bad field when it is not valid.
StoredRun read_run_file(const std::string& dir);

/// The stored options that `options` changes, one "field: old -> new" each (empty when
/// they agree).
std::vector<std::string> run_file_changes(const StoredRun& stored, const TorchTrainerOptions& options);

/// Appends `record` to history.jsonl of `dir` (a warning when that fails).
void append_history(const std::string& dir, const ReportRecord& record);

/// The reports history.jsonl of `dir` holds, by index: the last record of each index (a
/// redone report replaces the one of the failed attempt). Lines cut short by a crash are
/// skipped.
std::vector<ReportRecord> read_history(const std::string& dir, const std::string& run);

/// Writes result.json of `result.path` (a warning when that fails).
void write_result_file(const Result& result);

/// What result.json holds.
struct StoredResult {
  /// The run's reports as its Result held them.
  std::vector<ReportRecord> history;
  /// Attempts started.
  int64_t attempts = 0;
  /// Why the run failed, if it did.
  std::optional<RunError> error;
};

/// result.json of `dir`, or nothing when the run has not ended (or the file is unreadable).
std::optional<StoredResult> read_result_file(const std::string& dir, const std::string& run);

/// Removes result.json of `dir`: a resumed run has not ended yet.
void remove_result_file(const std::string& dir);

} // namespace caftrain
