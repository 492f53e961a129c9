#include "callbacks/report_callback.hpp"

#include <unistd.h>

#include <atomic>
#include <filesystem>

#include "checkpoint/files.hpp"
#include "core/error.hpp"
#include "train/session.hpp"
#include "train/trainer.hpp"
#include "train/trainer_state.hpp"

namespace caftrain {

namespace fs = std::filesystem;

ReportCallback::ReportCallback(ReportOptions options) : options_(std::move(options)) {
  if (options_.every_n_epochs < 0 || options_.every_n_steps < 0)
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
  auto& session = train::session();
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
  if (!options_.checkpoint) {
    session.report(metrics, std::nullopt);
    return;
  }
  auto files = checkpoint_files(trainer); // collective for sharded strategies
  if (files.empty()) {
    session.report(metrics, std::nullopt);
    return;
  }
  // Stage beside the run's checkpoints (same file system: the trainer moves, not copies).
  static std::atomic<uint64_t> counter{0};
  auto& ctx = session.context();
  auto dir = fs::path(ctx.run_dir) / ".staging" /
             ("a" + std::to_string(ctx.attempt) + "-r" + std::to_string(ctx.world_rank) + "-" +
              std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    throw Error(Errc::io_error, "cannot create checkpoint staging directory '" + dir.string() +
                                  "': " + ec.message());
  for (auto& [name, bytes] : files) {
    auto path = dir / name;
    fs::create_directories(path.parent_path(), ec);
    write_file_atomic(path.string(), bytes);
  }
  session.report(metrics, Checkpoint::from_directory(dir.string()));
}

} // namespace caftrain
