#include "callbacks/early_stopping.hpp"

#include <cmath>
#include <iostream>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/metrics_json.hpp"
#include "train/trainer.hpp"

namespace caftrain {

EarlyStopping::EarlyStopping(EarlyStoppingOptions options) : options_(std::move(options)) {
  if (options_.monitor.empty())
    throw Error(Errc::invalid_config, "EarlyStopping needs a metric to monitor, e.g. "
                                      "EarlyStopping({.monitor = \"val_loss\"})");
  if (options_.mode != "min" && options_.mode != "max")
    throw Error(Errc::invalid_config,
                "EarlyStopping mode '" + options_.mode + "' is unknown; use \"min\" or \"max\"");
  if (options_.patience < 0)
    throw Error(Errc::invalid_config, "EarlyStopping patience must not be negative");
  best_score_ = options_.mode == "min" ? std::numeric_limits<double>::infinity()
                                       : -std::numeric_limits<double>::infinity();
}

std::string EarlyStopping::state_key() const {
  return "EarlyStopping{monitor=" + options_.monitor + ", mode=" + options_.mode + "}";
}

bool EarlyStopping::better(double current, double reference) const {
  return options_.mode == "min" ? current < reference : current > reference;
}

void EarlyStopping::on_validation_end(Trainer& trainer, LightningModule&) {
  if (!options_.check_on_train_epoch_end && !trainer.sanity_checking() && trainer.training())
    check(trainer);
}

void EarlyStopping::on_train_epoch_end(Trainer& trainer, LightningModule&) {
  if (options_.check_on_train_epoch_end)
    check(trainer);
}

void EarlyStopping::check(Trainer& trainer) {
  auto& metrics = trainer.callback_metrics();
  auto it = metrics.find(options_.monitor);
  if (it == metrics.end()) {
    if (!options_.strict)
      return;
    std::string known;
    for (auto& [k, v] : metrics)
      known += (known.empty() ? "" : ", ") + k;
    throw Error(Errc::invalid_config,
                "EarlyStopping monitors '" + options_.monitor +
                  "', which was never logged (logged: " + (known.empty() ? "nothing" : known) +
                  "); log it with self.log or pass strict = false");
  }
  double current = it->second;
  bool stop = false;
  if (options_.check_finite && !std::isfinite(current)) {
    stop = true;
    reason_ = "monitored metric " + options_.monitor + " is not finite";
  } else if (options_.stopping_threshold && better(current, *options_.stopping_threshold)) {
    stop = true;
    reason_ = "stopping threshold reached: " + options_.monitor + " = " + std::to_string(current);
  } else if (options_.divergence_threshold && better(*options_.divergence_threshold, current)) {
    stop = true;
    reason_ = "divergence threshold crossed: " + options_.monitor + " = " + std::to_string(current);
  } else {
    double delta = options_.mode == "min" ? -options_.min_delta : options_.min_delta;
    if (better(current - delta, best_score_)) {
      best_score_ = current;
      wait_count_ = 0;
    } else if (++wait_count_ >= options_.patience) {
      stop = true;
      reason_ = "monitored metric " + options_.monitor + " did not improve in the last " +
                std::to_string(wait_count_) + " checks; best score " + std::to_string(best_score_);
    }
  }
  // Every rank must decide alike; the most cautious rank wins.
  stop = trainer.strategy().reduce(stop ? 1.0 : 0.0, ReduceOp::max) > 0.0;
  if (stop) {
    stopped_epoch_ = trainer.current_epoch();
    trainer.set_should_stop(true);
    if (options_.verbose && trainer.is_global_zero())
      std::cout << "EarlyStopping: " << reason_ << std::endl;
  }
}

nlohmann::json EarlyStopping::state_dict() const {
  return {{"wait_count", wait_count_},
          {"stopped_epoch", stopped_epoch_},
          {"best_score", number_to_json(best_score_)},
          {"patience", options_.patience}};
}

void EarlyStopping::load_state_dict(const nlohmann::json& state) {
  wait_count_ = state.value("wait_count", int64_t{0});
  stopped_epoch_ = state.value("stopped_epoch", int64_t{0});
  // Infinite while nothing was seen yet: stored as "Infinity" (null by older versions).
  if (state.contains("best_score") && !state.at("best_score").is_null())
    best_score_ = number_from_json(state.at("best_score"));
}

} // namespace caftrain
