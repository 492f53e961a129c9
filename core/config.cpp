#include "core/config.hpp"

#include <cmath>
#include <sstream>

#include "core/error.hpp"

namespace caftrain {

namespace {

const ConfigValue& lookup(const Config::map_type& values, const std::string& key) {
  auto i = values.find(key);
  if (i == values.end()) {
    std::string known;
    for (auto& [k, v] : values)
      known += (known.empty() ? "" : ", ") + k;
    throw Error(Errc::invalid_argument, "config has no key '" + key + "' (keys: " +
                                          (known.empty() ? "none" : known) +
                                          "); add it to the config passed to the trainer");
  }
  return i->second;
}

[[noreturn]] void wrong_type(const std::string& key, const ConfigValue& value, const char* want) {
  throw Error(Errc::invalid_argument, "config key '" + key + "' holds " + to_string(value) +
                                        ", which is not a " + want);
}

} // namespace

template <>
bool Config::get<bool>(const std::string& key) const {
  auto& v = lookup(values_, key);
  if (auto x = std::get_if<bool>(&v))
    return *x;
  wrong_type(key, v, "bool");
}

template <>
int64_t Config::get<int64_t>(const std::string& key) const {
  auto& v = lookup(values_, key);
  if (auto x = std::get_if<int64_t>(&v))
    return *x;
  if (auto x = std::get_if<double>(&v); x && std::nearbyint(*x) == *x)
    return static_cast<int64_t>(*x);
  wrong_type(key, v, "integer");
}

template <>
int Config::get<int>(const std::string& key) const {
  return static_cast<int>(get<int64_t>(key));
}

template <>
double Config::get<double>(const std::string& key) const {
  auto& v = lookup(values_, key);
  if (auto x = std::get_if<double>(&v))
    return *x;
  if (auto x = std::get_if<int64_t>(&v))
    return static_cast<double>(*x);
  wrong_type(key, v, "number");
}

template <>
std::string Config::get<std::string>(const std::string& key) const {
  auto& v = lookup(values_, key);
  if (auto x = std::get_if<std::string>(&v))
    return *x;
  wrong_type(key, v, "string");
}

std::string to_string(const ConfigValue& value) {
  std::ostringstream out;
  std::visit(
    [&](const auto& x) {
      using T = std::decay_t<decltype(x)>;
      if constexpr (std::is_same_v<T, bool>)
        out << (x ? "true" : "false");
      else if constexpr (std::is_same_v<T, std::string>)
        out << '"' << x << '"';
      else
        out << x;
    },
    value);
  return out.str();
}

std::string Config::to_string() const {
  std::string result = "{";
  for (auto& [key, value] : values_) {
    if (result.size() > 1)
      result += ", ";
    result += '"' + key + "\": " + caftrain::to_string(value);
  }
  return result + "}";
}

} // namespace caftrain
