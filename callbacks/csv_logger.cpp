#include "callbacks/csv_logger.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "core/error.hpp"

namespace caftrain {

namespace fs = std::filesystem;

namespace {

std::string cell(double v) {
  if (std::isnan(v))
    return "";
  std::ostringstream os;
  os << std::setprecision(10) << v;
  return os.str();
}

} // namespace

CSVLogger::CSVLogger(std::string save_dir, std::string name, int64_t version)
  : save_dir_(std::move(save_dir)), name_(std::move(name)), version_(version) {
  // nop
}

std::string CSVLogger::name() const {
  return name_;
}

void CSVLogger::resolve() const {
  if (version_ >= 0)
    return;
  auto root = fs::path(save_dir_) / name_;
  int64_t next = 0;
  std::error_code ec;
  if (fs::is_directory(root, ec)) {
    for (auto& entry : fs::directory_iterator(root, ec)) {
      auto n = entry.path().filename().string();
      if (n.rfind("version_", 0) == 0) {
        try {
          next = std::max<int64_t>(next, std::stoll(n.substr(8)) + 1);
        } catch (...) {
          // not one of ours
        }
      }
    }
  }
  version_ = next;
  fs::create_directories(root / ("version_" + std::to_string(version_)), ec);
  if (ec)
    throw Error(Errc::io_error, "CSVLogger cannot create '" + root.string() + "': " + ec.message());
}

int64_t CSVLogger::version() const {
  resolve();
  return version_;
}

std::string CSVLogger::log_dir() const {
  resolve();
  return (fs::path(save_dir_) / name_ / ("version_" + std::to_string(version_))).string();
}

std::string CSVLogger::metrics_file() const {
  return (fs::path(log_dir()) / "metrics.csv").string();
}

void CSVLogger::log_hyperparams(const Config& hparams) {
  if (hparams.empty())
    return;
  std::ofstream out(fs::path(log_dir()) / "hparams.yaml");
  for (auto& [k, v] : hparams.values())
    out << k << ": " << to_string(v) << "\n";
}

void CSVLogger::log_metrics(const Metrics& metrics, int64_t step) {
  auto row = metrics;
  row["step"] = static_cast<double>(step);
  bool new_columns = false;
  for (auto& [k, v] : row) {
    if (std::find(columns_.begin(), columns_.end(), k) == columns_.end()) {
      columns_.push_back(k);
      new_columns = true;
    }
  }
  rows_.push_back(std::move(row));
  if (new_columns) {
    rewrite();
    return;
  }
  std::ofstream out(metrics_file(), std::ios::app);
  auto& last = rows_.back();
  for (size_t i = 0; i < columns_.size(); ++i) {
    auto it = last.find(columns_[i]);
    out << (i ? "," : "") << (it == last.end() ? "" : cell(it->second));
  }
  out << "\n";
}

void CSVLogger::rewrite() const {
  std::ofstream out(metrics_file(), std::ios::trunc);
  for (size_t i = 0; i < columns_.size(); ++i)
    out << (i ? "," : "") << columns_[i];
  out << "\n";
  for (auto& row : rows_) {
    for (size_t i = 0; i < columns_.size(); ++i) {
      auto it = row.find(columns_[i]);
      out << (i ? "," : "") << (it == row.end() ? "" : cell(it->second));
    }
    out << "\n";
  }
  if (!out)
    throw Error(Errc::io_error, "CSVLogger cannot write '" + metrics_file() + "'");
}

void CSVLogger::save() {
  // Every row is written as it is logged; nothing is buffered.
}

} // namespace caftrain
