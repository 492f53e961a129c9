#include "tune/population_based_training.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace caftrain::tune {

namespace {

[[noreturn]] void bad(const std::string& what) {
  throw Error(Errc::invalid_config, "PopulationBasedTraining: " + what);
}

ConfigValue resample(const Mutation& m, Rng& rng) {
  if (auto values = m.values())
    return (*values)[rng.index(values->size())];
  if (auto domain = m.domain())
    return domain->sample(rng);
  return (*m.function())();
}

} // namespace

Config explore(const Config& config, const std::map<std::string, Mutation>& mutations,
               double resample_probability, const std::vector<double>& perturbation_factors,
               Rng& rng) {
  Config out = config;
  for (auto& [key, m] : mutations) {
    if (!config.contains(key))
      bad("cannot explore '" + key + "': the config has no such key");
    auto& old = config.values().at(key);
    if (auto values = m.values()) {
      bool resampled = rng.bernoulli(resample_probability);
      auto at = std::find(values->begin(), values->end(), old);
      if (resampled || at == values->end()) {
        out.set(key, (*values)[rng.index(values->size())]);
      } else {
        auto shift = rng.index(2) == 0 ? -1 : 1;
        auto idx = std::clamp<std::ptrdiff_t>((at - values->begin()) + shift, 0,
                                              static_cast<std::ptrdiff_t>(values->size()) - 1);
        out.set(key, (*values)[static_cast<std::size_t>(idx)]);
      }
      continue;
    }
    ConfigValue next;
    if (rng.bernoulli(resample_probability)) {
      next = resample(m, rng);
    } else {
      double factor = perturbation_factors[rng.index(perturbation_factors.size())];
      if (auto i = std::get_if<int64_t>(&old))
        next = static_cast<double>(*i) * factor;
      else if (auto d = std::get_if<double>(&old))
        next = *d * factor;
      else
        bad("cannot perturb '" + key + "' = " + to_string(old) +
            ": only numbers can be multiplied; give a list of values for it instead");
    }
    // A value that started as an integer (e.g. batch_size) stays one, as Ray's int().
    if (std::holds_alternative<int64_t>(old))
      if (auto d = std::get_if<double>(&next))
        next = static_cast<int64_t>(std::trunc(*d));
    out.set(key, next);
  }
  return out;
}

PopulationBasedTraining::PopulationBasedTraining(PopulationBasedTrainingOptions options)
  : TrialScheduler("PopulationBasedTraining", options.metric, options.mode),
    options_(std::move(options)),
    rng_(options_.seed) {
  if (!(options_.quantile_fraction >= 0 && options_.quantile_fraction <= 0.5))
    bad("quantile_fraction = " + std::to_string(options_.quantile_fraction) +
        "; set it between 0 and 0.5");
  if (!(options_.perturbation_interval > 0))
    bad("perturbation_interval must be > 0");
  if (!(options_.resample_probability >= 0 && options_.resample_probability <= 1))
    bad("resample_probability must be between 0 and 1");
  if (options_.hyperparam_mutations.empty() && !options_.custom_explore_fn)
    bad("give hyperparam_mutations or a custom_explore_fn: without them nothing is explored");
  if (options_.perturbation_factors.empty())
    bad("perturbation_factors is empty; keep the default {1.2, 0.8} or give factors");
  for (auto& [key, m] : options_.hyperparam_mutations) {
    if (auto values = m.values(); values && values->empty())
      bad("the mutation of '" + key + "' is an empty list; give at least one value");
    if (auto domain = m.domain()) {
      domain->validate(key);
      if (domain->kind() == Domain::Kind::grid || domain->kind() == Domain::Kind::function)
        bad("the mutation of '" + key + "' is a " + domain->to_string() +
            "; use a list, a sampling domain, or a function");
    }
    if (auto fn = m.function(); fn && !*fn)
      bad("the mutation of '" + key + "' is an empty function");
  }
}

PopulationBasedTraining::State& PopulationBasedTraining::state(const TrialId& trial) {
  auto i = states_.find(trial);
  if (i == states_.end())
    throw Error(Errc::invalid_argument, "PopulationBasedTraining: unknown trial '" + trial +
                                          "'; call on_trial_add first");
  return i->second;
}

const Config& PopulationBasedTraining::config_of(const TrialId& trial) const {
  auto i = states_.find(trial);
  if (i == states_.end())
    throw Error(Errc::invalid_argument, "PopulationBasedTraining: unknown trial '" + trial + "'");
  return i->second.config;
}

void PopulationBasedTraining::on_trial_add(const TrialId& trial, Config& config) {
  require_metric();
  for (auto& [key, m] : options_.hyperparam_mutations)
    if (!config.contains(key))
      config.set(key, resample(m, rng_));
  State s;
  s.config = config;
  s.order = next_order_++;
  states_[trial] = std::move(s);
}

TrialScheduler::Decision PopulationBasedTraining::on_trial_result(const TrialId& trial,
                                                                  const Metrics& result,
                                                                  const ResultContext& context) {
  for (auto* key : {&options_.time_attr, &metric_})
    if (result.count(*key) == 0) {
      if (options_.require_attrs)
        attr(result, *key, trial); // throws, naming the key
      return Decision::CONTINUE;
    }
  double time = result.at(options_.time_attr);
  auto& st = state(trial);
  if (time < options_.burn_in_period)
    return Decision::CONTINUE;
  if (time - st.last_perturbation_time < options_.perturbation_interval)
    return Decision::CONTINUE;
  st.last_score = metric_op() * result.at(metric_);
  st.last_train_time = time;
  st.last_perturbation_time = time;

  // Ray's _quantiles: live trials with a score, sorted by it (stable: creation order).
  std::vector<std::pair<TrialId, State*>> ranked;
  for (auto& [id, s] : states_)
    if (s.last_score && !s.finished)
      ranked.emplace_back(id, &s);
  std::stable_sort(ranked.begin(), ranked.end(), [](auto& a, auto& b) {
    return a.second->order < b.second->order;
  });
  std::stable_sort(ranked.begin(), ranked.end(), [](auto& a, auto& b) {
    return *a.second->last_score < *b.second->last_score;
  });
  std::vector<TrialId> lower;
  std::vector<TrialId> upper;
  if (ranked.size() > 1) {
    auto n = static_cast<double>(ranked.size());
    auto k = static_cast<std::size_t>(std::ceil(n * options_.quantile_fraction));
    if (static_cast<double>(k) > n / 2)
      k = static_cast<std::size_t>(std::floor(n / 2));
    for (std::size_t i = 0; i < k; ++i) {
      lower.push_back(ranked[i].first);
      upper.push_back(ranked[ranked.size() - k + i].first);
    }
  }
  auto decision = context.waiting_trials > 0 ? Decision::PAUSE : Decision::CONTINUE;

  // Ray's _checkpoint_or_exploit.
  auto in = [&](const std::vector<TrialId>& xs) {
    return std::find(xs.begin(), xs.end(), trial) != xs.end();
  };
  st.last_checkpoint = in(upper) ? context.checkpoint : std::string{};
  if (!in(lower))
    return decision;
  auto& donor_id = upper[rng_.index(upper.size())];
  auto& donor = states_.at(donor_id);
  if (donor.last_checkpoint.empty())
    return decision; // "[pbt]: no checkpoint for trial. Skip exploit"
  Config next = explore(donor.config, options_.hyperparam_mutations,
                        options_.resample_probability, options_.perturbation_factors, rng_);
  if (options_.custom_explore_fn)
    next = options_.custom_explore_fn(std::move(next));
  st.config = next;
  st.last_perturbation_time = donor.last_perturbation_time;
  st.last_train_time = donor.last_train_time;
  ++num_perturbations_;
  command({TrialCommand::Kind::exploit, trial, donor_id, donor.last_checkpoint, next});
  return Decision::PAUSE;
}

void PopulationBasedTraining::on_trial_complete(const TrialId& trial, const Metrics&) {
  on_trial_remove(trial);
}

void PopulationBasedTraining::on_trial_error(const TrialId& trial) {
  on_trial_remove(trial);
}

void PopulationBasedTraining::on_trial_remove(const TrialId& trial) {
  if (auto i = states_.find(trial); i != states_.end())
    i->second.finished = true;
}

std::optional<TrialId>
PopulationBasedTraining::choose_trial_to_run(const std::vector<TrialInfo>& startable) {
  std::optional<TrialId> best;
  double best_time = 0;
  for (auto& t : startable) {
    auto i = states_.find(t.id);
    if (i == states_.end() || i->second.finished)
      continue;
    if (!best || i->second.last_train_time < best_time) {
      best = t.id;
      best_time = i->second.last_train_time;
    }
  }
  return best;
}

} // namespace caftrain::tune
