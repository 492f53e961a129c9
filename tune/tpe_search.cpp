#include "tune/tpe_search.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "tune/mode.hpp"

namespace caftrain::tune {

int64_t default_gamma(int64_t n) {
  return std::min<int64_t>(static_cast<int64_t>(std::ceil(0.1 * static_cast<double>(n))), 25);
}

std::vector<double> default_weights(int64_t n) {
  if (n <= 0)
    return {};
  if (n < 25)
    return std::vector<double>(static_cast<std::size_t>(n), 1.0);
  // np.linspace(1 / n, 1.0, num=n - 25), then 25 ones.
  std::vector<double> w;
  auto ramp = n - 25;
  double first = 1.0 / static_cast<double>(n);
  for (int64_t i = 0; i < ramp; ++i)
    w.push_back(ramp == 1 ? first
                          : first + (1.0 - first) * static_cast<double>(i) /
                                      static_cast<double>(ramp - 1));
  w.resize(static_cast<std::size_t>(n), 1.0);
  return w;
}

TPESearch::TPESearch(ParamSpace space, TPESearchOptions options)
  : space_(std::move(space)), options_(std::move(options)), rng_(options_.seed) {
  if (options_.n_startup_trials < 0 || options_.n_ei_candidates < 1)
    throw Error(Errc::invalid_config,
                "TPESearch: n_startup_trials must be >= 0 and n_ei_candidates >= 1 (got " +
                  std::to_string(options_.n_startup_trials) + ", " +
                  std::to_string(options_.n_ei_candidates) + ")");
  if (!options_.gamma || !options_.weights)
    throw Error(Errc::invalid_config, "TPESearch: gamma and weights must be callables; leave "
                                      "them at their defaults");
  if (!options_.mode.empty())
    metric_op(options_.mode, "TPESearch");
  build_dimensions();
}

void TPESearch::build_dimensions() {
  dims_.clear();
  for (auto& [key, domain] : space_.domains())
    if (domain.kind() != Domain::Kind::function)
      dims_.emplace(key, ParzenDimension::from(key, domain));
}

bool TPESearch::set_search_properties(const std::string& metric, const std::string& mode,
                                      const ParamSpace& space) {
  if ((!metric.empty() && !options_.metric.empty() && metric != options_.metric) ||
      (!mode.empty() && !options_.mode.empty() && mode != options_.mode) ||
      (!space.empty() && !space_.empty()))
    return false;
  if (!mode.empty())
    metric_op(mode, "TPESearch");
  if (options_.metric.empty())
    options_.metric = metric;
  if (options_.mode.empty())
    options_.mode = mode;
  if (space_.empty() && !space.empty()) {
    space_ = space;
    build_dimensions();
  }
  return true;
}

double TPESearch::sample_dimension(const std::string& key, const ParzenDimension& dim) {
  // Optuna's split: sort by loss (ties keep trial order), the best gamma(n) are "below".
  std::vector<const Observation*> sorted;
  for (auto& o : observations_)
    sorted.push_back(&o);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](auto* a, auto* b) { return a->loss < b->loss; });
  auto n = static_cast<int64_t>(sorted.size());
  auto n_below = std::clamp<int64_t>(options_.gamma(n), 0, n);
  auto fit = [&](std::vector<const Observation*> group) {
    std::sort(group.begin(), group.end(), [](auto* a, auto* b) { return a->number < b->number; });
    std::vector<double> xs;
    for (auto* o : group)
      xs.push_back(o->values.at(key));
    return ParzenEstimator{dim, xs, options_.weights(static_cast<int64_t>(xs.size())),
                           options_.parzen};
  };
  auto below = fit({sorted.begin(), sorted.begin() + n_below});
  auto above = fit({sorted.begin() + n_below, sorted.end()});
  double best = 0;
  double best_score = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < options_.n_ei_candidates; ++i) {
    double x = below.sample(rng_);
    double score = below.log_pdf(x) - above.log_pdf(x);
    if (i == 0 || score > best_score) {
      best = x;
      best_score = score;
    }
  }
  return best;
}

Suggestion TPESearch::suggest(const TrialId& trial_id) {
  require_metric(options_.metric, options_.mode, "TPESearch");
  Config config;
  if (static_cast<int64_t>(observations_.size()) < options_.n_startup_trials) {
    config = space_.resolve({}, rng_);
  } else {
    Config assigned;
    for (auto& [key, dim] : dims_) {
      double x = sample_dimension(key, dim);
      auto& domain = space_.domains().at(key);
      if (dim.categorical)
        assigned.set(key, domain.values()[static_cast<std::size_t>(x)]);
      else if (dim.integer)
        assigned.set(key, static_cast<int64_t>(std::llround(x)));
      else
        assigned.set(key, x);
    }
    config = space_.resolve(assigned, rng_);
  }
  live_[trial_id] = {next_number_++, config};
  return {Suggestion::Status::ready, config};
}

void TPESearch::on_trial_complete(const TrialId& trial_id, const Metrics& result, bool error) {
  auto i = live_.find(trial_id);
  if (i == live_.end())
    return;
  auto [number, config] = i->second;
  live_.erase(i);
  auto m = result.find(options_.metric);
  if (error || m == result.end() || std::isnan(m->second))
    return;
  Observation o{number, -metric_op(options_.mode, "TPESearch") * m->second, {}};
  for (auto& [key, dim] : dims_) {
    if (!dim.categorical) {
      o.values[key] = config.get<double>(key);
      continue;
    }
    auto& values = space_.domains().at(key).values();
    auto v = std::find(values.begin(), values.end(), config.values().at(key));
    o.values[key] = static_cast<double>(v - values.begin());
  }
  observations_.push_back(std::move(o));
}

} // namespace caftrain::tune
