// JSON for numbers and Metrics that keeps NaN and the infinities, which JSON cannot spell.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include "core/config.hpp"

namespace caftrain {

/// `value` as JSON: a number when finite, else the string "NaN", "Infinity" or
/// "-Infinity" (the spellings of Python's json module and JavaScript), so that a
/// non-finite metric survives a round trip instead of turning into `null`.
nlohmann::json number_to_json(double value);

/// Reads what `number_to_json` writes: a number, one of the three strings, or `null`
/// (how earlier versions wrote any non-finite value; read as NaN). Throws
/// `Error(invalid_argument)` naming the value for anything else.
double number_from_json(const nlohmann::json& value);

/// Every metric through `number_to_json`: a JSON object.
nlohmann::json metrics_to_json(const Metrics& metrics);

/// Reads what `metrics_to_json` writes. Throws `Error(invalid_argument)` naming the key
/// when `value` is not an object or one of its values is not a number.
Metrics metrics_from_json(const nlohmann::json& value);

} // namespace caftrain
