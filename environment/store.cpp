#include "environment/store.hpp"

#include <cstring>

#include "core/error.hpp"

namespace caftrain {

namespace {

[[noreturn]] void missing(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  std::string names;
  for (auto& k : keys)
    names += (names.empty() ? "" : ", ") + k;
  throw Error(Errc::collective_timeout, "rendezvous store: key(s) " + names + " not set within " +
                                          std::to_string(timeout.count()) +
                                          " ms; a rank did not start or died during rendezvous");
}

} // namespace

Store::~Store() = default;

void InMemoryStore::set(const std::string& key, const std::vector<char>& value) {
  {
    std::lock_guard<std::mutex> guard(mtx_);
    values_[key] = value;
  }
  cv_.notify_all();
}

std::vector<char> InMemoryStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  wait({key}, timeout);
  std::lock_guard<std::mutex> guard(mtx_);
  return values_.at(key);
}

void InMemoryStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> guard(mtx_);
  auto ready = [&] {
    for (auto& k : keys)
      if (values_.count(k) == 0)
        return false;
    return true;
  };
  if (!cv_.wait_for(guard, timeout, ready)) {
    std::vector<std::string> absent;
    for (auto& k : keys)
      if (values_.count(k) == 0)
        absent.push_back(k);
    missing(absent, timeout);
  }
}

int64_t InMemoryStore::add(const std::string& key, int64_t delta) {
  int64_t result = 0;
  {
    std::lock_guard<std::mutex> guard(mtx_);
    auto& v = values_[key];
    int64_t current = 0;
    if (v.size() == sizeof(int64_t))
      std::memcpy(&current, v.data(), sizeof(int64_t));
    result = current + delta;
    v.resize(sizeof(int64_t));
    std::memcpy(v.data(), &result, sizeof(int64_t));
  }
  cv_.notify_all();
  return result;
}

PrefixStore::PrefixStore(std::string prefix, std::shared_ptr<Store> inner)
  : prefix_(std::move(prefix)), inner_(std::move(inner)) {
  if (!inner_)
    throw Error(Errc::invalid_argument, "PrefixStore needs an inner store");
}

std::string PrefixStore::full(const std::string& key) const {
  return prefix_ + "/" + key;
}

void PrefixStore::set(const std::string& key, const std::vector<char>& value) {
  inner_->set(full(key), value);
}

std::vector<char> PrefixStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  return inner_->get(full(key), timeout);
}

void PrefixStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  std::vector<std::string> prefixed;
  for (auto& k : keys)
    prefixed.push_back(full(k));
  inner_->wait(prefixed, timeout);
}

int64_t PrefixStore::add(const std::string& key, int64_t delta) {
  return inner_->add(full(key), delta);
}

} // namespace caftrain
