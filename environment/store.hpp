// Store: the key-value rendezvous through which the ranks of a group find each other.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace caftrain {

/// A key-value store shared by the ranks of a run (gloo's and c10d's rendezvous store).
/// Each run's store server actor serves one (`ActorStore` is its client); `InMemoryStore`
/// serves threads of one process. Keys are written once per attempt: a new attempt uses a
/// new `PrefixStore`, so stale values of a failed attempt are never read.
class Store {
 public:
  virtual ~Store();

  /// Sets `key` to `value`, waking every `get`/`wait` on it.
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;

  /// The value of `key`, waiting up to `timeout` for it to be set. Throws
  /// `Error(collective_timeout)` naming the key when it is not set in time.
  virtual std::vector<char> get(const std::string& key, std::chrono::milliseconds timeout) = 0;

  /// Waits until every key is set; throws `Error(collective_timeout)` naming the missing
  /// ones otherwise.
  virtual void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) = 0;

  /// Adds `delta` to the integer at `key` (0 when unset) and returns the new value.
  virtual int64_t add(const std::string& key, int64_t delta) = 0;
};

/// A Store for threads of one process.
class InMemoryStore : public Store {
 public:
  void set(const std::string& key, const std::vector<char>& value) override;
  std::vector<char> get(const std::string& key, std::chrono::milliseconds timeout) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override;

 private:
  std::mutex mtx_;
  std::condition_variable cv_;
  std::map<std::string, std::vector<char>> values_;
};

/// Prepends `prefix + "/"` to every key of `inner` (one key space per attempt).
class PrefixStore : public Store {
 public:
  PrefixStore(std::string prefix, std::shared_ptr<Store> inner);

  void set(const std::string& key, const std::vector<char>& value) override;
  std::vector<char> get(const std::string& key, std::chrono::milliseconds timeout) override;
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;
  int64_t add(const std::string& key, int64_t delta) override;

 private:
  std::string full(const std::string& key) const;

  std::string prefix_;
  std::shared_ptr<Store> inner_;
};

} // namespace caftrain
