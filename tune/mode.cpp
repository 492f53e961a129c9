#include "tune/mode.hpp"

#include "core/error.hpp"

namespace caftrain::tune {

double metric_op(const std::string& mode, const std::string& who) {
  if (mode == "max")
    return 1.0;
  if (mode == "min")
    return -1.0;
  throw Error(Errc::invalid_config, who + ": mode '" + mode + "' is neither \"min\" nor \"max\"");
}

void require_metric(const std::string& metric, const std::string& mode, const std::string& who) {
  if (metric.empty() || mode.empty())
    throw Error(Errc::invalid_config,
                who + " has no metric or mode (metric '" + metric + "', mode '" + mode +
                  "'); pass them in its options or in the Tuner's tune_config");
  metric_op(mode, who);
}

} // namespace caftrain::tune
