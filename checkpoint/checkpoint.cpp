#include "checkpoint/checkpoint.hpp"

#include <unistd.h>

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/files.hpp"
#include "checkpoint/remote_files.hpp"
#include "checkpoint/sharded.hpp"
#include "core/error.hpp"
#include "core/metrics_json.hpp"

namespace caftrain {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw Error(Errc::corrupt_checkpoint, "checkpoint '" + path + "': " + what);
}

/// What a file looked like when it passed a full validation: size and mtime.
struct FileStamp {
  int64_t size = -1;
  int64_t mtime_ns = -1;
  bool operator==(const FileStamp& o) const {
    return size == o.size && mtime_ns == o.mtime_ns;
  }
};

FileStamp stamp_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return {};
  return {static_cast<int64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

/// Checkpoints this process validated in full: path -> (commit time, file stamps).
struct Validated {
  double created_at = 0;
  std::vector<FileStamp> stamps; // metadata.json first, then the files in name order
};

std::mutex validated_mtx;
std::map<std::string, Validated> validated;
std::atomic<int64_t> full_validation_count{0};

std::vector<FileStamp> stamps_of(const Checkpoint& ckpt) {
  // Paths, not Checkpoint::file: a file of a copy that arrives on demand is not fetched
  // here (its stamp changes when it arrives, so the next check reads it).
  std::vector<FileStamp> stamps;
  stamps.push_back(stamp_of((fs::path(ckpt.path()) / kMetadataFile).string()));
  for (auto& item : ckpt.metadata().files)
    stamps.push_back(stamp_of((fs::path(ckpt.path()) / item.first).string()));
  return stamps;
}

/// Copies whose files arrive on demand, by normalised directory.
std::mutex remote_mtx;
std::map<std::string, FileFetcher> remote_copies;

std::string directory_key(const std::string& dir) {
  auto p = fs::path(dir).lexically_normal();
  if (!p.has_filename())
    p = p.parent_path(); // "a/b/" and "a/b" are one directory
  return p.string();
}

} // namespace

// -- metadata JSON ----------------------------------------------------------------------

std::string to_json(const CheckpointMetadata& m) {
  json files = json::object();
  for (auto& [name, d] : m.files)
    files[name] = {{"size", d.size}, {"crc32", d.crc32}};
  json j = {{"format_version", m.format_version},
            {"run", m.run},
            {"attempt", m.attempt},
            {"report_index", m.report_index},
            {"epoch", m.epoch},
            {"global_step", m.global_step},
            {"metrics", metrics_to_json(m.metrics)},
            {"world_size", m.world_size},
            {"strategy", m.strategy},
            {"created_at", m.created_at},
            {"files", files}};
  return j.dump(2);
}

CheckpointMetadata metadata_from_json(const std::string& text, const std::string& origin) {
  CheckpointMetadata m;
  try {
    auto j = json::parse(text);
    m.format_version = j.at("format_version").get<int>();
    if (m.format_version > kCheckpointFormatVersion)
      corrupt(origin, "format version " + std::to_string(m.format_version) +
                        " is newer than this build reads (" +
                        std::to_string(kCheckpointFormatVersion) + "); upgrade caftrain");
    m.run = j.value("run", "");
    m.attempt = j.value("attempt", int64_t{0});
    m.report_index = j.value("report_index", int64_t{-1});
    m.epoch = j.value("epoch", int64_t{0});
    m.global_step = j.value("global_step", int64_t{0});
    m.metrics = metrics_from_json(j.value("metrics", json::object()));
    m.world_size = j.value("world_size", int64_t{1});
    m.strategy = j.value("strategy", "");
    m.created_at = j.value("created_at", 0.0);
    for (auto& [name, d] : j.at("files").items())
      m.files[name] = FileDigest{d.at("size").get<uint64_t>(), d.at("crc32").get<uint32_t>()};
  } catch (const json::exception& e) {
    corrupt(origin, std::string("metadata is not valid (") + e.what() + ")");
  } catch (const Error& e) {
    if (e.code() == Errc::corrupt_checkpoint)
      throw;
    corrupt(origin, std::string("metadata is not valid (") + e.what() + ")");
  }
  return m;
}

// -- staged files ---------------------------------------------------------------------------

void write_staged_digests(const std::string& dir, const std::map<std::string, FileDigest>& digests,
                          bool synced) {
  json files = json::object();
  for (auto& [name, d] : digests)
    files[name] = {{"size", d.size}, {"crc32", d.crc32}};
  json j = {{"synced", synced}, {"files", files}};
  write_file_atomic((fs::path(dir) / kStagedDigestsFile).string(), j.dump());
}

void write_staged_files(const std::string& dir, const CheckpointFiles& files, bool sync) {
  std::map<std::string, FileDigest> digests;
  for (auto& [name, source] : files) {
    auto path = fs::path(dir) / name;
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
    if (ec)
      throw Error(Errc::io_error, "cannot create '" + path.parent_path().string() + "': " + ec.message());
    auto written = write_file_streamed(path.string(), source, sync);
    digests[name] = FileDigest{written.size, written.crc32};
  }
  write_staged_digests(dir, digests, sync);
}

namespace {

/// The digests file of staging directory `dir`, if it has a readable one.
std::optional<std::pair<std::map<std::string, FileDigest>, bool>> read_staged_digests(const std::string& dir) {
  auto path = fs::path(dir) / kStagedDigestsFile;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    return std::nullopt;
  auto bytes = read_file(path.string());
  auto j = json::parse(bytes.begin(), bytes.end(), nullptr, false);
  if (!j.is_object() || !j.contains("files") || !j["files"].is_object())
    return std::nullopt; // the files are read instead
  std::map<std::string, FileDigest> digests;
  try {
    for (auto& [name, d] : j["files"].items())
      digests[name] = FileDigest{d.at("size").get<uint64_t>(), d.at("crc32").get<uint32_t>()};
  } catch (const json::exception&) {
    return std::nullopt;
  }
  return std::make_pair(std::move(digests), j.value("synced", false));
}

} // namespace

// -- Checkpoint ---------------------------------------------------------------------------

Checkpoint Checkpoint::from_directory(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec))
    throw Error(Errc::invalid_argument, "Checkpoint::from_directory: '" + path +
                                          "' is not a directory; write the checkpoint files "
                                          "into a directory first");
  if (fs::exists(fs::path(path) / kMetadataFile, ec))
    return open(path);
  Checkpoint result;
  result.path_ = path;
  return result;
}

Checkpoint Checkpoint::open(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec))
    corrupt(path, "no such directory");
  auto meta = (fs::path(path) / kMetadataFile).string();
  if (!fs::exists(meta, ec))
    corrupt(path, std::string("has no ") + kMetadataFile +
                    "; it is incomplete (a save was interrupted) or not a checkpoint");
  auto bytes = read_file(meta);
  Checkpoint result;
  result.path_ = path;
  result.metadata_ = metadata_from_json(std::string(bytes.begin(), bytes.end()), path);
  result.committed_ = true;
  return result;
}

std::string Checkpoint::file(const std::string& name) const {
  auto p = (fs::path(path_) / name).string();
  if (committed_ && metadata_.files.count(name)) {
    std::error_code ec;
    if (!fs::exists(p, ec))
      if (auto fetch = remote_files(path_))
        fetch(name); // a copy whose files arrive on demand
  }
  return p;
}

bool Checkpoint::has_file(const std::string& name) const {
  if (!committed_) {
    std::error_code ec;
    return fs::is_regular_file(fs::path(path_) / name, ec);
  }
  return metadata_.files.count(name) > 0;
}

void Checkpoint::validate() const {
  if (!committed_)
    corrupt(path_, "is not committed (it has no metadata)");
  auto meta = (fs::path(path_) / kMetadataFile).string();
  std::error_code ec;
  if (!fs::is_regular_file(meta, ec))
    corrupt(path_, std::string(kMetadataFile) + " is missing");
  auto bytes = read_file(meta);
  auto current = metadata_from_json(std::string(bytes.begin(), bytes.end()), path_);
  if (current.files.size() != metadata_.files.size() || current.report_index != metadata_.report_index)
    corrupt(path_, std::string(kMetadataFile) + " changed since the checkpoint was opened");
  auto on_demand = remote_files(path_);
  for (auto& [name, digest] : metadata_.files) {
    auto p = (fs::path(path_) / name).string();
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) {
      if (on_demand)
        continue; // not fetched (yet): checked when it arrives
      corrupt(path_, "file '" + name + "' is missing");
    }
    auto size = fs::file_size(p, ec);
    if (ec || size != digest.size)
      corrupt(path_, "file '" + name + "' has " + std::to_string(size) + " bytes, expected " +
                       std::to_string(digest.size) + " (truncated or overwritten)");
    if (crc32_of_file(p) != digest.crc32)
      corrupt(path_, "file '" + name + "' fails its CRC-32 check (the data was altered)");
  }
  ++full_validation_count;
  auto stamps = stamps_of(*this);
  std::lock_guard<std::mutex> guard(validated_mtx);
  validated[path_] = {metadata_.created_at, std::move(stamps)};
}

void Checkpoint::validate_once() const {
  if (committed_) {
    std::optional<Validated> seen;
    {
      std::lock_guard<std::mutex> guard(validated_mtx);
      auto it = validated.find(path_);
      if (it != validated.end())
        seen = it->second;
    }
    if (seen && seen->created_at == metadata_.created_at && seen->stamps == stamps_of(*this))
      return;
  }
  validate();
}

void register_remote_files(const std::string& dir, FileFetcher fetch) {
  std::lock_guard<std::mutex> guard(remote_mtx);
  remote_copies[directory_key(dir)] = std::move(fetch);
}

void unregister_remote_files(const std::string& dir) {
  std::lock_guard<std::mutex> guard(remote_mtx);
  remote_copies.erase(directory_key(dir));
}

FileFetcher remote_files(const std::string& dir) {
  std::lock_guard<std::mutex> guard(remote_mtx);
  if (remote_copies.empty())
    return {};
  auto it = remote_copies.find(directory_key(dir));
  return it == remote_copies.end() ? FileFetcher() : it->second;
}

int64_t Checkpoint::full_validations() noexcept {
  return full_validation_count.load();
}

StateDict Checkpoint::model_state_dict() const {
  if (has_file("model.pt"))
    return load_state_dict_file(file("model.pt"));
  if (has_file(kLayoutFile))
    return consolidate(*this).model; // sharded: put the ranks' shards back together
  corrupt(path_, "holds neither model.pt nor a sharded layout; it has no model state");
}

// -- CheckpointWriter ---------------------------------------------------------------------

CheckpointWriter::CheckpointWriter(std::string final_path) : final_(std::move(final_path)) {
  auto target = fs::path(final_);
  auto parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec)
    throw Error(Errc::io_error, "cannot create '" + parent.string() + "': " + ec.message());
  staging_ = (parent / (".staging-" + target.filename().string() + "-" +
                        std::to_string(::getpid()) + "-" +
                        std::to_string(std::chrono::steady_clock::now().time_since_epoch().count())))
               .string();
  fs::create_directories(staging_, ec);
  if (ec)
    throw Error(Errc::io_error, "cannot create '" + staging_ + "': " + ec.message());
}

CheckpointWriter::~CheckpointWriter() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
}

void CheckpointWriter::fault(const char* step) const {
  if (fault_)
    fault_(step);
}

void CheckpointWriter::add_file(const std::string& name, const std::vector<char>& bytes) {
  auto p = fs::path(staging_) / name;
  std::error_code ec;
  fs::create_directories(p.parent_path(), ec);
  // The staging directory is private until commit: no temporary name needed here, and the
  // fsync waits for commit, so that the files' writeback overlaps.
  write_file_started(p.string(), bytes);
  files_[name] = FileDigest{bytes.size(), crc32_of(bytes.data(), bytes.size())};
  unsynced_.insert(name);
}

void CheckpointWriter::add_file(const std::string& name, const std::string& text) {
  add_file(name, std::vector<char>(text.begin(), text.end()));
}

void CheckpointWriter::add_existing(const std::string& name) {
  auto p = (fs::path(staging_) / name).string();
  fsync_path(p);
  std::error_code ec;
  auto size = fs::file_size(p, ec);
  if (ec)
    throw Error(Errc::io_error, "checkpoint file '" + p + "' is missing: " + ec.message());
  files_[name] = FileDigest{size, crc32_of_file(p)};
}

void CheckpointWriter::add_directory(const std::string& source) {
  std::error_code ec;
  for (auto& entry : fs::recursive_directory_iterator(source, ec)) {
    if (!entry.is_regular_file())
      continue;
    auto rel = fs::relative(entry.path(), source).string();
    if (rel == kMetadataFile)
      continue;
    add_file(rel, read_file(entry.path().string()));
  }
  if (ec)
    throw Error(Errc::io_error, "cannot read checkpoint source '" + source + "': " + ec.message());
}

void CheckpointWriter::move_directory(const std::string& source) {
  std::error_code ec;
  if (!fs::is_directory(source, ec))
    throw Error(Errc::io_error, "checkpoint source '" + source + "' is not a directory");
  auto staged = read_staged_digests(source);
  std::vector<fs::path> files;
  for (auto& entry : fs::recursive_directory_iterator(source, ec))
    if (entry.is_regular_file())
      files.push_back(entry.path());
  for (auto& file : files) {
    auto rel = fs::relative(file, source).string();
    if (rel == kMetadataFile || rel == kStagedDigestsFile)
      continue;
    auto target = fs::path(staging_) / rel;
    fs::create_directories(target.parent_path(), ec);
    if (::rename(file.c_str(), target.c_str()) != 0) {
      add_file(rel, read_file(file.string())); // another file system: copy
      continue;
    }
    auto known = staged ? staged->first.find(rel) : std::map<std::string, FileDigest>::iterator();
    auto size = fs::file_size(target, ec);
    if (staged && known != staged->first.end() && !ec && size == known->second.size) {
      files_[rel] = known->second; // its writer's digest, of the bytes it wrote
      if (!staged->second)
        unsynced_.insert(rel);
    } else {
      add_existing(rel);
    }
  }
  fs::remove_all(source, ec);
}

Checkpoint CheckpointWriter::commit(CheckpointMetadata metadata) {
  fault("files");
  metadata.files = files_;
  metadata.format_version = kCheckpointFormatVersion;
  metadata.created_at =
    std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  write_file_atomic((fs::path(staging_) / kMetadataFile).string(), to_json(metadata));
  // Every file's content not made durable yet (their writeback started in add_file; the
  // others' writers, or add_existing, fsynced them), then the entries of the
  // subdirectories (sharded files) and of the staging directory.
  for (auto& name : unsynced_)
    fsync_path((fs::path(staging_) / name).string());
  for (auto& entry : fs::recursive_directory_iterator(staging_))
    if (entry.is_directory())
      fsync_path(entry.path().string());
  fsync_path(staging_);
  fault("metadata");
  std::error_code ec;
  if (fs::exists(final_, ec))
    throw Error(Errc::io_error, "checkpoint '" + final_ +
                                  "' already exists; persisted checkpoints are never overwritten");
  if (::rename(staging_.c_str(), final_.c_str()) != 0)
    throw Error(Errc::io_error, "cannot rename '" + staging_ + "' to '" + final_ + "': " +
                                  std::strerror(errno));
  committed_ = true;
  auto parent = fs::path(final_).parent_path();
  fsync_path(parent.empty() ? "." : parent.string());
  fault("rename");
  return Checkpoint::open(final_);
}

} // namespace caftrain
