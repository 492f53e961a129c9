#include "actors/store_server.hpp"

#include <chrono>
#include <cstring>

#include <caf/all.hpp>

#include "actors/messages.hpp"
#include "environment/store_protocol.hpp"

namespace caftrain {

namespace {

void deliver_waiting(StoreServerState& st, const std::string& key, const std::vector<char>& value) {
  auto i = st.waiting.find(key);
  if (i == st.waiting.end())
    return;
  for (auto& p : i->second)
    if (p.pending())
      p.deliver(value);
  st.waiting.erase(i);
}

} // namespace

caf::behavior store_server(caf::stateful_actor<StoreServerState>* self) {
  return {
    [=](store_set_atom, const std::string& key, std::vector<char>& value) {
      auto& st = self->state;
      deliver_waiting(st, key, value);
      st.keys[key] = std::move(value);
      return true;
    },
    [=](store_get_atom, const std::string& key, int64_t timeout_ms) -> caf::result<std::vector<char>> {
      auto& st = self->state;
      if (auto i = st.keys.find(key); i != st.keys.end())
        return i->second;
      auto rp = self->make_response_promise<std::vector<char>>();
      st.waiting[key].push_back(rp);
      self->delayed_send(self, std::chrono::milliseconds(timeout_ms), store_expire_atom::value, key);
      return rp;
    },
    [=](store_add_atom, const std::string& key, int64_t delta) {
      auto& st = self->state;
      auto& v = st.keys[key];
      int64_t current = 0;
      if (v.size() == sizeof(int64_t))
        std::memcpy(&current, v.data(), sizeof(int64_t));
      current += delta;
      v.resize(sizeof(int64_t));
      std::memcpy(v.data(), &current, sizeof(int64_t));
      deliver_waiting(st, key, v);
      return current;
    },
    [=](store_expire_atom, const std::string& key) {
      auto& st = self->state;
      auto i = st.waiting.find(key);
      if (i == st.waiting.end())
        return;
      // Waiters of one key expire in order: each get set its own timer, and the first
      // timer to fire belongs to the oldest waiter.
      auto p = i->second.front();
      i->second.erase(i->second.begin());
      if (p.pending())
        p.deliver(make_caf_error(Errc::collective_timeout,
                                 "rendezvous key '" + key + "' was not set in time"));
      if (i->second.empty())
        st.waiting.erase(i);
    },
    [=](store_fail_atom, const caf::error& err) {
      for (auto& [key, promises] : self->state.waiting)
        for (auto& p : promises)
          if (p.pending())
            p.deliver(err);
      self->state.waiting.clear();
    },
  };
}

} // namespace caftrain
