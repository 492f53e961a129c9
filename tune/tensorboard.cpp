#include "tune/tensorboard.hpp"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "core/error.hpp"

namespace caftrain::tune {

namespace {

/// Protocol buffer encoding, the few wire types an Event needs.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void tag(std::string& out, uint32_t field, uint32_t wire_type) {
  varint(out, (static_cast<uint64_t>(field) << 3) | wire_type);
}

void fixed64(std::string& out, uint32_t field, double v) {
  tag(out, field, 1);
  char bytes[8];
  std::memcpy(bytes, &v, 8); // little-endian on every machine we build for
  out.append(bytes, 8);
}

void fixed32(std::string& out, uint32_t field, float v) {
  tag(out, field, 5);
  char bytes[4];
  std::memcpy(bytes, &v, 4);
  out.append(bytes, 4);
}

void bytes_field(std::string& out, uint32_t field, const std::string& data) {
  tag(out, field, 2);
  varint(out, data.size());
  out += data;
}

uint32_t masked(uint32_t crc) {
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

void little_endian(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i)
    out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0)
    return "localhost";
  return buf;
}

} // namespace

uint32_t crc32c(const void* data, std::size_t size) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k)
        c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xffffffffu;
  auto p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i)
    crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc ^ 0xffffffffu;
}

EventFileWriter::EventFileWriter(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  auto now = std::chrono::system_clock::now().time_since_epoch();
  auto seconds = std::chrono::duration_cast<std::chrono::seconds>(now).count();
  path_ = (fs::path(dir) / ("events.out.tfevents." + std::to_string(seconds) + "." + hostname())).string();
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_)
    throw Error(Errc::io_error, "cannot write the TensorBoard event file '" + path_ + "'");
  std::string event;
  fixed64(event, 1, std::chrono::duration<double>(now).count()); // wall_time
  bytes_field(event, 3, "brain.Event:2");                          // file_version
  write_record(event);
}

void EventFileWriter::add_scalars(int64_t step, double wall_time, const Metrics& metrics,
                                  const std::string& prefix) {
  std::string summary;
  for (auto& [name, value] : metrics) {
    std::string v;
    bytes_field(v, 1, prefix + name);              // Summary.Value.tag
    fixed32(v, 2, static_cast<float>(value));      // Summary.Value.simple_value
    bytes_field(summary, 1, v);                    // Summary.value
  }
  std::string event;
  fixed64(event, 1, wall_time); // Event.wall_time
  tag(event, 2, 0);             // Event.step
  varint(event, static_cast<uint64_t>(step));
  bytes_field(event, 5, summary); // Event.summary
  write_record(event);
}

void EventFileWriter::write_record(const std::string& data) {
  std::string frame;
  std::string length;
  little_endian(length, data.size(), 8);
  frame += length;
  little_endian(frame, masked(crc32c(length.data(), length.size())), 4);
  frame += data;
  little_endian(frame, masked(crc32c(data.data(), data.size())), 4);
  out_.write(frame.data(), static_cast<std::streamsize>(frame.size()));
  out_.flush();
  if (!out_)
    throw Error(Errc::io_error, "cannot append to the TensorBoard event file '" + path_ + "'");
}

} // namespace caftrain::tune
