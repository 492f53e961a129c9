#include "train/session.hpp"

#include "core/error.hpp"

namespace caftrain::train {

Session& session() {
  auto* s = dynamic_cast<Session*>(current_worker());
  if (!s)
    throw Error(Errc::invalid_config,
                "train::report/get_checkpoint/get_context are called outside a TorchTrainer "
                "worker; run this code as the train_func of a caftrain::TorchTrainer");
  return *s;
}

bool in_session() noexcept {
  return dynamic_cast<Session*>(current_worker()) != nullptr;
}

void report(const Metrics& metrics, const std::optional<Checkpoint>& checkpoint) {
  session().report(metrics, checkpoint);
}

std::optional<Checkpoint> get_checkpoint() {
  return session().latest_checkpoint();
}

const WorkerContext& get_context() {
  return session().context();
}

} // namespace caftrain::train
