// ProgressBar: a terminal progress bar for training and validation.
#pragma once

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <optional>
#include <string>

#include "callbacks/callback.hpp"
#include "core/config.hpp"

namespace caftrain {

/// Options of `ProgressBar`.
struct ProgressBarOptions {
  /// Redraw at most this often on a terminal, in seconds. Default 0.1.
  double refresh_seconds = 0.1;
  /// Lines per epoch when the output is not a terminal (plus one at the epoch's end).
  /// Default 10.
  int64_t lines_per_epoch = 10;
  /// Force terminal (true) or plain-line (false) output; default: ask isatty(stdout).
  std::optional<bool> tty = std::nullopt;
  /// Where to draw; default std::cout.
  std::ostream* out = nullptr;
};

/// Lightning's progress bar: on a terminal one line redrawn in place,
/// `Epoch 1/10:  42%|████▏     | 197/469 [00:31<00:43, 6.28it/s, loss=0.412]`;
/// elsewhere (logs, CI) plain lines at intervals. Draws on the global-zero rank only.
class ProgressBar : public Callback {
 public:
  explicit ProgressBar(ProgressBarOptions options = {});

  std::string state_key() const override;

  void on_train_epoch_start(Trainer& trainer, LightningModule& module) override;
  void on_train_batch_end(Trainer& trainer, LightningModule& module, const at::Tensor& loss,
                          const Batch& batch, int64_t batch_idx) override;
  void on_train_epoch_end(Trainer& trainer, LightningModule& module) override;
  void on_validation_start(Trainer& trainer, LightningModule& module) override;
  void on_validation_batch_end(Trainer& trainer, LightningModule& module, const Batch& batch,
                               int64_t batch_idx) override;
  void on_validation_end(Trainer& trainer, LightningModule& module) override;

  /// The text of one bar line (exposed for tests).
  static std::string render(const std::string& prefix, int64_t done, int64_t total,
                            double elapsed_s, const Metrics& metrics, bool with_bar);

 private:
  bool active(const Trainer& trainer) const;
  std::ostream& out() const;
  void draw(const std::string& line, bool final);

  ProgressBarOptions options_;
  bool tty_ = false;
  std::chrono::steady_clock::time_point epoch_start_;
  std::chrono::steady_clock::time_point val_start_;
  std::chrono::steady_clock::time_point last_draw_;
  size_t last_width_ = 0;
  bool in_validation_line_ = false;
};

} // namespace caftrain
