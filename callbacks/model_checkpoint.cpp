#include "callbacks/model_checkpoint.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <filesystem>
#include <regex>

#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint_manager.hpp"
#include "core/error.hpp"
#include "core/metrics_json.hpp"
#include "train/trainer.hpp"
#include "train/trainer_state.hpp"

namespace caftrain {

namespace fs = std::filesystem;

namespace {

RetentionPolicy policy_of(const ModelCheckpointOptions& o) {
  RetentionPolicy p;
  if (o.save_top_k == 0) {
    // No top-k (Lightning): with save_last only the latest checkpoint stays, by recency.
    p.num_to_keep = 1;
    p.keep_latest = true;
    return p;
  }
  if (o.save_top_k > 0)
    p.num_to_keep = o.save_top_k;
  p.score_attribute = o.monitor;
  p.score_order = o.mode;
  p.keep_latest = o.save_last;
  return p;
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.4f", v);
  return buf;
}

} // namespace

ModelCheckpoint::ModelCheckpoint(ModelCheckpointOptions options) : options_(std::move(options)) {
  if (options_.mode != "min" && options_.mode != "max")
    throw Error(Errc::invalid_config,
                "ModelCheckpoint mode '" + options_.mode + "' is unknown; use \"min\" or \"max\"");
  if (options_.save_top_k < -1)
    throw Error(Errc::invalid_config, "ModelCheckpoint save_top_k must be -1 (all), 0 or more");
  if (options_.every_n_epochs < 0 || options_.every_n_train_steps < 0)
    throw Error(Errc::invalid_config, "ModelCheckpoint intervals must not be negative");
  if (options_.save_top_k > 1 && options_.monitor.empty())
    throw Error(Errc::invalid_config,
                "ModelCheckpoint save_top_k = " + std::to_string(options_.save_top_k) +
                  " ranks checkpoints, which needs a metric: set monitor (e.g. \"val_loss\")");
  manager_ = std::make_unique<CheckpointManager>(policy_of(options_));
}

ModelCheckpoint::~ModelCheckpoint() = default;

ModelCheckpoint::ModelCheckpoint(const ModelCheckpoint& other)
  : Callback(other), options_(other.options_),
    manager_(std::make_unique<CheckpointManager>(policy_of(other.options_))) {
  // A copy keeps the options; what it saves is its own.
}

std::string ModelCheckpoint::state_key() const {
  return "ModelCheckpoint{monitor=" + options_.monitor + ", mode=" + options_.mode + "}";
}

void ModelCheckpoint::setup(Trainer& trainer, LightningModule&, Stage) {
  dirpath_ = options_.dirpath.empty() ? (fs::path(trainer.log_dir()) / "checkpoints").string()
                                      : options_.dirpath;
}

std::string ModelCheckpoint::format_name(const Trainer& trainer) const {
  auto name = options_.filename;
  auto replace = [&](const std::string& key, const std::string& value) {
    for (size_t pos; (pos = name.find("{" + key + "}")) != std::string::npos;)
      name.replace(pos, key.size() + 2, value);
  };
  replace("epoch", std::to_string(trainer.current_epoch()));
  replace("step", std::to_string(trainer.global_step()));
  for (auto& [k, v] : trainer.callback_metrics())
    replace(k, number(v));
  auto base = name;
  for (int v = 1; fs::exists(fs::path(dirpath_) / name); ++v)
    name = base + "-v" + std::to_string(v);
  return name;
}

void ModelCheckpoint::on_train_epoch_end(Trainer& trainer, LightningModule&) {
  if (options_.every_n_epochs > 0 && options_.every_n_train_steps == 0 &&
      (trainer.current_epoch() + 1) % options_.every_n_epochs == 0)
    save(trainer);
}

void ModelCheckpoint::on_train_batch_end(Trainer& trainer, LightningModule&, const at::Tensor&,
                                         const Batch&, int64_t) {
  auto n = options_.every_n_train_steps;
  if (n > 0 && trainer.global_step() > 0 && trainer.global_step() % n == 0 &&
      trainer.global_step() != last_saved_step_)
    save(trainer);
}

void ModelCheckpoint::save(Trainer& trainer) {
  if (options_.save_top_k == 0 && !options_.save_last)
    return;
  last_saved_step_ = trainer.global_step();
  auto& metrics = trainer.callback_metrics();
  manager_->check_metrics(metrics); // a missing monitor is an error before anything is written
  // Every rank derives the same name: the progress is the same everywhere.
  auto path = (fs::path(dirpath_) / format_name(trainer)).string();
  write_checkpoint(trainer, path);
  if (!trainer.is_global_zero())
    return;
  manager_->register_checkpoint(Checkpoint::open(path), metrics);
  last_model_path_ = path;
  auto best = manager_->best();
  if (!best.empty() && options_.save_top_k != 0) {
    best_model_path_ = best.front().first.path();
    if (!options_.monitor.empty()) {
      auto score = best.front().second.at(options_.monitor);
      // Only NaN scores so far: Lightning records NaN as the worst value of the mode.
      if (std::isnan(score))
        score = (options_.mode == "min" ? 1 : -1) * std::numeric_limits<double>::infinity();
      best_model_score_ = score;
    }
  }
  if (options_.save_last) {
    // `last` points at the latest checkpoint; replaced atomically (symlink + rename).
    auto link = fs::path(dirpath_) / "last";
    auto tmp = fs::path(dirpath_) / (".last." + std::to_string(::getpid()));
    std::error_code ec;
    fs::remove(tmp, ec);
    fs::create_directory_symlink(fs::path(path).filename(), tmp, ec);
    if (!ec)
      fs::rename(tmp, link, ec);
  }
}

std::vector<std::string> ModelCheckpoint::best_k_models() const {
  std::vector<std::string> result;
  if (options_.save_top_k == 0)
    return result; // only `last` is kept, which is not a top-k checkpoint
  for (auto& [c, m] : manager_->best())
    result.push_back(c.path());
  return result;
}

nlohmann::json ModelCheckpoint::state_dict() const {
  nlohmann::json kept = nlohmann::json::array();
  for (auto& [c, m] : manager_->kept())
    kept.push_back(c.path());
  return {{"best_model_path", best_model_path_},
          {"best_model_score", best_model_score_ ? number_to_json(*best_model_score_) : nullptr},
          {"last_model_path", last_model_path_},
          {"dirpath", dirpath_},
          {"kept", kept}};
}

void ModelCheckpoint::load_state_dict(const nlohmann::json& state) {
  best_model_path_ = state.value("best_model_path", "");
  if (state.contains("best_model_score") && !state.at("best_model_score").is_null())
    best_model_score_ = number_from_json(state.at("best_model_score"));
  last_model_path_ = state.value("last_model_path", "");
  // Adopt the checkpoints the earlier fit kept, so that retention continues across resumes.
  std::vector<std::pair<Checkpoint, Metrics>> kept;
  for (auto& p : state.value("kept", nlohmann::json::array())) {
    try {
      auto c = Checkpoint::open(p.get<std::string>());
      kept.emplace_back(c, c.metadata().metrics);
    } catch (const Error&) {
      // deleted since: nothing to adopt
    }
  }
  manager_ = std::make_unique<CheckpointManager>(policy_of(options_));
  manager_->adopt(kept);
}

} // namespace caftrain
