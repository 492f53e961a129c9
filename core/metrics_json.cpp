#include "core/metrics_json.hpp"

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace caftrain {

using nlohmann::json;

namespace {

constexpr const char* kNaN = "NaN";
constexpr const char* kInfinity = "Infinity";
constexpr const char* kNegativeInfinity = "-Infinity";

} // namespace

json number_to_json(double value) {
  if (std::isnan(value))
    return kNaN;
  if (std::isinf(value))
    return value > 0 ? kInfinity : kNegativeInfinity;
  return value;
}

double number_from_json(const json& value) {
  if (value.is_number())
    return value.get<double>();
  if (value.is_null())
    return std::numeric_limits<double>::quiet_NaN();
  if (value.is_string()) {
    auto& text = value.get_ref<const std::string&>();
    if (text == kNaN)
      return std::numeric_limits<double>::quiet_NaN();
    if (text == kInfinity)
      return std::numeric_limits<double>::infinity();
    if (text == kNegativeInfinity)
      return -std::numeric_limits<double>::infinity();
  }
  throw Error(Errc::invalid_argument, "the JSON value " + value.dump() +
                                        " is not a number; expected a number, \"NaN\", "
                                        "\"Infinity\" or \"-Infinity\"");
}

json metrics_to_json(const Metrics& metrics) {
  json result = json::object();
  for (auto& [name, value] : metrics)
    result[name] = number_to_json(value);
  return result;
}

Metrics metrics_from_json(const json& value) {
  if (!value.is_object())
    throw Error(Errc::invalid_argument,
                "metrics must be a JSON object of numbers, not " + value.dump());
  Metrics result;
  for (auto& [name, item] : value.items()) {
    try {
      result[name] = number_from_json(item);
    } catch (const Error& e) {
      throw Error(Errc::invalid_argument, "metric '" + name + "': " + e.what());
    }
  }
  return result;
}

} // namespace caftrain
