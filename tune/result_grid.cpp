#include "tune/result_grid.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "core/metrics_json.hpp"

namespace caftrain::tune {

namespace {

[[noreturn]] void refuse(const std::string& what) {
  throw Error(Errc::invalid_argument, "ResultGrid: " + what);
}

/// The values `metric` took over the trial's reports, in order (the last result's when
/// its history is empty).
std::vector<double> series(const TrialResult& trial, const std::string& metric) {
  std::vector<double> values;
  for (auto& rec : trial.metrics_history) {
    auto i = rec.metrics.find(metric);
    if (i != rec.metrics.end())
      values.push_back(i->second);
  }
  if (values.empty()) {
    auto i = trial.metrics.find(metric);
    if (i != trial.metrics.end())
      values.push_back(i->second);
  }
  return values;
}

double mean_of_last(const std::vector<double>& values, std::size_t n) {
  auto first = values.size() > n ? values.end() - static_cast<std::ptrdiff_t>(n) : values.begin();
  double sum = 0;
  for (auto i = first; i != values.end(); ++i)
    sum += *i;
  return sum / static_cast<double>(values.end() - first);
}

/// A CSV cell: quoted when it holds a comma, quote or newline.
std::string cell(const std::string& text) {
  if (text.find_first_of(",\"\n") == std::string::npos)
    return text;
  std::string out = "\"";
  for (char c : text)
    out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::string number(double x) {
  if (std::isnan(x))
    return "NaN";
  if (std::isinf(x))
    return x > 0 ? "Infinity" : "-Infinity";
  std::ostringstream out;
  out.precision(10);
  out << x;
  return out.str();
}

std::string plain(const ConfigValue& value) {
  if (auto s = std::get_if<std::string>(&value))
    return *s;
  return to_string(value);
}

} // namespace

ResultGrid::ResultGrid(std::string experiment_path, std::vector<TrialResult> results,
                       std::string metric, std::string mode, std::optional<RunError> error)
  : experiment_path_(std::move(experiment_path)),
    results_(std::move(results)),
    metric_(std::move(metric)),
    mode_(std::move(mode)),
    error_(std::move(error)) {
  // nop
}

std::optional<double> scoped_metric(const TrialResult& trial, const std::string& metric,
                                    const std::string& mode, const std::string& scope) {
  auto values = series(trial, metric);
  if (values.empty())
    return std::nullopt;
  if (scope == "last")
    return values.back();
  if (scope == "avg")
    return mean_of_last(values, values.size());
  if (scope == "last-5-avg")
    return mean_of_last(values, 5);
  if (scope == "last-10-avg")
    return mean_of_last(values, 10);
  if (scope == "all") {
    // NaN never wins: the best finite-or-infinite value, NaN only when all are.
    std::optional<double> best;
    for (double v : values)
      if (!std::isnan(v) && (!best || (mode == "max" ? v > *best : v < *best)))
        best = v;
    return best ? *best : std::numeric_limits<double>::quiet_NaN();
  }
  refuse("unknown scope '" + scope + "'; use \"last\", \"avg\", \"last-5-avg\", \"last-10-avg\" or \"all\"");
}

const TrialResult& ResultGrid::get_best_result(std::string metric, std::string mode,
                                               const std::string& scope,
                                               bool filter_nan_and_inf) const {
  if (metric.empty())
    metric = metric_;
  if (mode.empty())
    mode = mode_;
  if (metric.empty() || mode.empty())
    refuse("get_best_result needs a metric and a mode; pass them, or set TuneConfig.metric "
           "and TuneConfig.mode");
  if (mode != "min" && mode != "max")
    refuse("mode '" + mode + "' is unknown; use \"min\" or \"max\"");
  const TrialResult* best = nullptr;
  double best_value = 0;
  std::set<std::string> reported;
  for (auto& trial : results_) {
    for (auto& [k, v] : trial.metrics)
      reported.insert(k);
    auto value = scoped_metric(trial, metric, mode, scope);
    if (!value)
      continue;
    if (std::isnan(*value) || (filter_nan_and_inf && std::isinf(*value)))
      continue;
    if (!best || (mode == "max" ? *value > best_value : *value < best_value)) {
      best = &trial;
      best_value = *value;
    }
  }
  if (best)
    return *best;
  std::string names;
  for (auto& k : reported)
    names += (names.empty() ? "" : ", ") + k;
  bool seen = false;
  for (auto& trial : results_)
    seen = seen || !series(trial, metric).empty();
  if (seen)
    refuse("every trial's '" + metric + "' is NaN or infinite; there is no best trial");
  refuse("no trial reported metric '" + metric + "'" +
         (results_.empty() ? std::string(" (the experiment has no trials)")
                           : "; reported: " + (names.empty() ? std::string("nothing") : names)));
}

std::vector<RunError> ResultGrid::errors() const {
  std::vector<RunError> out;
  for (auto& trial : results_)
    if (trial.status == "ERROR" && trial.error)
      out.push_back(*trial.error);
  return out;
}

std::size_t ResultGrid::num_errors() const {
  return static_cast<std::size_t>(std::count_if(
    results_.begin(), results_.end(), [](const TrialResult& t) { return t.status == "ERROR"; }));
}

std::size_t ResultGrid::num_terminated() const {
  return static_cast<std::size_t>(std::count_if(results_.begin(), results_.end(),
                                                [](const TrialResult& t) {
                                                  return t.status == "TERMINATED";
                                                }));
}

const TrialResult& ResultGrid::operator[](std::size_t i) const {
  if (i >= results_.size())
    refuse("trial index " + std::to_string(i) + " is out of range (the grid holds " +
           std::to_string(results_.size()) + " trials)");
  return results_[i];
}

std::string ResultGrid::to_csv() const {
  std::set<std::string> config_keys;
  std::set<std::string> metric_keys;
  for (auto& trial : results_) {
    for (auto& [k, v] : trial.config.values())
      config_keys.insert(k);
    for (auto& [k, v] : trial.metrics)
      metric_keys.insert(k);
    for (auto& rec : trial.metrics_history)
      for (auto& [k, v] : rec.metrics)
        metric_keys.insert(k);
  }
  std::ostringstream out;
  out << "trial_id,status,error";
  for (auto& k : config_keys)
    out << ',' << cell("config/" + k);
  for (auto& k : metric_keys)
    out << ',' << cell(k) << ',' << cell("min/" + k) << ',' << cell("max/" + k);
  out << '\n';
  for (auto& trial : results_) {
    out << cell(trial.trial_id) << ',' << trial.status << ','
        << cell(trial.error ? trial.error->message : "");
    for (auto& k : config_keys) {
      out << ',';
      auto i = trial.config.values().find(k);
      if (i != trial.config.values().end())
        out << cell(plain(i->second));
    }
    for (auto& k : metric_keys) {
      auto values = series(trial, k);
      auto last = trial.metrics.find(k);
      out << ',';
      if (last != trial.metrics.end())
        out << number(last->second);
      else if (!values.empty())
        out << number(values.back());
      // NaN has no place in an order: min and max are over the other values.
      values.erase(std::remove_if(values.begin(), values.end(), [](double v) { return std::isnan(v); }),
                   values.end());
      out << ',';
      if (!values.empty())
        out << number(*std::min_element(values.begin(), values.end()));
      out << ',';
      if (!values.empty())
        out << number(*std::max_element(values.begin(), values.end()));
    }
    out << '\n';
  }
  return out.str();
}

} // namespace caftrain::tune
