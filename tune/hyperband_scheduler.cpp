#include "tune/hyperband_scheduler.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace caftrain::tune {

namespace {

double time_of(const std::optional<Metrics>& result, const std::string& time_attr) {
  if (!result)
    return 0;
  auto i = result->find(time_attr);
  return i == result->end() ? 0 : i->second;
}

} // namespace

// -- Bracket (Ray's hyperband._Bracket) ---------------------------------------------

bool HyperBandScheduler::Bracket::filled() const {
  return static_cast<int64_t>(live.size()) == n;
}

bool HyperBandScheduler::Bracket::cur_iter_done(const std::string& time_attr) const {
  return std::all_of(live.begin(), live.end(),
                     [&](auto& t) { return time_of(results.at(t), time_attr) >= cumul_r; });
}

bool HyperBandScheduler::Bracket::finished(bool stop_last_trials,
                                           const std::string& time_attr) const {
  return stop_last_trials && halves == 0 && cur_iter_done(time_attr);
}

bool HyperBandScheduler::Bracket::continue_trial(const TrialId& trial, bool stop_last_trials,
                                                 const std::string& time_attr) const {
  if (!stop_last_trials && halves == 0)
    return true;
  return time_of(results.at(trial), time_attr) < cumul_r;
}

double HyperBandScheduler::Bracket::completion_percentage(bool stop_last_trials,
                                                          const std::string& time_attr) const {
  if (finished(stop_last_trials, time_attr))
    return 1.0;
  return std::min(completed_progress / total_work, 1.0);
}

void HyperBandScheduler::Bracket::cleanup(const TrialId& trial) {
  live.erase(std::remove(live.begin(), live.end(), trial), live.end());
  results.erase(trial);
}

// -- HyperBandScheduler -------------------------------------------------------------

HyperBandScheduler::HyperBandScheduler(HyperBandOptions options)
  : TrialScheduler("HyperBandScheduler", options.metric, options.mode),
    options_(std::move(options)) {
  if (!(options_.max_t > 0))
    throw Error(Errc::invalid_config, "HyperBandScheduler: max_t must be > 0");
  if (!(options_.reduction_factor > 1))
    throw Error(Errc::invalid_config, "HyperBandScheduler: reduction_factor must be > 1");
  s_max_1_ = static_cast<int64_t>(
               std::nearbyint(std::log(options_.max_t) / std::log(options_.reduction_factor))) +
             1;
  bands_.emplace_back();
}

std::pair<int64_t, int64_t> HyperBandScheduler::bracket_size(int64_t s) const {
  double eta = options_.reduction_factor;
  auto sd = static_cast<double>(s);
  auto n0 = static_cast<int64_t>(
    std::ceil(static_cast<double>(s_max_1_) / (sd + 1) * std::pow(eta, sd)));
  auto r0 = static_cast<int64_t>(options_.max_t * std::pow(eta, -sd));
  return {n0, r0};
}

std::pair<std::size_t, int64_t> HyperBandScheduler::bracket_of(const TrialId& trial) const {
  auto i = trial_info_.find(trial);
  if (i == trial_info_.end())
    throw Error(Errc::invalid_argument, "HyperBandScheduler: unknown trial '" + trial + "'");
  auto& band = bands_[i->second.second];
  auto pos = std::find(band.begin(), band.end(), std::optional<std::size_t>{i->second.first});
  return {i->second.second, static_cast<int64_t>(pos - band.begin())};
}

double HyperBandScheduler::milestone_of(const TrialId& trial) const {
  auto i = trial_info_.find(trial);
  if (i == trial_info_.end())
    throw Error(Errc::invalid_argument, "HyperBandScheduler: unknown trial '" + trial + "'");
  return brackets_[i->second.first].cumul_r;
}

HyperBandScheduler::Bracket& HyperBandScheduler::bracket(const TrialId& trial) {
  auto i = trial_info_.find(trial);
  if (i == trial_info_.end())
    throw Error(Errc::invalid_argument, "HyperBandScheduler: unknown trial '" + trial +
                                          "'; call on_trial_add first");
  return brackets_[i->second.first];
}

void HyperBandScheduler::on_trial_add(const TrialId& trial, Config&) {
  require_metric();
  if (!current_ || brackets_[*current_].filled()) {
    while (true) {
      if (static_cast<int64_t>(bands_.back().size()) == s_max_1_)
        bands_.emplace_back();
      auto s = static_cast<int64_t>(bands_.back().size());
      auto [n0, r0] = bracket_size(s);
      if (r0 == 0) { // "Bracket too small - Retrying..."
        bands_.back().push_back(std::nullopt);
        current_ = std::nullopt;
        continue;
      }
      // Ray's _calculate_total_work: the work of every round of the bracket.
      double work = 0;
      double n = static_cast<double>(n0);
      double r = static_cast<double>(r0);
      double cumulative_r = r;
      for (int64_t i = 0; i <= s; ++i) {
        work += std::trunc(n) * std::trunc(r);
        n = std::ceil(n / options_.reduction_factor);
        r = std::trunc(std::min(r * options_.reduction_factor, options_.max_t - cumulative_r));
      }
      brackets_.push_back(Bracket{{}, {}, n0, static_cast<double>(r0), static_cast<double>(r0),
                                  s, work});
      current_ = brackets_.size() - 1;
      bands_.back().push_back(current_);
      break;
    }
  }
  auto& b = brackets_[*current_];
  b.live.push_back(trial);
  b.results[trial] = std::nullopt;
  trial_info_[trial] = {*current_, bands_.size() - 1};
}

TrialScheduler::Decision HyperBandScheduler::on_trial_result(const TrialId& trial,
                                                             const Metrics& result,
                                                             const ResultContext&) {
  auto& b = bracket(trial);
  if (b.results.count(trial) == 0)
    throw Error(Errc::bad_state, "HyperBandScheduler: trial '" + trial +
                                   "' reported after it was stopped; end it at once on STOP");
  paused_.erase(trial); // it reports, so it runs
  // Ray's update_trial_stats.
  double observed = attr(result, options_.time_attr, trial);
  attr(result, metric_, trial);
  b.completed_progress += observed - time_of(b.results[trial], options_.time_attr);
  b.results[trial] = result;
  if (b.continue_trial(trial, options_.stop_last_trials, options_.time_attr))
    return Decision::CONTINUE;
  auto action = process_bracket(b, &trial);
  if (action == Decision::PAUSE)
    paused_.insert(trial);
  return action;
}

void HyperBandScheduler::stop_paused(const TrialId& trial, Bracket& b) {
  // Ray's stop_trial removes the trial from the scheduler at once; so do we, and the
  // runner's later on_trial_remove finds nothing to do.
  paused_.erase(trial);
  b.cleanup(trial);
  command({TrialCommand::Kind::stop, trial, {}, {}, {}});
}

TrialScheduler::Decision HyperBandScheduler::process_bracket(Bracket& b, const TrialId* reporter) {
  auto action = Decision::PAUSE;
  auto& t_attr = options_.time_attr;
  if (!b.cur_iter_done(t_attr))
    return action;
  auto status_paused = [&](const TrialId& t) {
    if (reporter && t == *reporter)
      return false;
    if (paused_.count(t) == 0)
      throw Error(Errc::bad_state,
                  "HyperBandScheduler: trial '" + t + "' reached its milestone but was not "
                  "paused; the runner must act on every PAUSE");
    return true;
  };
  if (b.finished(options_.stop_last_trials, t_attr)) {
    for (auto& t : std::vector<TrialId>{b.live})
      if (status_paused(t))
        stop_paused(t, b);
    return Decision::STOP;
  }
  // Ray's successive_halving.
  std::vector<TrialId> good = b.live;
  std::vector<TrialId> bad;
  if (!(b.halves == 0 && !options_.stop_last_trials)) {
    b.halves -= 1;
    b.n = static_cast<int64_t>(std::ceil(static_cast<double>(b.n) / options_.reduction_factor));
    b.r *= options_.reduction_factor;
    b.r = std::trunc(std::min(b.r, options_.max_t - b.cumul_r));
    b.cumul_r = b.r;
    std::vector<TrialId> sorted = b.live;
    double op = metric_op();
    std::stable_sort(sorted.begin(), sorted.end(), [&](auto& x, auto& y) {
      return op * b.results.at(x)->at(metric_) < op * b.results.at(y)->at(metric_);
    });
    auto keep = std::min<std::size_t>(static_cast<std::size_t>(b.n), sorted.size());
    good.assign(sorted.end() - static_cast<std::ptrdiff_t>(keep), sorted.end());
    bad.assign(sorted.begin(), sorted.end() - static_cast<std::ptrdiff_t>(keep));
  }
  for (auto& t : bad) {
    if (status_paused(t)) {
      stop_paused(t, b);
    } else {
      b.cleanup(t);
      action = Decision::STOP;
    }
  }
  for (auto& t : good) {
    if (!b.continue_trial(t, options_.stop_last_trials, t_attr))
      continue;
    if (status_paused(t)) {
      paused_.erase(t);
      command({TrialCommand::Kind::resume, t, {}, {}, {}});
    } else {
      action = Decision::CONTINUE;
    }
  }
  return action;
}

void HyperBandScheduler::on_trial_remove(const TrialId& trial) {
  auto i = trial_info_.find(trial);
  if (i == trial_info_.end())
    return;
  auto& b = brackets_[i->second.first];
  paused_.erase(trial);
  if (b.results.count(trial) == 0)
    return; // already removed (stopped by this scheduler)
  b.cleanup(trial);
  if (!b.finished(options_.stop_last_trials, options_.time_attr))
    process_bracket(b, nullptr);
}

void HyperBandScheduler::on_trial_complete(const TrialId& trial, const Metrics&) {
  on_trial_remove(trial);
}

void HyperBandScheduler::on_trial_error(const TrialId& trial) {
  on_trial_remove(trial);
}

std::optional<TrialId>
HyperBandScheduler::choose_trial_to_run(const std::vector<TrialInfo>& startable) {
  auto pending = [&](const TrialId& t) {
    return std::any_of(startable.begin(), startable.end(), [&](auto& info) {
      return info.id == t && info.status == TrialStatus::PENDING;
    });
  };
  for (auto& band : bands_) {
    std::vector<std::size_t> order;
    for (auto& b : band)
      if (b)
        order.push_back(*b);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
      return brackets_[x].completion_percentage(options_.stop_last_trials, options_.time_attr) <
             brackets_[y].completion_percentage(options_.stop_last_trials, options_.time_attr);
    });
    for (auto idx : order)
      for (auto& t : brackets_[idx].live)
        if (pending(t))
          return t;
  }
  return std::nullopt;
}

} // namespace caftrain::tune
