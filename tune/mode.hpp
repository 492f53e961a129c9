// The optimisation direction of Tune's searchers and schedulers.
#pragma once

#include <string>

namespace caftrain::tune {

/// +1 for `mode` "max", -1 for "min" (Ray's `metric_op`): multiplying a metric by it
/// makes larger always better. Throws `Error(invalid_config)` for anything else, naming
/// `who` (the searcher or scheduler) and the fix.
double metric_op(const std::string& mode, const std::string& who);

/// Throws `Error(invalid_config)` naming `who` when `metric` or `mode` is unset: they come
/// from the searcher's or scheduler's options or from the Tuner's `tune_config`.
void require_metric(const std::string& metric, const std::string& mode, const std::string& who);

} // namespace caftrain::tune
