#include "tune/async_hyperband_scheduler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"

namespace caftrain::tune {

namespace {

// np.nanpercentile(values, p) with numpy's default linear interpolation.
double nanpercentile(const std::map<TrialId, double>& recorded, double p) {
  std::vector<double> xs;
  for (auto& [id, x] : recorded)
    if (!std::isnan(x))
      xs.push_back(x);
  if (xs.empty())
    return std::numeric_limits<double>::quiet_NaN();
  std::sort(xs.begin(), xs.end());
  double rank = p / 100.0 * static_cast<double>(xs.size() - 1);
  auto lo = static_cast<std::size_t>(std::floor(rank));
  auto hi = std::min(lo + 1, xs.size() - 1);
  return xs[lo] + (xs[hi] - xs[lo]) * (rank - static_cast<double>(lo));
}

[[noreturn]] void bad(const std::string& what) {
  throw Error(Errc::invalid_config, "AsyncHyperBandScheduler: " + what);
}

} // namespace

AsyncHyperBandScheduler::AsyncHyperBandScheduler(AsyncHyperBandOptions options)
  : TrialScheduler("AsyncHyperBandScheduler", options.metric, options.mode),
    options_(std::move(options)),
    rng_(options_.seed) {
  if (!(options_.max_t > 0))
    bad("max_t must be > 0");
  if (!(options_.grace_period > 0))
    bad("grace_period must be > 0");
  if (!(options_.max_t >= options_.grace_period))
    bad("grace_period must be <= max_t");
  if (!(options_.reduction_factor > 1))
    bad("reduction_factor must be > 1");
  if (options_.brackets < 1)
    bad("brackets must be >= 1");
  double rf = options_.reduction_factor;
  for (int64_t s = 0; s < options_.brackets; ++s) {
    auto max_rungs = static_cast<int64_t>(
      std::log(options_.max_t / options_.grace_period) / std::log(rf) - static_cast<double>(s) + 1);
    Bracket b;
    for (auto k = max_rungs - 1; k >= 0; --k)
      b.rungs.push_back({options_.grace_period * std::pow(rf, static_cast<double>(k + s)), {}});
    brackets_.push_back(std::move(b));
  }
}

std::vector<double> AsyncHyperBandScheduler::milestones(std::size_t b) const {
  std::vector<double> out;
  for (auto& r : brackets_.at(b).rungs)
    out.push_back(r.milestone);
  return out;
}

std::size_t AsyncHyperBandScheduler::bracket_of(const TrialId& trial) const {
  auto i = trial_info_.find(trial);
  if (i == trial_info_.end())
    throw Error(Errc::invalid_argument, "AsyncHyperBandScheduler: unknown trial '" + trial + "'");
  return i->second;
}

void AsyncHyperBandScheduler::on_trial_add(const TrialId& trial, Config&) {
  require_metric();
  // np.random.choice over softmax(number of rungs): more rungs, more trials.
  double top = 0;
  for (auto& b : brackets_)
    top = std::max(top, static_cast<double>(b.rungs.size()));
  std::vector<double> probs;
  double sum = 0;
  for (auto& b : brackets_) {
    probs.push_back(std::exp(static_cast<double>(b.rungs.size()) - top));
    sum += probs.back();
  }
  double u = rng_.uniform01() * sum;
  std::size_t idx = 0;
  for (double acc = probs[0]; idx + 1 < probs.size() && u >= acc; acc += probs[++idx]) {
    // nop
  }
  trial_info_[trial] = idx;
}

TrialScheduler::Decision AsyncHyperBandScheduler::on_bracket_result(Bracket& b,
                                                                    const TrialId& trial,
                                                                    double cur_iter,
                                                                    double score) {
  auto action = Decision::CONTINUE;
  for (auto& rung : b.rungs) {
    bool recorded = rung.recorded.count(trial) > 0;
    // Recorded at this rung already: the decision to go on was made there.
    if (cur_iter >= rung.milestone && recorded && !options_.stop_last_trials)
      break;
    if (cur_iter < rung.milestone || recorded)
      continue;
    double cutoff = nanpercentile(rung.recorded, (1 - 1 / options_.reduction_factor) * 100);
    if (!rung.recorded.empty() && score < cutoff)
      action = Decision::STOP;
    rung.recorded[trial] = score;
    break;
  }
  return action;
}

TrialScheduler::Decision AsyncHyperBandScheduler::on_trial_result(const TrialId& trial,
                                                                  const Metrics& result,
                                                                  const ResultContext&) {
  auto t = result.find(options_.time_attr);
  auto m = result.find(metric_);
  if (t == result.end() || m == result.end())
    return Decision::CONTINUE;
  if (t->second >= options_.max_t && options_.stop_last_trials)
    return Decision::STOP;
  return on_bracket_result(brackets_[bracket_of(trial)], trial, t->second,
                           metric_op() * m->second);
}

void AsyncHyperBandScheduler::on_trial_complete(const TrialId& trial, const Metrics& result) {
  auto t = result.find(options_.time_attr);
  auto m = result.find(metric_);
  auto info = trial_info_.find(trial);
  if (t == result.end() || m == result.end() || info == trial_info_.end())
    return;
  on_bracket_result(brackets_[info->second], trial, t->second, metric_op() * m->second);
  trial_info_.erase(info);
}

void AsyncHyperBandScheduler::on_trial_remove(const TrialId& trial) {
  trial_info_.erase(trial);
}

} // namespace caftrain::tune
