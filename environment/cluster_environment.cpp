#include "environment/cluster_environment.hpp"

#include "core/error.hpp"
#include "environment/communicator.hpp"

namespace caftrain {

ClusterEnvironment::~ClusterEnvironment() = default;

std::string LightningEnvironment::name() const {
  return "LightningEnvironment";
}

int64_t LightningEnvironment::world_size() const {
  return 1;
}

int64_t LightningEnvironment::global_rank() const {
  return 0;
}

int64_t LightningEnvironment::local_rank() const {
  return 0;
}

int64_t LightningEnvironment::node_rank() const {
  return 0;
}

std::shared_ptr<Communicator> LightningEnvironment::communicator() const {
  return nullptr;
}

StaticEnvironment::StaticEnvironment(std::shared_ptr<Communicator> communicator,
                                     int64_t local_rank, int64_t node_rank)
  : communicator_(std::move(communicator)), local_rank_(local_rank), node_rank_(node_rank) {
  if (local_rank_ < 0)
    local_rank_ = communicator_ ? communicator_->rank() : 0;
}

std::string StaticEnvironment::name() const {
  return "StaticEnvironment";
}

int64_t StaticEnvironment::world_size() const {
  return communicator_ ? communicator_->size() : 1;
}

int64_t StaticEnvironment::global_rank() const {
  return communicator_ ? communicator_->rank() : 0;
}

int64_t StaticEnvironment::local_rank() const {
  return local_rank_;
}

int64_t StaticEnvironment::node_rank() const {
  return node_rank_;
}

std::shared_ptr<Communicator> StaticEnvironment::communicator() const {
  return communicator_;
}

} // namespace caftrain
