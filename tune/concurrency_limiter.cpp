#include "tune/concurrency_limiter.hpp"

#include "core/error.hpp"

namespace caftrain::tune {

ConcurrencyLimiter::ConcurrencyLimiter(std::unique_ptr<Searcher> searcher, int64_t max_concurrent)
  : searcher_(std::move(searcher)), max_concurrent_(max_concurrent) {
  if (!searcher_)
    throw Error(Errc::invalid_config, "ConcurrencyLimiter needs a searcher to wrap, got null");
  if (max_concurrent_ < 1)
    throw Error(Errc::invalid_config, "ConcurrencyLimiter: max_concurrent = " +
                                        std::to_string(max_concurrent_) +
                                        "; pass at least 1");
}

bool ConcurrencyLimiter::set_search_properties(const std::string& metric, const std::string& mode,
                                               const ParamSpace& space) {
  return searcher_->set_search_properties(metric, mode, space);
}

Suggestion ConcurrencyLimiter::suggest(const TrialId& trial_id) {
  if (static_cast<int64_t>(live_.size()) >= max_concurrent_)
    return {Suggestion::Status::wait, {}};
  auto s = searcher_->suggest(trial_id);
  if (s.status == Suggestion::Status::ready)
    live_.insert(trial_id);
  return s;
}

void ConcurrencyLimiter::on_trial_result(const TrialId& trial_id, const Metrics& result) {
  if (live_.count(trial_id) > 0)
    searcher_->on_trial_result(trial_id, result);
}

void ConcurrencyLimiter::on_trial_complete(const TrialId& trial_id, const Metrics& result,
                                           bool error) {
  if (live_.erase(trial_id) > 0)
    searcher_->on_trial_complete(trial_id, result, error);
}

} // namespace caftrain::tune
