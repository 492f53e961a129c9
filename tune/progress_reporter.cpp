#include "tune/progress_reporter.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <sstream>
#include <vector>

#include "tune/tuner_actor.hpp"

namespace caftrain::tune {

namespace {

std::string number(double x) {
  std::ostringstream out;
  out.precision(5);
  out << x;
  return out.str();
}

std::string plain(const ConfigValue& value) {
  if (auto s = std::get_if<std::string>(&value))
    return *s;
  if (auto d = std::get_if<double>(&value))
    return number(*d);
  return to_string(value);
}

std::string iterations(const TrialSnapshot& t) {
  auto i = t.last.find("training_iteration");
  return i == t.last.end() ? std::string("") : number(i->second);
}

std::string metric_of(const TrialSnapshot& t, const std::string& metric) {
  auto i = t.last.find(metric);
  return i == t.last.end() ? std::string("") : number(i->second);
}

} // namespace

std::string render_trial_table(const ExperimentStatus& status, const std::string& metric,
                               const std::string& mode, int max_rows) {
  std::map<std::string, int> counts;
  std::set<std::string> keys;
  const TrialSnapshot* best = nullptr;
  for (auto& t : status.trials) {
    ++counts[t.status];
    for (auto& [k, v] : t.config.values())
      keys.insert(k);
    auto i = t.last.find(metric);
    if (metric.empty() || i == t.last.end() || std::isnan(i->second))
      continue;
    if (!best || (mode == "max" ? i->second > best->last.at(metric) : i->second < best->last.at(metric)))
      best = &t;
  }
  std::ostringstream out;
  out << "== " << status.name << ": " << status.trials.size() << " trials (";
  bool first = true;
  for (auto& [s, n] : counts) {
    out << (first ? "" : ", ") << n << ' ' << s;
    first = false;
  }
  out << ")";
  if (best)
    out << "; best " << best->id << " " << metric << "=" << number(best->last.at(metric));
  out << '\n';
  // Keys every trial has the same value for (the param space's constants) say nothing.
  if (status.trials.size() > 1) {
    for (auto k = keys.begin(); k != keys.end();) {
      bool same = true;
      auto& first = status.trials.front().config.values();
      auto f = first.find(*k);
      for (auto& t : status.trials) {
        auto i = t.config.values().find(*k);
        same = same && f != first.end() && i != t.config.values().end() && i->second == f->second;
      }
      k = same ? keys.erase(k) : std::next(k);
    }
  }
  if (!status.waiting_reason.empty())
    out << "   waiting: " << status.waiting_reason << '\n';
  // Columns: id, status, config keys, iter, metric.
  std::vector<std::string> header{"trial", "status"};
  for (auto& k : keys)
    header.push_back(k);
  header.push_back("iter");
  if (!metric.empty())
    header.push_back(metric);
  std::vector<const TrialSnapshot*> rows;
  for (auto& t : status.trials)
    if (t.status == "RUNNING")
      rows.push_back(&t);
  for (auto& t : status.trials)
    if (t.status != "RUNNING")
      rows.push_back(&t);
  auto shown = std::min<std::size_t>(rows.size(), static_cast<std::size_t>(std::max(max_rows, 0)));
  std::vector<std::vector<std::string>> table{header};
  for (std::size_t r = 0; r < shown; ++r) {
    auto& t = *rows[r];
    std::vector<std::string> row{t.id, t.status};
    for (auto& k : keys) {
      auto i = t.config.values().find(k);
      row.push_back(i == t.config.values().end() ? std::string("") : plain(i->second));
    }
    row.push_back(iterations(t));
    if (!metric.empty())
      row.push_back(metric_of(t, metric));
    table.push_back(std::move(row));
  }
  std::vector<std::size_t> width(header.size(), 0);
  for (auto& row : table)
    for (std::size_t c = 0; c < row.size(); ++c)
      width[c] = std::max(width[c], row[c].size());
  for (auto& row : table) {
    out << "  ";
    for (std::size_t c = 0; c < row.size(); ++c)
      out << row[c] << std::string(width[c] - row[c].size() + 2, ' ');
    out << '\n';
  }
  if (shown < rows.size())
    out << "  ... " << rows.size() - shown << " more trials\n";
  return out.str();
}

std::string trial_event_line(const std::string& event, const TrialSnapshot& trial,
                             const std::string& metric) {
  std::ostringstream out;
  out << "Trial " << trial.id << ' ' << event << ' ' << trial.status;
  auto iter = iterations(trial);
  if (!iter.empty())
    out << " iter " << iter;
  if (!metric.empty()) {
    auto value = metric_of(trial, metric);
    if (!value.empty())
      out << ' ' << metric << '=' << value;
  }
  out << ' ' << trial.config.to_string();
  if (!trial.error.empty())
    out << " error: " << trial.error;
  return out.str();
}

} // namespace caftrain::tune
