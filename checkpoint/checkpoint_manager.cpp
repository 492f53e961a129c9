#include "checkpoint/checkpoint_manager.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/error.hpp"

namespace caftrain {

namespace fs = std::filesystem;

CheckpointManager::CheckpointManager(RetentionPolicy policy, Remover remover)
  : policy_(std::move(policy)), remover_(std::move(remover)) {
  if (policy_.num_to_keep && *policy_.num_to_keep < (policy_.keep_latest ? 1 : 0))
    throw Error(Errc::invalid_config, "CheckpointConfig.num_to_keep is " +
                                        std::to_string(*policy_.num_to_keep) +
                                        "; keep at least 1 or leave it unset to keep all");
  if (policy_.score_order != "max" && policy_.score_order != "min")
    throw Error(Errc::invalid_config, "CheckpointConfig.checkpoint_score_order '" +
                                        policy_.score_order + "' is unknown; use \"max\" or \"min\"");
}

void CheckpointManager::check_metrics(const Metrics& metrics) const {
  if (policy_.score_attribute.empty() || metrics.count(policy_.score_attribute))
    return;
  std::string known;
  for (auto& [k, v] : metrics)
    known += (known.empty() ? "" : ", ") + k;
  throw Error(Errc::invalid_config,
              "checkpoint_score_attribute '" + policy_.score_attribute +
                "' is not among the reported metrics (" + (known.empty() ? "none" : known) +
                "); report it with every checkpoint or change CheckpointConfig");
}

bool CheckpointManager::better(const Metrics& a, const Metrics& b) const {
  auto x = a.at(policy_.score_attribute);
  auto y = b.at(policy_.score_attribute);
  // NaN ranks below every number, as in Ray's manager: never the best, and the
  // comparison stays a strict weak ordering (NaNs are equivalent to each other).
  if (std::isnan(x))
    return false;
  if (std::isnan(y))
    return true;
  return policy_.score_order == "max" ? x > y : x < y;
}

void CheckpointManager::register_checkpoint(const Checkpoint& checkpoint, const Metrics& metrics) {
  check_metrics(metrics);
  kept_.emplace_back(checkpoint, metrics);
  if (!policy_.num_to_keep)
    return;
  auto k = static_cast<size_t>(*policy_.num_to_keep);
  // Keep the best k (by score, else the most recent k) plus the latest.
  std::vector<size_t> order(kept_.size());
  for (size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  if (policy_.score_attribute.empty())
    std::reverse(order.begin(), order.end());
  else
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return better(kept_[a].second, kept_[b].second); });
  std::vector<bool> keep(kept_.size(), false);
  for (size_t i = 0; i < order.size() && i < k; ++i)
    keep[order[i]] = true;
  if (policy_.keep_latest)
    keep.back() = true;
  std::vector<std::pair<Checkpoint, Metrics>> survivors;
  for (size_t i = 0; i < kept_.size(); ++i) {
    if (keep[i]) {
      survivors.push_back(std::move(kept_[i]));
    } else if (remover_) {
      remover_(kept_[i].first.path());
    } else {
      std::error_code ec;
      fs::remove_all(kept_[i].first.path(), ec);
    }
  }
  kept_ = std::move(survivors);
}

void CheckpointManager::adopt(const std::vector<std::pair<Checkpoint, Metrics>>& existing) {
  for (auto& item : existing)
    kept_.push_back(item);
}

std::optional<Checkpoint> CheckpointManager::latest() const {
  if (kept_.empty())
    return std::nullopt;
  return kept_.back().first;
}

std::optional<Checkpoint> CheckpointManager::latest_valid() const {
  for (auto i = kept_.rbegin(); i != kept_.rend(); ++i) {
    try {
      i->first.validate();
      return i->first;
    } catch (const Error&) {
      // corrupt: fall back to the one before
    }
  }
  return std::nullopt;
}

std::vector<std::pair<Checkpoint, Metrics>> CheckpointManager::best() const {
  auto result = kept_;
  if (policy_.score_attribute.empty()) {
    std::reverse(result.begin(), result.end());
  } else {
    std::stable_sort(result.begin(), result.end(),
                     [&](auto& a, auto& b) { return better(a.second, b.second); });
  }
  return result;
}

std::vector<Checkpoint> find_checkpoints(const std::string& run_dir, const std::string& run) {
  std::vector<Checkpoint> result;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec))
    return result;
  for (auto& entry : fs::directory_iterator(run_dir, ec)) {
    auto name = entry.path().filename().string();
    if (!entry.is_directory() || name.empty() || name.front() == '.')
      continue;
    try {
      auto checkpoint = Checkpoint::open(entry.path().string());
      if (run.empty() || checkpoint.metadata().run == run)
        result.push_back(std::move(checkpoint));
    } catch (const Error&) {
      // no metadata: an interrupted save (never picked), or not a checkpoint at all
    }
  }
  std::sort(result.begin(), result.end(), [](const Checkpoint& a, const Checkpoint& b) {
    return a.metadata().report_index < b.metadata().report_index;
  });
  return result;
}

} // namespace caftrain
