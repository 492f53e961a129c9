#include "train/metrics_collector.hpp"

#include <torch/torch.h>

#include "core/error.hpp"

namespace caftrain {

void MetricsCollector::begin_batch(LogScope scope, int64_t batch_size) {
  scope_ = scope;
  batch_size_ = std::max<int64_t>(batch_size, 1);
  epoch_end_ = false;
}

void MetricsCollector::begin_epoch_end(LogScope scope) {
  scope_ = scope;
  batch_size_ = 1; // logged once per epoch: its epoch mean is the value itself
  epoch_end_ = true;
}

void MetricsCollector::log(const std::string& name, const at::Tensor& value,
                           const LogOptions& options) {
  if (value.numel() != 1)
    throw Error(Errc::invalid_argument, "log('" + name + "'): value has " +
                                          std::to_string(value.numel()) +
                                          " elements; log a scalar (e.g. loss.mean())");
  if (epoch_end_ && (options.on_step.value_or(false) || !options.on_epoch.value_or(true)))
    throw Error(Errc::invalid_argument,
                "log('" + name + "') in an epoch-end hook with on_step = true or on_epoch = "
                "false: there is no step there; drop those options (values logged at an "
                "epoch's end are epoch-level)");
  auto& e = entries_[name];
  bool training = scope_ == LogScope::train;
  e.scope = scope_;
  e.options = options;
  e.on_step = !epoch_end_ && options.on_step.value_or(training);
  e.on_epoch = epoch_end_ || options.on_epoch.value_or(!training);
  auto v = value.detach().reshape({}).to(torch::kDouble);
  if (options.sync_dist && reducer_)
    v = torch::tensor(reducer_(v.item<double>()), torch::kDouble); // collective, on every rank
  e.last = v;
  e.fresh = true;
  if (e.on_epoch) {
    auto w = static_cast<double>(batch_size_);
    e.sum = e.sum.defined() ? e.sum + v * w : v * w;
    e.weight += w;
  }
}

void MetricsCollector::reset_epoch(LogScope scope) {
  for (auto& [name, e] : entries_) {
    if (e.scope == scope) {
      e.sum = at::Tensor();
      e.weight = 0.0;
    }
  }
}

void MetricsCollector::clear(LogScope scope) {
  for (auto i = entries_.begin(); i != entries_.end();)
    i = i->second.scope == scope ? entries_.erase(i) : std::next(i);
}

Metrics MetricsCollector::step_metrics(bool for_logger) const {
  Metrics result;
  for (auto& [name, e] : entries_) {
    if (!e.on_step || !e.fresh || (for_logger && !e.options.logger))
      continue;
    auto v = e.last.item<double>();
    result[e.on_epoch ? name + "_step" : name] = v;
    if (e.on_epoch && !for_logger)
      result[name] = v; // callbacks also see the plain name, as in Lightning

  }
  return result;
}

Metrics MetricsCollector::epoch_metrics(LogScope scope, bool for_logger) const {
  Metrics result;
  for (auto& [name, e] : entries_) {
    if (e.scope != scope || !e.on_epoch || e.weight == 0.0 || (for_logger && !e.options.logger))
      continue;
    double mean = e.sum.item<double>() / e.weight;
    result[e.on_step ? name + "_epoch" : name] = mean;
    if (e.on_step && !for_logger)
      result[name] = mean;
  }
  return result;
}

Metrics MetricsCollector::progress_bar() const {
  Metrics result;
  for (auto& [name, e] : entries_) {
    if (!e.options.prog_bar || !e.last.defined())
      continue;
    if (e.on_step && e.fresh)
      result[name] = e.last.item<double>();
    else if (e.on_epoch && e.weight > 0.0)
      result[name] = e.sum.item<double>() / e.weight;
  }
  return result;
}

void MetricsCollector::end_step() {
  for (auto& [name, e] : entries_)
    e.fresh = false;
}

} // namespace caftrain
