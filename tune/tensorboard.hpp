// TensorBoard event files: the scalars of every trial result, as Ray Tune writes them.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

#include "core/config.hpp"

namespace caftrain::tune {

/// Writes `events.out.tfevents.<seconds>.<host>` in a directory: TFRecord framing (length,
/// masked CRC-32C of the length, the record, masked CRC-32C of the record) around
/// `tensorflow.Event` protocol buffers: first the file version "brain.Event:2", then one
/// event per `add_scalars` holding a `Summary` with a simple value per metric (tag = the
/// metric's name, as Ray's TBXLogger names them under "ray/tune/"). TensorBoard reads the
/// directory as it grows; every event is flushed when written.
class EventFileWriter {
 public:
  /// Opens a new event file in `dir` (created if needed). Throws `Error(io_error)` naming
  /// the path when it cannot be written.
  explicit EventFileWriter(const std::string& dir);

  /// One event at `step` and `wall_time` (seconds since the epoch) with a scalar per
  /// metric, each tagged `prefix + name`.
  void add_scalars(int64_t step, double wall_time, const Metrics& metrics,
                   const std::string& prefix = "ray/tune/");

  /// The file written.
  const std::string& path() const noexcept {
    return path_;
  }

 private:
  void write_record(const std::string& data);

  std::string path_;
  std::ofstream out_;
};

/// CRC-32C (Castagnoli) of `size` bytes, as TFRecord frames use it (before masking).
uint32_t crc32c(const void* data, std::size_t size);

} // namespace caftrain::tune
