// The actor that serves a run's rendezvous store (the protocol in environment/store_protocol.hpp;
// ActorStore is its client). Internal to the runtime (not part of caftrain.hpp).
#pragma once

#include <map>
#include <string>
#include <vector>

#include <caf/behavior.hpp>
#include <caf/response_promise.hpp>
#include <caf/stateful_actor.hpp>

namespace caftrain {

struct StoreServerState {
  static inline const char* name = "caftrain.store";
  std::map<std::string, std::vector<char>> keys;
  /// Gets waiting for a key that is not set yet, oldest first.
  std::map<std::string, std::vector<caf::response_promise>> waiting;
};

/// Serves keys that are set, added to, and waited for (each get with its own timeout).
/// The trainer actor spawns one per run, apart from itself: a rendezvous (every rank's
/// gloo pairs at an attempt's start) never queues behind reports or checkpoint pieces in
/// the trainer's mailbox. `(store_fail_atom, error)` fails the gets waiting now (an
/// attempt stopped: its ranks must not wait out their timeouts); keys stay, since each
/// attempt's keys carry its number.
caf::behavior store_server(caf::stateful_actor<StoreServerState>* self);

} // namespace caftrain
