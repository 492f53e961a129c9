#include "callbacks/report_callback.hpp"

#include "core/error.hpp"
#include "train/session.hpp"
#include "train/trainer.hpp"
#include "train/trainer_state.hpp"

namespace caftrain {

ReportCallback::ReportCallback(ReportOptions options) : options_(std::move(options)) {
  if (options_.every_n_epochs < 0 || options_.every_n_steps < 0 || options_.checkpoint_every < 0)
    throw Error(Errc::invalid_config, "ReportCallback: every_n_epochs and every_n_steps must not "
                                      "be negative");
}

std::string ReportCallback::state_key() const {
  return "ReportCallback";
}

void ReportCallback::on_train_epoch_end(Trainer& trainer, LightningModule&) {
  if (options_.every_n_epochs > 0 && (trainer.current_epoch() + 1) % options_.every_n_epochs == 0)
    report(trainer);
}

void ReportCallback::on_train_batch_end(Trainer& trainer, LightningModule&, const at::Tensor&,
                                        const Batch&, int64_t) {
  if (options_.every_n_steps <= 0 || trainer.global_step() == 0)
    return;
  if (trainer.global_step() % options_.every_n_steps == 0 &&
      trainer.global_step() != last_reported_step_)
    report(trainer);
}

void ReportCallback::report(Trainer& trainer) {
  last_reported_step_ = trainer.global_step();
  Metrics metrics;
  if (options_.metrics.empty()) {
    metrics = trainer.callback_metrics();
  } else {
    for (auto& name : options_.metrics) {
      auto it = trainer.callback_metrics().find(name);
      if (it == trainer.callback_metrics().end())
        throw Error(Errc::invalid_config, "ReportCallback: metric '" + name +
                                            "' was never logged; log it or drop it from metrics");
      metrics[name] = it->second;
    }
  }
  metrics["epoch"] = static_cast<double>(trainer.current_epoch());
  metrics["step"] = static_cast<double>(trainer.global_step());
  if (!train::in_session())
    return train::report(metrics); // outside a run: warns once, records nothing
  auto& session = train::session();
  bool with_checkpoint = options_.checkpoint && options_.checkpoint_every > 0 &&
                         ++reports_ % options_.checkpoint_every == 0;
  CheckpointFiles files;
  if (with_checkpoint) {
    // The previous background report ends first: its snapshot's buffers are then free
    // for this one (else it would copy into new memory).
    session.flush();
    files = checkpoint_files(trainer); // the snapshot; collective for sharded strategies
  }
  session.report_snapshot(metrics, std::move(files), !options_.async_checkpoint);
}

} // namespace caftrain
