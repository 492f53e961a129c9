#include "environment/actor_environment.hpp"

#include "core/error.hpp"
#include "environment/communicator.hpp"
#include "environment/worker_context.hpp"

namespace caftrain {

ActorEnvironment::ActorEnvironment() : worker_(current_worker()) {
  // nop
}

bool ActorEnvironment::bound() const {
  if (!worker_)
    worker_ = current_worker();
  return worker_ != nullptr;
}

WorkerRuntime& ActorEnvironment::worker() const {
  if (!bound())
    throw Error(Errc::invalid_config,
                "ActorEnvironment is used outside a TorchTrainer worker; run train_func "
                "through caftrain::TorchTrainer, or drop the plugin to train in this process");
  return *worker_;
}

std::string ActorEnvironment::name() const {
  return "ActorEnvironment";
}

int64_t ActorEnvironment::world_size() const {
  return worker().context().world_size;
}

int64_t ActorEnvironment::global_rank() const {
  return worker().context().world_rank;
}

int64_t ActorEnvironment::local_rank() const {
  return worker().context().local_rank;
}

int64_t ActorEnvironment::node_rank() const {
  return worker().context().node_rank;
}

std::shared_ptr<Communicator> ActorEnvironment::communicator() const {
  return worker().communicator();
}

std::string ActorEnvironment::device() const {
  return worker().context().device;
}

void ActorEnvironment::check_stop() const {
  auto& w = worker();
  w.heartbeat();
  if (w.stop_requested())
    throw Error(Errc::cancelled, "this attempt was stopped by the trainer: " + w.stop_reason());
}

} // namespace caftrain
