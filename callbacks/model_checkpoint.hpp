// ModelCheckpoint: Lightning's checkpoint callback, for runs with or without actors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "callbacks/callback.hpp"

namespace caftrain {

class CheckpointManager;

/// Options of `ModelCheckpoint`; defaults are Lightning's.
struct ModelCheckpointOptions {
  /// Directory of the checkpoints. Default "": `<trainer.log_dir()>/checkpoints`.
  std::string dirpath = "";
  /// Name of each checkpoint directory; `{epoch}`, `{step}` and `{<metric>}` are filled
  /// in. Default "epoch={epoch}-step={step}".
  std::string filename = "epoch={epoch}-step={step}";
  /// Metric that ranks checkpoints; "" (default) keeps the most recent ones.
  std::string monitor = "";
  /// "min" (default) or "max".
  std::string mode = "min";
  /// Checkpoints kept: the best k by `monitor` (a NaN value ranks worst); -1 keeps all;
  /// 0 keeps none, or with save_last only the latest (as `last`). Default 1.
  int64_t save_top_k = 1;
  /// Also keep the latest checkpoint, reachable as `<dirpath>/last`. Default false.
  bool save_last = false;
  /// Save at the end of every N-th training epoch (after its validation); 0: never.
  /// Default 1.
  int64_t every_n_epochs = 1;
  /// Save every N optimizer steps instead; 0 (default): not by steps.
  int64_t every_n_train_steps = 0;
};

/// Lightning's ModelCheckpoint: saves checkpoints of the running fit in caftrain's
/// format (atomic directories, CRC-checked, model.pt readable by Python) and keeps the
/// best `save_top_k` by `monitor` through a `CheckpointManager`. Resume with
/// `trainer.fit(model, data, val, checkpoint.best_model_path())` (or last_model_path()).
class ModelCheckpoint : public Callback {
 public:
  /// Throws `Error(invalid_config)` for a bad mode, save_top_k < -1 or negative intervals.
  explicit ModelCheckpoint(ModelCheckpointOptions options = {});
  ~ModelCheckpoint() override;
  ModelCheckpoint(const ModelCheckpoint& other);

  std::string state_key() const override;
  void setup(Trainer& trainer, LightningModule& module, Stage stage) override;
  void on_train_epoch_end(Trainer& trainer, LightningModule& module) override;
  void on_train_batch_end(Trainer& trainer, LightningModule& module, const at::Tensor& loss,
                          const Batch& batch, int64_t batch_idx) override;
  nlohmann::json state_dict() const override;
  void load_state_dict(const nlohmann::json& state) override;

  /// Saves now (collective: every rank calls it at the same point).
  void save(Trainer& trainer);

  /// Path of the best checkpoint so far ("" before the first save, and always "" with
  /// save_top_k = 0, as in Lightning).
  const std::string& best_model_path() const noexcept {
    return best_model_path_;
  }

  /// Its score (monitored value), if any; a NaN score reads as the worst value of the mode
  /// (+inf for "min", -inf for "max"), as in Lightning.
  std::optional<double> best_model_score() const noexcept {
    return best_model_score_;
  }

  /// Path of the latest checkpoint ("" before the first save).
  const std::string& last_model_path() const noexcept {
    return last_model_path_;
  }

  /// Paths of the kept checkpoints, best first (none with save_top_k = 0).
  std::vector<std::string> best_k_models() const;

  const std::string& dirpath() const noexcept {
    return dirpath_;
  }

 private:
  std::string format_name(const Trainer& trainer) const;

  ModelCheckpointOptions options_;
  std::string dirpath_;
  std::unique_ptr<CheckpointManager> manager_;
  std::string best_model_path_;
  std::optional<double> best_model_score_;
  std::string last_model_path_;
  int64_t last_saved_step_ = -1;
};

} // namespace caftrain
