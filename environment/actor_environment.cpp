#include "environment/actor_environment.hpp"

#include "environment/communicator.hpp"
#include "environment/worker_context.hpp"

#include "core/error.hpp"

namespace caftrain {

ActorEnvironment::ActorEnvironment() : worker_(current_worker()) {
  // nop
}

bool ActorEnvironment::bound() const {
  return worker() != nullptr;
}

WorkerRuntime* ActorEnvironment::worker() const {
  if (!worker_)
    worker_ = current_worker();
  return worker_;
}

std::string ActorEnvironment::name() const {
  return "ActorEnvironment";
}

int64_t ActorEnvironment::world_size() const {
  auto* w = worker();
  return w ? w->context().world_size : 1;
}

int64_t ActorEnvironment::global_rank() const {
  auto* w = worker();
  return w ? w->context().world_rank : 0;
}

int64_t ActorEnvironment::local_rank() const {
  auto* w = worker();
  return w ? w->context().local_rank : 0;
}

int64_t ActorEnvironment::node_rank() const {
  auto* w = worker();
  return w ? w->context().node_rank : 0;
}

std::shared_ptr<Communicator> ActorEnvironment::communicator() const {
  auto* w = worker();
  return w ? w->communicator() : nullptr;
}

std::string ActorEnvironment::device() const {
  auto* w = worker();
  return w ? w->context().device : "";
}

void ActorEnvironment::check_stop() const {
  auto* w = worker();
  if (!w)
    return;
  w->heartbeat();
  if (w->stop_requested())
    throw Error(Errc::cancelled, "this attempt was stopped by the trainer: " + w->stop_reason());
}

} // namespace caftrain
