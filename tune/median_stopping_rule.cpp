#include "tune/median_stopping_rule.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"

namespace caftrain::tune {

namespace {

constexpr double nan = std::numeric_limits<double>::quiet_NaN();

// np.median: NaN when any value is NaN.
double median(std::vector<double> xs) {
  if (xs.empty() || std::any_of(xs.begin(), xs.end(), [](double x) { return std::isnan(x); }))
    return nan;
  std::sort(xs.begin(), xs.end());
  auto n = xs.size();
  return n % 2 ? xs[n / 2] : 0.5 * (xs[n / 2 - 1] + xs[n / 2]);
}

} // namespace

MedianStoppingRule::MedianStoppingRule(MedianStoppingRuleOptions options)
  : TrialScheduler("MedianStoppingRule", options.metric, options.mode),
    options_(std::move(options)) {
  if (options_.min_samples_required < 1)
    throw Error(Errc::invalid_config, "MedianStoppingRule: min_samples_required must be >= 1");
}

void MedianStoppingRule::on_trial_add(const TrialId&, Config&) {
  require_metric();
}

double MedianStoppingRule::running_mean(const TrialId& trial, double time) const {
  // np.mean of the metric over results in [grace_period, time]; NaN when there are none.
  double sum = 0;
  int64_t n = 0;
  for (auto& r : results_.at(trial)) {
    double t = r.at(options_.time_attr);
    if (options_.grace_period <= t && t <= time) {
      sum += r.at(metric_);
      ++n;
    }
  }
  return n == 0 ? nan : sum / static_cast<double>(n);
}

double MedianStoppingRule::best_result(const TrialId& trial) const {
  auto& rs = results_.at(trial);
  double best = rs.front().at(metric_);
  for (auto& r : rs) {
    double x = r.at(metric_);
    // Python's max()/min(): the first element wins unless a later one is strictly better.
    if (mode_ == "max" ? x > best : x < best)
      best = x;
  }
  return best;
}

TrialScheduler::Decision MedianStoppingRule::on_trial_result(const TrialId& trial,
                                                             const Metrics& result,
                                                             const ResultContext& context) {
  if (result.count(options_.time_attr) == 0 || result.count(metric_) == 0)
    return Decision::CONTINUE;
  if (stopped_.count(trial) > 0)
    return Decision::CONTINUE; // paused by a soft stop and resumed: FIFO from here on
  double time = result.at(options_.time_attr);
  results_[trial].push_back(result);
  if (time < options_.grace_period)
    return Decision::CONTINUE;
  std::vector<TrialId> others;
  for (auto& [t, rs] : results_)
    if (t != trial && rs.back().at(options_.time_attr) >= time)
      others.push_back(t);
  if (static_cast<int64_t>(others.size()) < options_.min_samples_required) {
    auto last = last_pause_.find(trial);
    double since = time - (last == last_pause_.end() ? -std::numeric_limits<double>::infinity()
                                                     : last->second);
    if (since > options_.min_time_slice && context.waiting_trials > 0) {
      last_pause_[trial] = time;
      return Decision::PAUSE;
    }
    return Decision::CONTINUE;
  }
  std::vector<double> means;
  for (auto& t : others)
    means.push_back(running_mean(t, time));
  double median_result = median(means);
  double best = best_result(trial);
  // Ray: compare_op(median, best) != best, compare_op being Python's max or min, which
  // returns its first argument unless the second is strictly better; a NaN median stops.
  double chosen = (mode_ == "max" ? best > median_result : best < median_result) ? best
                                                                                  : median_result;
  if (chosen != best) {
    stopped_.insert(trial);
    return options_.hard_stop ? Decision::STOP : Decision::PAUSE;
  }
  return Decision::CONTINUE;
}

void MedianStoppingRule::on_trial_complete(const TrialId& trial, const Metrics& result) {
  if (result.count(options_.time_attr) > 0 && result.count(metric_) > 0)
    results_[trial].push_back(result);
}

} // namespace caftrain::tune
