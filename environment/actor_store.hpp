// ActorStore: a Store whose keys live in an actor (a run's store server, actors/store_server.hpp).
#pragma once

#include <memory>

#include "environment/store.hpp"

namespace caf {
class actor;
class actor_system;
} // namespace caf

namespace caftrain {

/// Client of a run's rendezvous store, served by its store server (actors/store_server.hpp).
/// Works from any thread, through the middleman for a remote server too.
class ActorStore : public Store {
 public:
  ActorStore(caf::actor_system& system, const caf::actor& server);
  ~ActorStore() override;

  void set(const std::string& key, const std::vector<char>& value) override;
  std::vector<char> get(const std::string& key, std::chrono::milliseconds timeout) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

} // namespace caftrain
