#include "actors/result.hpp"

#include <cmath>
#include <filesystem>
#include <set>

#include "actors/run_files.hpp"
#include "checkpoint/checkpoint_manager.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace fs = std::filesystem;

Result Result::from_path(const std::string& given) {
  auto path = expand_home(given);
  std::error_code ec;
  if (!fs::is_directory(path, ec))
    throw Error(Errc::invalid_config, "Result::from_path: '" + path +
                                        "' is not a directory; pass a run directory "
                                        "(<RunConfig.storage_path>/<RunConfig.name>)");
  if (!has_run_file(path))
    throw Error(Errc::invalid_config, "Result::from_path: '" + path + "' holds no run (it has no " +
                                        kRunFile + "); pass a run directory "
                                                   "(<RunConfig.storage_path>/<RunConfig.name>)");
  auto stored = read_run_file(path);
  Result r;
  r.path = fs::absolute(path).lexically_normal().string();
  if (r.path.size() > 1 && r.path.back() == '/')
    r.path.pop_back();
  auto& keep = stored.options.run.checkpoint;
  CheckpointManager manager(RetentionPolicy{keep.num_to_keep, keep.checkpoint_score_attribute,
                                            keep.checkpoint_score_order});
  std::vector<std::pair<Checkpoint, Metrics>> existing;
  for (auto& c : find_checkpoints(r.path, stored.name))
    existing.emplace_back(c, c.metadata().metrics);
  manager.adopt(existing);
  r.checkpoint = manager.latest();
  r.best_checkpoints = manager.best();
  if (auto ended = read_result_file(r.path, stored.name)) {
    r.metrics_history = std::move(ended->history);
    r.attempts = ended->attempts;
    r.error = ended->error;
  } else {
    r.metrics_history = read_history(r.path, stored.name);
    for (auto& rec : r.metrics_history)
      r.attempts = std::max(r.attempts, rec.attempt + 1);
    r.error = RunError{Errc::bad_state,
                       "run '" + stored.name + "' has not ended (no " + kResultFile +
                         "): its process stopped before the run did, or it still runs; "
                         "resume it with a TorchTrainer of the same RunConfig name and storage_path",
                       -1, std::max<int64_t>(r.attempts - 1, 0)};
  }
  if (!r.metrics_history.empty())
    r.metrics = r.metrics_history.back().metrics;
  return r;
}

std::optional<Checkpoint> Result::get_best_checkpoint(const std::string& metric,
                                                      const std::string& mode) const {
  if (mode != "max" && mode != "min")
    throw Error(Errc::invalid_argument, "Result::get_best_checkpoint: mode '" + mode +
                                          "' is unknown; use \"max\" or \"min\"");
  if (best_checkpoints.empty())
    return std::nullopt;
  std::set<std::string> known;
  bool carried = false;
  const std::pair<Checkpoint, Metrics>* best = nullptr;
  for (auto& item : best_checkpoints) {
    for (auto& [key, value] : item.second)
      known.insert(key);
    auto it = item.second.find(metric);
    if (it == item.second.end())
      continue;
    carried = true;
    auto value = it->second;
    if (std::isnan(value))
      continue; // the worst: never best
    if (!best || (mode == "max" ? value > best->second.at(metric) : value < best->second.at(metric)))
      best = &item;
  }
  if (!carried) {
    std::string list;
    for (auto& key : known)
      list += (list.empty() ? "" : ", ") + key;
    throw Error(Errc::invalid_argument,
                "Result::get_best_checkpoint: no kept checkpoint has the metric '" + metric +
                  "'; they have " + (list.empty() ? "no metrics" : list));
  }
  if (!best)
    return std::nullopt;
  return best->first;
}

} // namespace caftrain
