#include "callbacks/progress_bar.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "train/trainer.hpp"

namespace caftrain {

namespace {

/// Width of the bar itself, in cells.
constexpr int kBarWidth = 20;

std::string clock(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0)
    return "?";
  auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>((s / 60) % 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof(buf), "%02lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  return buf;
}

std::string number(double v) {
  std::ostringstream os;
  os << std::setprecision(4) << v;
  return os.str();
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

} // namespace

ProgressBar::ProgressBar(ProgressBarOptions options) : options_(options) {
  tty_ = options_.tty.value_or(options_.out == nullptr && ::isatty(STDOUT_FILENO) == 1);
}

std::string ProgressBar::state_key() const {
  return "ProgressBar";
}

bool ProgressBar::active(const Trainer& trainer) const {
  return trainer.is_global_zero() && !trainer.sanity_checking();
}

std::ostream& ProgressBar::out() const {
  return options_.out ? *options_.out : std::cout;
}

std::string ProgressBar::render(const std::string& prefix, int64_t done, int64_t total,
                                double elapsed_s, const Metrics& metrics, bool with_bar) {
  std::ostringstream os;
  os << prefix << ": ";
  double frac = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 0.0;
  if (with_bar) {
    os << std::setw(3) << static_cast<int>(frac * 100) << "%|";
    int cells = static_cast<int>(frac * kBarWidth);
    for (int i = 0; i < kBarWidth; ++i)
      os << (i < cells ? "\u2588" : " ");
    os << "| ";
  }
  double rate = elapsed_s > 0 ? static_cast<double>(done) / elapsed_s : 0.0;
  double eta = rate > 0 ? static_cast<double>(total - done) / rate : NAN;
  os << done << "/" << total << " [" << clock(elapsed_s) << "<" << clock(eta) << ", ";
  if (rate >= 1.0 || rate == 0.0)
    os << number(rate) << "it/s";
  else
    os << number(1.0 / rate) << "s/it";
  for (auto& [k, v] : metrics)
    os << ", " << k << "=" << number(v);
  os << "]";
  return os.str();
}

void ProgressBar::draw(const std::string& line, bool final) {
  auto& os = out();
  if (tty_) {
    os << '\r' << line;
    if (line.size() < last_width_)
      os << std::string(last_width_ - line.size(), ' ');
    last_width_ = final ? 0 : line.size();
    if (final)
      os << '\n';
  } else {
    os << line << '\n';
  }
  os.flush();
  last_draw_ = std::chrono::steady_clock::now();
}

void ProgressBar::on_train_epoch_start(Trainer& trainer, LightningModule&) {
  epoch_start_ = std::chrono::steady_clock::now();
  last_draw_ = epoch_start_;
}

void ProgressBar::on_train_batch_end(Trainer& trainer, LightningModule&, const at::Tensor&,
                                     const Batch&, int64_t batch_idx) {
  if (!active(trainer))
    return;
  auto total = trainer.num_training_batches();
  auto done = batch_idx + 1;
  bool due;
  if (tty_)
    due = seconds_since(last_draw_) >= options_.refresh_seconds || done == total;
  else {
    auto every = std::max<int64_t>(1, total / std::max<int64_t>(options_.lines_per_epoch, 1));
    due = done % every == 0 && done != total; // the epoch's last line comes at epoch end
  }
  if (!due)
    return;
  auto max_epochs = trainer.options().max_epochs;
  std::string prefix = "Epoch " + std::to_string(trainer.current_epoch());
  if (max_epochs > 0)
    prefix += "/" + std::to_string(max_epochs);
  draw(render(prefix, done, total, seconds_since(epoch_start_), trainer.progress_bar_metrics(), tty_),
       false);
}

void ProgressBar::on_train_epoch_end(Trainer& trainer, LightningModule&) {
  if (!active(trainer))
    return;
  auto max_epochs = trainer.options().max_epochs;
  std::string prefix = "Epoch " + std::to_string(trainer.current_epoch());
  if (max_epochs > 0)
    prefix += "/" + std::to_string(max_epochs);
  auto metrics = trainer.progress_bar_metrics();
  draw(render(prefix, trainer.batch_idx(), trainer.num_training_batches(),
              seconds_since(epoch_start_), metrics, tty_),
       true);
}

void ProgressBar::on_validation_start(Trainer& trainer, LightningModule&) {
  val_start_ = std::chrono::steady_clock::now();
}

void ProgressBar::on_validation_batch_end(Trainer& trainer, LightningModule&, const Batch&,
                                          int64_t batch_idx) {
  if (!active(trainer) || !tty_ || seconds_since(last_draw_) < options_.refresh_seconds)
    return;
  // On a terminal, validation shows below the training line and is erased after.
  auto line = render("Validation", batch_idx + 1, trainer.num_val_batches(),
                     seconds_since(val_start_), {}, true);
  auto& os = out();
  os << (in_validation_line_ ? "\r" : "\n") << line << "\x1b[K";
  os.flush();
  in_validation_line_ = true;
  last_draw_ = std::chrono::steady_clock::now();
}

void ProgressBar::on_validation_end(Trainer& trainer, LightningModule&) {
  if (!active(trainer))
    return;
  if (tty_ && in_validation_line_) {
    out() << "\r\x1b[K\x1b[1A";
    out().flush();
    in_validation_line_ = false;
  }
}

} // namespace caftrain
