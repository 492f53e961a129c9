#include "checkpoint/files.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include "core/error.hpp"

namespace caftrain {

namespace {

[[noreturn]] void io_fail(const std::string& what, const std::string& path, int err) {
  throw Error(Errc::io_error, what + " '" + path + "' failed: " + std::strerror(err));
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {
    // nop
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0)
      ::close(fd_);
  }
  int get() const {
    return fd_;
  }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

void write_all(int fd, const char* data, size_t size, const std::string& path) {
  while (size > 0) {
    auto n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      io_fail("writing", path, errno);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

void write_atomic(const std::string& path, const char* data, size_t size) {
  auto tmp = path + ".tmp." + std::to_string(::getpid());
  {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0)
      io_fail("creating", tmp, errno);
    write_all(fd.get(), data, size, tmp);
    if (::fsync(fd.get()) != 0)
      io_fail("fsync of", tmp, errno);
    if (::close(fd.release()) != 0)
      io_fail("closing", tmp, errno);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    io_fail("renaming into", path, err);
  }
  auto dir = std::filesystem::path(path).parent_path();
  fsync_path(dir.empty() ? "." : dir.string());
}

} // namespace

void lower_thread_priority() {
  // On Linux PRIO_PROCESS with a thread id sets that thread's nice value; raising it needs
  // no privilege. Best effort: a failure only means the writer competes at full priority.
  auto tid = static_cast<id_t>(::syscall(SYS_gettid));
  (void)::setpriority(PRIO_PROCESS, tid, 10);
}

void write_file_started(const std::string& path, const std::vector<char>& bytes) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0)
    io_fail("creating", path, errno);
  write_all(fd.get(), bytes.data(), bytes.size(), path);
#ifdef SYNC_FILE_RANGE_WRITE
  // Start writeback now, so that the device works on this file while the next is
  // written; the caller's fsync then mostly waits for what is already under way.
  ::sync_file_range(fd.get(), 0, 0, SYNC_FILE_RANGE_WRITE);
#endif
  if (::close(fd.release()) != 0)
    io_fail("closing", path, errno);
}

FileSource bytes_source(std::vector<char> bytes) {
  auto held = std::make_shared<const std::vector<char>>(std::move(bytes));
  return [held](const ByteSink& out) { out(held->data(), held->size()); };
}

std::vector<char> bytes_of(const FileSource& source) {
  std::vector<char> bytes;
  source([&](const char* data, size_t size) { bytes.insert(bytes.end(), data, data + size); });
  return bytes;
}

WrittenFile write_file_streamed(const std::string& path, const FileSource& source, bool sync) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0)
    io_fail("creating", path, errno);
  // Serializers hand over many small pieces (headers, pickle opcodes) between the large
  // ones (tensor data): the small ones gather in a buffer, the large ones go straight on.
  constexpr size_t kBuffer = size_t{1} << 20;
  std::vector<char> buffer;
  buffer.reserve(kBuffer);
  WrittenFile written;
  auto drain = [&] {
    write_all(fd.get(), buffer.data(), buffer.size(), path);
    buffer.clear();
  };
  source([&](const char* data, size_t size) {
    written.crc32 = crc32_of(data, size, written.crc32);
    written.size += size;
    if (buffer.size() + size <= kBuffer) {
      buffer.insert(buffer.end(), data, data + size);
      return;
    }
    drain();
    if (size < kBuffer)
      buffer.insert(buffer.end(), data, data + size);
    else
      write_all(fd.get(), data, size, path);
  });
  drain();
  if (sync && ::fsync(fd.get()) != 0)
    io_fail("fsync of", path, errno);
  if (::close(fd.release()) != 0)
    io_fail("closing", path, errno);
  return written;
}

std::vector<char> read_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0)
    io_fail("opening", path, errno);
  std::vector<char> result;
  char buf[1 << 16];
  for (;;) {
    auto n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR)
        continue;
      io_fail("reading", path, errno);
    }
    if (n == 0)
      break;
    result.insert(result.end(), buf, buf + n);
  }
  return result;
}

void write_file_atomic(const std::string& path, const std::vector<char>& bytes) {
  write_atomic(path, bytes.data(), bytes.size());
}

void write_file_atomic(const std::string& path, const std::string& text) {
  write_atomic(path, text.data(), text.size());
}

void fsync_path(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0)
    io_fail("opening", path, errno);
  if (::fsync(fd.get()) != 0 && errno != EINVAL)
    io_fail("fsync of", path, errno);
}

uint32_t crc32_of(const void* data, size_t size, uint32_t seed) {
  auto crc = static_cast<uLong>(seed);
  auto* p = static_cast<const Bytef*>(data);
  while (size > 0) {
    auto chunk = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    crc = ::crc32(crc, p, chunk);
    p += chunk;
    size -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

uint32_t crc32_of_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0)
    io_fail("opening", path, errno);
  uint32_t crc = 0;
  char buf[1 << 16];
  for (;;) {
    auto n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR)
        continue;
      io_fail("reading", path, errno);
    }
    if (n == 0)
      return crc;
    crc = crc32_of(buf, static_cast<size_t>(n), crc);
  }
}

} // namespace caftrain
