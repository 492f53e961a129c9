#include "train/session.hpp"

#include <atomic>

#include <spdlog/spdlog.h>

#include "core/error.hpp"

namespace caftrain::train {

namespace {

Session* current_session() noexcept {
  return dynamic_cast<Session*>(current_worker());
}

} // namespace

Session& session() {
  auto* s = current_session();
  if (!s)
    throw Error(Errc::invalid_config,
                "train::session() is called outside a TorchTrainer worker; run this code as "
                "the train_func of a caftrain::TorchTrainer");
  return *s;
}

bool in_session() noexcept {
  return current_session() != nullptr;
}

void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint,
            const ReportArgs& args) {
  if (auto* s = current_session())
    return s->report(metrics, checkpoint, args);
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    spdlog::warn("caftrain: train::report outside a TorchTrainer run does nothing (its "
                 "metrics and checkpoint are dropped); run train_func through a TorchTrainer "
                 "to record them");
}

std::optional<Checkpoint> get_checkpoint() {
  if (auto* s = current_session())
    return s->latest_checkpoint();
  return std::nullopt;
}

const WorkerContext& get_context() {
  if (auto* s = current_session())
    return s->context();
  static const WorkerContext standalone{};
  return standalone;
}

} // namespace caftrain::train
