// The caller side of a job actor (a trainer or a tuner): who waits for the end and who
// watches, kept the same way by every actor that runs a job.
#pragma once

#include <algorithm>
#include <optional>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/response_promise.hpp>

#include "actors/messages.hpp"

namespace caftrain {

/// (fit_atom): a promise of the job's result `R`, kept at once when it has ended.
template <class Self, class R>
caf::response_promise promise_result(Self self, const std::optional<R>& result,
                                     std::vector<caf::response_promise>& waiting) {
  auto rp = self->make_response_promise();
  if (result)
    rp.deliver(*result);
  else
    waiting.push_back(rp);
  return rp;
}

/// (subscribe_atom, subscriber): monitored, and sent (done_atom, result) at once when the
/// job has ended already.
template <class Self, class R>
void add_subscriber(Self self, caf::actor subscriber, const std::optional<R>& result,
                    std::vector<caf::actor>& subscribers) {
  self->monitor(subscriber);
  if (result)
    self->send(subscriber, done_atom::value, *result);
  else
    subscribers.push_back(std::move(subscriber));
}

/// Drops `who` (unsubscribe_atom, or its down message) from `subscribers`.
inline void remove_subscriber(std::vector<caf::actor>& subscribers, const caf::actor_addr& who) {
  subscribers.erase(std::remove_if(subscribers.begin(), subscribers.end(),
                                   [&](const caf::actor& a) { return a.address() == who; }),
                    subscribers.end());
}

} // namespace caftrain
