// CheckpointManager: which persisted checkpoints a run keeps.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint.hpp"

namespace caftrain {

/// Retention policy of a `CheckpointManager` (the fields of Ray's CheckpointConfig).
struct RetentionPolicy {
  /// Keep at most this many; unset keeps all.
  std::optional<int64_t> num_to_keep = std::nullopt;
  /// Metric ranking checkpoints; "" ranks by recency. A NaN score ranks below every
  /// number in either order (the first to be dropped, never the best).
  std::string score_attribute = "";
  /// "max" or "min".
  std::string score_order = "max";
  /// Keep the latest checkpoint besides the best ones. Default true (a restart then
  /// never goes back further than it must).
  bool keep_latest = true;
};

/// Keeps the best `num_to_keep` checkpoints by score (or the most recent ones without a
/// score attribute) and, besides them, always the latest, so that a restart never goes
/// back further than it must: at most num_to_keep + 1 are on disk. Checkpoints it drops are
/// deleted from disk. Registration order is report order.
class CheckpointManager {
 public:
  /// Deletes a dropped checkpoint's directory. The default removes it at once; the
  /// trainer actor hands it to its I/O actor instead.
  using Remover = std::function<void(const std::string& path)>;

  /// Throws `Error(invalid_config)` for num_to_keep < 1 or an unknown order.
  explicit CheckpointManager(RetentionPolicy policy = {}, Remover remover = {});

  /// Adds a persisted checkpoint with the metrics reported with it, then applies the
  /// policy (deleting what it drops). Throws `Error(invalid_config)` naming the attribute
  /// when the score attribute is missing from `metrics`, before anything is changed.
  void register_checkpoint(const Checkpoint& checkpoint, const Metrics& metrics);

  /// Adopts checkpoints found on disk (restore), oldest first, without deleting any.
  void adopt(const std::vector<std::pair<Checkpoint, Metrics>>& existing);

  /// The most recent checkpoint.
  std::optional<Checkpoint> latest() const;

  /// The latest checkpoint that passes `validate()`; a corrupt one is skipped (it stays on
  /// disk for inspection) and the previous good one returned.
  std::optional<Checkpoint> latest_valid() const;

  /// The kept checkpoints with their metrics, best first (by score, else newest first).
  std::vector<std::pair<Checkpoint, Metrics>> best() const;

  /// Everything kept, in registration order.
  const std::vector<std::pair<Checkpoint, Metrics>>& kept() const noexcept {
    return kept_;
  }

  const RetentionPolicy& policy() const noexcept {
    return policy_;
  }

  /// Checks that `metrics` carries the score attribute (when one is configured).
  void check_metrics(const Metrics& metrics) const;

 private:
  bool better(const Metrics& a, const Metrics& b) const;

  RetentionPolicy policy_;
  Remover remover_;
  std::vector<std::pair<Checkpoint, Metrics>> kept_;
};

/// Persisted checkpoints directly under a run directory: every subdirectory whose
/// metadata opens (default `checkpoint_<index>` and names given by
/// `train::report(..., {.checkpoint_dir_name})` alike) and, when `run` is given, whose
/// metadata names that run; oldest first by report index. Half-written ones (no
/// metadata) and hidden directories (staging) are ignored.
std::vector<Checkpoint> find_checkpoints(const std::string& run_dir, const std::string& run = "");

} // namespace caftrain
