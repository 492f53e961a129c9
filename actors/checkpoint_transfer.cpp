#include "actors/checkpoint_transfer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <vector>

#include <caf/all.hpp>

#include "actors/cluster.hpp"
#include "actors/messages.hpp"
#include "checkpoint/files.hpp"
#include "checkpoint/remote_files.hpp"
#include "checkpoint/sharded.hpp"
#include "core/error.hpp"

namespace fs = std::filesystem;

namespace caftrain::transfer {

namespace {

constexpr const char* kStorageIdFile = ".caftrain_storage";

bool safe_name(const std::string& name) {
  if (name.empty() || name.size() > 200 || name.front() == '.')
    return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

std::string upload_dir(const std::string& run_dir, const std::string& name) {
  if (!safe_name(name))
    throw Error(Errc::invalid_argument, "checkpoint upload name '" + name +
                                          "' is not letters, digits, '-', '_' and '.'");
  return (fs::path(run_dir) / ".staging" / ("upload-" + name)).string();
}

std::string file_path(const std::string& dir, const std::string& file) {
  if (!safe_relative(file))
    throw Error(Errc::invalid_argument,
                "checkpoint file '" + file + "' is not a relative path inside its checkpoint");
  return (fs::path(dir) / file).string();
}

/// Sends one request from a blocking context and returns its answer, or throws naming
/// `what`.
template <class Answer, class... Ts>
Answer ask(caf::actor_system& sys, const caf::actor& to, std::chrono::milliseconds timeout,
           const std::string& what, Ts&&... xs) {
  caf::scoped_actor self{sys};
  Answer out{};
  self->request(to, timeout, std::forward<Ts>(xs)...)
    .receive([&](Answer& x) { out = std::move(x); },
             [&](caf::error& err) {
               auto e = to_run_error(err);
               throw Error(e.code == Errc::none ? Errc::io_error : e.code, what + ": " + e.message);
             });
  return out;
}

} // namespace

bool safe_relative(const std::string& file) {
  fs::path p(file);
  if (file.empty() || p.is_absolute())
    return false;
  for (auto& part : p)
    if (part == ".." || part == "." || part.empty())
      return false;
  return true;
}

std::string mark_storage(const std::string& run_dir) {
  auto id = random_hex(32);
  std::ofstream out(fs::path(run_dir) / kStorageIdFile, std::ios::trunc);
  out << id << "\n";
  out.flush();
  return out ? id : std::string();
}

bool sees_storage(const std::string& run_dir, const std::string& id) {
  if (const char* forced = std::getenv("CAFTRAIN_SHARED_STORAGE"); forced && std::string(forced) == "0")
    return false;
  if (id.empty())
    return false;
  std::ifstream in(fs::path(run_dir) / kStorageIdFile);
  std::string seen;
  in >> seen;
  return seen == id;
}

std::string local_root() {
  std::error_code ec;
  auto tmp = fs::temp_directory_path(ec);
  if (ec)
    tmp = "/tmp";
  return (tmp / ("caftrain-worker-" + std::to_string(::getpid()))).string();
}

std::string upload(caf::actor_system& sys, const caf::actor& trainer, const std::string& dir,
                   const std::string& name, std::chrono::milliseconds timeout) {
  std::error_code ec;
  std::vector<fs::path> files;
  for (auto& entry : fs::recursive_directory_iterator(dir, ec))
    if (entry.is_regular_file())
      files.push_back(entry.path());
  if (ec)
    throw Error(Errc::io_error, "cannot read checkpoint directory '" + dir + "': " + ec.message());
  std::sort(files.begin(), files.end());
  std::string buffer;
  for (auto& path : files) {
    auto rel = fs::relative(path, dir).string();
    auto what = "sending checkpoint file '" + path.string() + "' to the driver";
    std::ifstream in(path, std::ios::binary);
    if (!in)
      throw Error(Errc::io_error, "cannot open checkpoint file '" + path.string() + "'");
    uint64_t offset = 0;
    uint32_t crc = 0;
    do {
      buffer.resize(kChunkBytes);
      in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
      buffer.resize(static_cast<size_t>(in.gcount()));
      if (buffer.empty() && offset > 0)
        break;
      crc = crc32_of(buffer.data(), buffer.size(), crc);
      offset = ask<uint64_t>(sys, trainer, timeout, what, upload_atom::value, name, rel, offset, buffer);
    } while (buffer.size() == kChunkBytes);
    if (in.bad())
      throw Error(Errc::io_error, "cannot read checkpoint file '" + path.string() + "'");
    ask<bool>(sys, trainer, timeout, what, upload_atom::value, name, rel, offset, crc);
  }
  return ask<std::string>(sys, trainer, timeout, "ending the upload of checkpoint '" + dir + "'",
                          upload_atom::value, name);
}

namespace {

/// Fetches `file` of the driver's checkpoint `ckpt` into `local_dir`, checked against its
/// digest. The bytes go to a temporary name first: the file exists under its own name
/// only once complete and checked.
void fetch_file(caf::actor_system& sys, const caf::actor& trainer, const Checkpoint& ckpt,
                const std::string& local_dir, const std::string& file, const FileDigest& digest,
                std::chrono::milliseconds timeout) {
  auto path = file_path(local_dir, file);
  auto part = path + ".part-" + std::to_string(::getpid());
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  auto cannot_write = [&] {
    fs::remove(part, ec);
    return Error(Errc::io_error, "cannot write '" + path + "' (a local copy of checkpoint '" +
                                   ckpt.path() + "')");
  };
  std::ofstream out(part, std::ios::binary | std::ios::trunc);
  if (!out)
    throw cannot_write();
  auto what = "fetching '" + file + "' of checkpoint '" + ckpt.path() + "' from the driver";
  uint64_t offset = 0;
  uint32_t crc = 0;
  try {
    while (offset < digest.size) {
      auto bytes = ask<std::string>(sys, trainer, timeout, what, fetch_atom::value, ckpt.path(), file, offset);
      if (bytes.empty())
        break;
      crc = crc32_of(bytes.data(), bytes.size(), crc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      offset += bytes.size();
    }
  } catch (...) {
    fs::remove(part, ec);
    throw;
  }
  out.close();
  if (!out)
    throw cannot_write();
  if (offset != digest.size || crc != digest.crc32) {
    fs::remove(part, ec);
    throw Error(Errc::corrupt_checkpoint,
                "checkpoint '" + ckpt.path() + "': file '" + file + "' arrived with " +
                  std::to_string(offset) + " bytes (CRC-32 " + std::to_string(crc) + "), its metadata says " +
                  std::to_string(digest.size) + " bytes (CRC-32 " + std::to_string(digest.crc32) + ")");
  }
  fs::rename(part, path, ec);
  if (ec)
    throw cannot_write();
}

/// Whether `file` is one rank's shard of a sharded checkpoint (`shards/rank_<r>.pt`).
bool is_rank_shard(const Checkpoint& ckpt, const std::string& file) {
  if (!ckpt.has_file(kLayoutFile))
    return false;
  for (int64_t r = 0; r < ckpt.metadata().world_size; ++r)
    if (file == shard_file(r))
      return true;
  return false;
}

} // namespace

Checkpoint download(caf::actor_system& sys, const caf::actor& trainer, const Checkpoint& ckpt,
                    const std::string& local_dir, std::chrono::milliseconds timeout, Fetch fetch) {
  unregister_remote_files(local_dir);
  std::error_code ec;
  fs::remove_all(local_dir, ec);
  fs::create_directories(local_dir, ec);
  bool on_demand = false;
  for (auto& [file, digest] : ckpt.metadata().files) {
    if (fetch == Fetch::shards_on_demand && is_rank_shard(ckpt, file)) {
      on_demand = true;
      continue;
    }
    fetch_file(sys, trainer, ckpt, local_dir, file, digest, timeout);
  }
  write_file_atomic((fs::path(local_dir) / kMetadataFile).string(), to_json(ckpt.metadata()));
  auto copy = Checkpoint::open(local_dir);
  if (on_demand) {
    // One fetch at a time per copy: two threads that name the same file fetch it once.
    auto mtx = std::make_shared<std::mutex>();
    register_remote_files(copy.path(), [&sys, trainer, ckpt, local_dir, timeout, mtx](const std::string& file) {
      std::lock_guard<std::mutex> guard(*mtx);
      std::error_code ec;
      if (fs::exists(file_path(local_dir, file), ec))
        return;
      fetch_file(sys, trainer, ckpt, local_dir, file, ckpt.metadata().files.at(file), timeout);
    });
  }
  return copy;
}

void forget_copy(const std::string& local_dir) {
  unregister_remote_files(local_dir);
  std::error_code ec;
  fs::remove_all(local_dir, ec);
}

// -- Receiver -----------------------------------------------------------------------------

Receiver::~Receiver() {
  for (auto& [path, in] : open_)
    ::close(in.fd);
  std::error_code ec;
  for (auto& dir : dirs_)
    fs::remove_all(dir, ec); // committed uploads were moved away already
}

Receiver::Incoming& Receiver::incoming(const std::string& dir, const std::string& file) {
  auto path = file_path(dir, file);
  auto i = open_.find(path);
  if (i != open_.end())
    return i->second;
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  dirs_.insert(dir);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    throw Error(Errc::io_error, "cannot create '" + path + "': " + std::strerror(errno));
  return open_[path] = Incoming{fd, 0, 0};
}

uint64_t Receiver::write(const std::string& run_dir, const std::string& name, const std::string& file,
                         uint64_t offset, const std::string& bytes) {
  auto dir = upload_dir(run_dir, name);
  auto& in = incoming(dir, file);
  if (offset != in.size)
    throw Error(Errc::io_error, "checkpoint upload '" + name + "': piece of '" + file + "' at byte " +
                                  std::to_string(offset) + ", expected byte " + std::to_string(in.size));
  size_t done = 0;
  while (done < bytes.size()) {
    auto n = ::write(in.fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      throw Error(Errc::io_error, "cannot write '" + file_path(dir, file) + "': " + std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  in.crc = crc32_of(bytes.data(), bytes.size(), in.crc);
  in.size += bytes.size();
  return in.size;
}

void Receiver::finish_file(const std::string& run_dir, const std::string& name, const std::string& file,
                           uint64_t size, uint32_t crc) {
  auto dir = upload_dir(run_dir, name);
  auto& in = incoming(dir, file); // a file of no bytes had no piece
  auto path = file_path(dir, file);
  auto got_size = in.size;
  auto got_crc = in.crc;
  ::close(in.fd);
  open_.erase(path);
  if (got_size != size || got_crc != crc)
    throw Error(Errc::corrupt_checkpoint,
                "checkpoint upload '" + name + "': '" + file + "' arrived with " + std::to_string(got_size) +
                  " bytes (CRC-32 " + std::to_string(got_crc) + "), the sender had " + std::to_string(size) +
                  " bytes (CRC-32 " + std::to_string(crc) + ")");
}

std::string Receiver::finish(const std::string& run_dir, const std::string& name) {
  auto dir = upload_dir(run_dir, name);
  auto prefix = dir + "/";
  for (auto& [path, in] : open_)
    if (path.compare(0, prefix.size(), prefix) == 0)
      throw Error(Errc::io_error, "checkpoint upload '" + name + "': '" + path.substr(prefix.size()) +
                                    "' is incomplete");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    throw Error(Errc::io_error, "cannot create '" + dir + "': " + ec.message());
  dirs_.insert(dir);
  return dir;
}

std::string read_chunk(const std::string& path, uint64_t offset) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw Error(Errc::io_error, "cannot open '" + path + "': " + std::strerror(errno));
  std::string out(kChunkBytes, '\0');
  size_t got = 0;
  while (got < out.size()) {
    auto n = ::pread(fd, out.data() + got, out.size() - got, static_cast<off_t>(offset + got));
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      auto err = errno;
      ::close(fd);
      throw Error(Errc::io_error, "cannot read '" + path + "': " + std::strerror(err));
    }
    if (n == 0)
      break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(got);
  return out;
}

} // namespace caftrain::transfer
