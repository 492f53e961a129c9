// CSVLogger: metrics.csv per run, as Lightning's CSVLogger writes it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "callbacks/logger.hpp"

namespace caftrain {

/// Writes logged metrics to `<save_dir>/<name>/version_<n>/metrics.csv` (one row per log
/// call, a column per metric plus `step`; the file is rewritten when a new metric
/// appears) and hyperparameters to `hparams.yaml` beside it. With version < 0 the next
/// free version number is used.
class CSVLogger : public Logger {
 public:
  explicit CSVLogger(std::string save_dir, std::string name = "lightning_logs",
                     int64_t version = -1);

  std::string name() const override;
  std::string log_dir() const override;
  void log_hyperparams(const Config& hparams) override;
  void log_metrics(const Metrics& metrics, int64_t step) override;
  void save() override;

  /// The version directory number.
  int64_t version() const;

  /// Path of metrics.csv.
  std::string metrics_file() const;

 private:
  void resolve() const;
  void rewrite() const;

  std::string save_dir_;
  std::string name_;
  mutable int64_t version_;
  std::vector<std::string> columns_;
  std::vector<Metrics> rows_;
};

} // namespace caftrain
