#include "callbacks/tune_report_callback.hpp"

#include <algorithm>

#include "core/error.hpp"
#include "train/session.hpp"
#include "train/trainer.hpp"
#include "train/trainer_state.hpp"

namespace caftrain {

namespace {

const char* const kHooks[] = {"fit_start",         "fit_end",           "train_start",
                              "train_end",         "train_epoch_start", "train_epoch_end",
                              "train_batch_end",   "validation_start",  "validation_end",
                              "validation_epoch_end", "test_end"};

std::map<std::string, std::string> same_names(const std::vector<std::string>& names) {
  std::map<std::string, std::string> out;
  for (auto& n : names)
    out[n] = n;
  return out;
}

} // namespace

TuneReportCallback::TuneReportCallback(std::map<std::string, std::string> metrics, std::string on)
  : metrics_(std::move(metrics)), on_(std::move(on)) {
  if (std::find(std::begin(kHooks), std::end(kHooks), on_) == std::end(kHooks)) {
    std::string names;
    for (auto h : kHooks)
      names += (names.empty() ? "" : ", ") + std::string(h);
    throw Error(Errc::invalid_config, "TuneReportCallback: on = '" + on_ + "' is not a hook; use one of " + names);
  }
}

TuneReportCallback::TuneReportCallback(const std::vector<std::string>& metrics, std::string on)
  : TuneReportCallback(same_names(metrics), std::move(on)) {
  // nop
}

std::string TuneReportCallback::state_key() const {
  return "TuneReportCallback[" + on_ + "]";
}

Metrics TuneReportCallback::metrics_of(Trainer& trainer) const {
  auto& logged = trainer.callback_metrics();
  if (metrics_.empty())
    return logged;
  Metrics out;
  for (auto& [tune_name, logged_name] : metrics_) {
    auto i = logged.find(logged_name);
    if (i == logged.end()) {
      std::string names;
      for (auto& [k, v] : logged)
        names += (names.empty() ? "" : ", ") + k;
      throw Error(Errc::invalid_config,
                  "TuneReportCallback: metric '" + logged_name + "' (reported as '" + tune_name +
                    "') was not logged by " + on_ + "; logged: " + (names.empty() ? "nothing" : names));
    }
    out[tune_name] = i->second;
  }
  return out;
}

void TuneReportCallback::at(const char* hook, Trainer& trainer) {
  if (on_ != hook || trainer.sanity_checking())
    return;
  auto metrics = metrics_of(trainer);
  if (!train::in_session() || !checkpoint_)
    return train::report(metrics);
  // The snapshot is collective on sharded strategies: every rank takes it at this hook.
  train::session().report_snapshot(metrics, checkpoint_files(trainer), true);
}

void TuneReportCallback::on_fit_start(Trainer& t, LightningModule&) {
  at("fit_start", t);
}
void TuneReportCallback::on_fit_end(Trainer& t, LightningModule&) {
  at("fit_end", t);
}
void TuneReportCallback::on_train_start(Trainer& t, LightningModule&) {
  at("train_start", t);
}
void TuneReportCallback::on_train_end(Trainer& t, LightningModule&) {
  at("train_end", t);
}
void TuneReportCallback::on_train_epoch_start(Trainer& t, LightningModule&) {
  at("train_epoch_start", t);
}
void TuneReportCallback::on_train_epoch_end(Trainer& t, LightningModule&) {
  at("train_epoch_end", t);
}
void TuneReportCallback::on_train_batch_end(Trainer& t, LightningModule&, const at::Tensor&,
                                            const Batch&, int64_t) {
  at("train_batch_end", t);
}
void TuneReportCallback::on_validation_start(Trainer& t, LightningModule&) {
  at("validation_start", t);
}
void TuneReportCallback::on_validation_end(Trainer& t, LightningModule&) {
  at("validation_end", t);
}
void TuneReportCallback::on_validation_epoch_end(Trainer& t, LightningModule&) {
  at("validation_epoch_end", t);
}
void TuneReportCallback::on_test_end(Trainer& t, LightningModule&) {
  at("test_end", t);
}

TuneReportCheckpointCallback::TuneReportCheckpointCallback(std::map<std::string, std::string> metrics,
                                                           std::string on)
  : TuneReportCallback(std::move(metrics), std::move(on)) {
  checkpoint_ = true;
}

std::string TuneReportCheckpointCallback::state_key() const {
  return "TuneReportCheckpointCallback";
}

} // namespace caftrain
