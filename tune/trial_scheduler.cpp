#include "tune/trial_scheduler.hpp"

#include "core/error.hpp"
#include "tune/mode.hpp"

namespace caftrain::tune {

TrialScheduler::TrialScheduler(std::string name, std::string metric, std::string mode)
  : name_(std::move(name)), metric_(std::move(metric)), mode_(std::move(mode)) {
  if (!mode_.empty())
    tune::metric_op(mode_, name_);
}

TrialScheduler::~TrialScheduler() {
  // nop
}

bool TrialScheduler::set_search_properties(const std::string& metric, const std::string& mode) {
  if ((!metric_.empty() && !metric.empty()) || (!mode_.empty() && !mode.empty()))
    return false;
  if (!mode.empty())
    tune::metric_op(mode, name_);
  if (!metric.empty())
    metric_ = metric;
  if (!mode.empty())
    mode_ = mode;
  return true;
}

void TrialScheduler::on_trial_add(const TrialId&, Config&) {
  // nop
}

void TrialScheduler::on_trial_complete(const TrialId&, const Metrics&) {
  // nop
}

void TrialScheduler::on_trial_error(const TrialId&) {
  // nop
}

void TrialScheduler::on_trial_remove(const TrialId&) {
  // nop
}

std::optional<TrialId>
TrialScheduler::choose_trial_to_run(const std::vector<TrialInfo>& startable) {
  for (auto& t : startable)
    if (t.status == TrialStatus::PENDING)
      return t.id;
  for (auto& t : startable)
    if (t.status == TrialStatus::PAUSED)
      return t.id;
  return std::nullopt;
}

std::vector<TrialCommand> TrialScheduler::take_commands() {
  return std::exchange(commands_, {});
}

void TrialScheduler::command(TrialCommand cmd) {
  commands_.push_back(std::move(cmd));
}

void TrialScheduler::require_metric() const {
  tune::require_metric(metric_, mode_, name_);
}

double TrialScheduler::metric_op() const {
  return tune::metric_op(mode_, name_);
}

double TrialScheduler::attr(const Metrics& result, const std::string& key,
                            const TrialId& trial) const {
  auto i = result.find(key);
  if (i == result.end())
    throw Error(Errc::invalid_argument,
                name_ + ": the result of trial '" + trial + "' has no '" + key +
                  "'; report it (the runner adds training_iteration and time_total_s)");
  return i->second;
}

} // namespace caftrain::tune
