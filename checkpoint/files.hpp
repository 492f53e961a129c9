// Durable file operations: atomic writes, fsync, checksums.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/file_source.hpp"

namespace caftrain {

/// Reads the whole file; throws `Error(io_error)` naming the path and the OS's reason.
std::vector<char> read_file(const std::string& path);

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// write to `path.tmp.<pid>`, fsync it, rename over `path`, fsync the directory.
void write_file_atomic(const std::string& path, const std::vector<char>& bytes);
void write_file_atomic(const std::string& path, const std::string& text);

/// Flushes a file's or a directory's contents and metadata to disk.
void fsync_path(const std::string& path);

/// Lowers the calling thread's CPU priority (nice 10), for threads that write checkpoints
/// in the background: the training threads keep the cores, the writer uses what they leave.
void lower_thread_priority();

/// Writes `bytes` to `path` (created or truncated) and starts its writeback without
/// waiting for it: the file is durable only after a later `fsync_path(path)`. For files
/// of a private staging directory that is made durable, and published, as a whole.
void write_file_started(const std::string& path, const std::vector<char>& bytes);

/// A source of bytes at hand.
FileSource bytes_source(std::vector<char> bytes);

/// All the bytes of `source`.
std::vector<char> bytes_of(const FileSource& source);

/// Size and CRC-32 of a file `write_file_streamed` wrote.
struct WrittenFile {
  uint64_t size = 0;
  uint32_t crc32 = 0;
};

/// Creates (or truncates) `path` with the bytes `source` produces, straight from the
/// source into the file (no copy of the whole file in memory), computing their CRC-32 as
/// they pass; with `sync`, fsyncs the file. Not atomic: for files of a private staging
/// directory, published as a whole. The one write, and the one checksum pass, of a
/// checkpoint file a worker writes.
WrittenFile write_file_streamed(const std::string& path, const FileSource& source, bool sync);

/// CRC-32 (zlib's) of `size` bytes.
uint32_t crc32_of(const void* data, size_t size, uint32_t seed = 0);

/// CRC-32 of a whole file, read in chunks.
uint32_t crc32_of_file(const std::string& path);

} // namespace caftrain
