// Config (what train_func receives) and Metrics (what a report carries).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <variant>

namespace caftrain {

/// Named scalar results of a step or an epoch, e.g. {"loss", 0.31}, {"val_accuracy", 0.9}.
using Metrics = std::map<std::string, double>;

/// One value of a `Config`.
using ConfigValue = std::variant<bool, int64_t, double, std::string>;

/// The configuration handed to every worker's `train_func` (Ray's `train_loop_config`),
/// and the hyperparameters a Tune trial samples. Values are typed; `get` converts between
/// integers and doubles where no precision is lost and names the key on any mismatch.
class Config {
 public:
  using map_type = std::map<std::string, ConfigValue>;

  // -- constructors -----------------------------------------------------------------

  Config() = default;

  Config(std::initializer_list<map_type::value_type> values) : values_(values) {
    // nop
  }

  explicit Config(map_type values) : values_(std::move(values)) {
    // nop
  }

  // -- properties -------------------------------------------------------------------

  /// The value at `key` as `T` (bool, int64_t, int, double or std::string); throws
  /// `Error(invalid_argument)` naming the key when it is missing or of another type.
  template <class T>
  T get(const std::string& key) const;

  /// The value at `key` as `T`, or `fallback` when the key is absent.
  template <class T>
  T get(const std::string& key, T fallback) const {
    return contains(key) ? get<T>(key) : fallback;
  }

  bool contains(const std::string& key) const {
    return values_.count(key) > 0;
  }

  void set(const std::string& key, ConfigValue value) {
    values_[key] = std::move(value);
  }

  const map_type& values() const noexcept {
    return values_;
  }

  bool empty() const noexcept {
    return values_.empty();
  }

  /// A one-line rendering, e.g. `{"lr": 0.001, "batch_size": 64}`.
  std::string to_string() const;

  friend bool operator==(const Config& x, const Config& y) {
    return x.values_ == y.values_;
  }

 private:
  map_type values_;
};

template <>
bool Config::get<bool>(const std::string& key) const;
template <>
int64_t Config::get<int64_t>(const std::string& key) const;
template <>
int Config::get<int>(const std::string& key) const;
template <>
double Config::get<double>(const std::string& key) const;
template <>
std::string Config::get<std::string>(const std::string& key) const;

/// Renders one value the way `Config::to_string` does.
std::string to_string(const ConfigValue& value);

} // namespace caftrain
