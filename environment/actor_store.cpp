#include "environment/actor_store.hpp"

#include <caf/all.hpp>

#include "core/error.hpp"
#include "environment/store_protocol.hpp"

namespace caftrain {

namespace {

/// Slack on top of a store timeout for the request itself.
constexpr auto kRequestSlack = std::chrono::seconds(5);

[[noreturn]] void fail(caf::actor_system& sys, const std::string& what, const caf::error& err) {
  throw Error(Errc::collective_timeout, "rendezvous store: " + what + " failed: " + sys.render(err));
}

} // namespace

struct ActorStore::Impl {
  caf::actor_system& sys;
  caf::actor server;
};

ActorStore::ActorStore(caf::actor_system& system, const caf::actor& server)
  : impl_(std::make_unique<Impl>(Impl{system, server})) {
  // nop
}

ActorStore::~ActorStore() = default;

void ActorStore::set(const std::string& key, const std::vector<char>& value) {
  caf::scoped_actor self{impl_->sys};
  self->request(impl_->server, kRequestSlack * 6, store_set_atom::value, key, value)
    .receive([](bool) {}, [&](caf::error& err) { fail(impl_->sys, "set " + key, err); });
}

std::vector<char> ActorStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{impl_->sys};
  std::vector<char> result;
  self
    ->request(impl_->server, timeout + kRequestSlack, store_get_atom::value, key,
              static_cast<int64_t>(timeout.count()))
    .receive([&](std::vector<char>& value) { result = std::move(value); },
             [&](caf::error& err) { fail(impl_->sys, "get " + key, err); });
  return result;
}

void ActorStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (auto& key : keys) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
    get(key, std::max(left, std::chrono::milliseconds(0)));
  }
}

int64_t ActorStore::add(const std::string& key, int64_t delta) {
  caf::scoped_actor self{impl_->sys};
  int64_t result = 0;
  self->request(impl_->server, kRequestSlack * 6, store_add_atom::value, key, delta)
    .receive([&](int64_t value) { result = value; },
             [&](caf::error& err) { fail(impl_->sys, "add " + key, err); });
  return result;
}

} // namespace caftrain
