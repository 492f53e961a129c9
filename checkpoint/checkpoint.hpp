// Checkpoint: a directory of state files plus a metadata file with their checksums.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/state_dict.hpp"
#include "core/config.hpp"

namespace caftrain {

/// Version of the on-disk layout; a reader refuses newer versions by name.
constexpr int kCheckpointFormatVersion = 1;

/// Name of the metadata file in every checkpoint directory.
constexpr const char* kMetadataFile = "metadata.json";

/// Size and CRC-32 of one file of a checkpoint.
struct FileDigest {
  uint64_t size = 0;
  uint32_t crc32 = 0;
};

/// A rank's part of a checkpoint as its snapshot holds it: relative path -> the file's
/// source (serialized when it is written, possibly on another thread).
using CheckpointFiles = std::map<std::string, FileSource>;

/// Name of the digests file a staging directory may carry: the size and CRC-32 of each
/// of its files, as their writer computed them from the bytes it wrote, and whether it
/// fsynced them. `CheckpointWriter::move_directory` takes them from it instead of reading
/// every file again; it is not part of the checkpoint.
constexpr const char* kStagedDigestsFile = ".caftrain_digests.json";

/// Writes `digests` of the files of staging directory `dir` (`synced`: the writer
/// fsynced them) into its digests file.
void write_staged_digests(const std::string& dir, const std::map<std::string, FileDigest>& digests,
                          bool synced);

/// Writes every file of `files` into directory `dir` (each once, its CRC-32 computed as
/// it passes; fsynced with `sync`) with the digests file beside them.
void write_staged_files(const std::string& dir, const CheckpointFiles& files, bool sync);

/// What a checkpoint says about itself (metadata.json).
struct CheckpointMetadata {
  int format_version = kCheckpointFormatVersion;
  /// Run name and the attempt (0-based restarts) that wrote it.
  std::string run;
  int64_t attempt = 0;
  /// Index of the report that persisted it (0-based, counting every report of the run).
  int64_t report_index = -1;
  /// Training progress at the time of saving.
  int64_t epoch = 0;
  int64_t global_step = 0;
  /// Metrics reported with it.
  Metrics metrics;
  /// World size and strategy of the writing run; sharded checkpoints need them to reshard.
  int64_t world_size = 1;
  std::string strategy;
  /// Seconds since the epoch when it was committed.
  double created_at = 0;
  /// Every file of the checkpoint (relative path -> digest), metadata.json excepted.
  std::map<std::string, FileDigest> files;
};

/// A persisted checkpoint: a directory holding state files and `metadata.json`. Opening
/// one reads and checks the metadata; `validate()` also checks every file's size and
/// CRC-32, so truncation and bit flips are refused rather than loaded.
class Checkpoint {
 public:
  // -- constructors -----------------------------------------------------------------

  Checkpoint() = default;

  /// Opens the committed checkpoint at `path`. Throws `Error(corrupt_checkpoint)` when
  /// the metadata is missing (an interrupted save) or unreadable, or has a newer format
  /// version than this build reads.
  static Checkpoint open(const std::string& path);

  /// A checkpoint for `train::report` (Ray's `Checkpoint.from_directory`): any existing
  /// directory of files. When it holds metadata.json it is opened as with `open`;
  /// otherwise it is uncommitted and the trainer commits it when the report persists.
  static Checkpoint from_directory(const std::string& path);

  // -- properties -------------------------------------------------------------------

  const std::string& path() const noexcept {
    return path_;
  }

  const CheckpointMetadata& metadata() const noexcept {
    return metadata_;
  }

  bool valid() const noexcept {
    return !path_.empty();
  }

  /// True when the directory carries metadata.json (it was committed).
  bool committed() const noexcept {
    return committed_;
  }

  /// Full path of `name` inside the checkpoint.
  std::string file(const std::string& name) const;

  bool has_file(const std::string& name) const;

  // -- checks and loading --------------------------------------------------------------

  /// Checks every listed file's size and CRC-32. Throws `Error(corrupt_checkpoint)`
  /// naming the first file that is missing, truncated or altered.
  void validate() const;

  /// `validate()`, unless this process fully validated this checkpoint (same path and
  /// commit time) before and no file changed size or modification time since: then a
  /// `stat` of each file suffices. A restart's workers load what the trainer checked
  /// without reading every byte again.
  void validate_once() const;

  /// Full validations (every file read and CRC-checked) this process has run.
  static int64_t full_validations() noexcept;

  /// The model state dict: `model.pt` (which Python's torch.load reads), or for a sharded
  /// checkpoint the consolidation of every rank's shard.
  StateDict model_state_dict() const;

  /// Serialisation for actor messages (defined in actors/messages.hpp).
  template <class Inspector>
  friend typename Inspector::result_type inspect(Inspector& f, Checkpoint& x);

 private:
  std::string path_;
  CheckpointMetadata metadata_;
  bool committed_ = false;
};

/// Builds a checkpoint in a staging directory beside its destination and commits it
/// atomically: files are written and fsynced, the metadata (with every file's digest)
/// last, then the directory is renamed into place and its parent fsynced. A crash at any
/// moment leaves no directory under the final name, or a complete one.
class CheckpointWriter {
 public:
  /// Fault hook for tests: called with each protocol step's name ("files", "metadata",
  /// "rename"); throwing from it simulates a crash at that point.
  using FaultHook = std::function<void(const std::string& step)>;

  /// Stages a checkpoint that will be committed as `final_path`.
  explicit CheckpointWriter(std::string final_path);

  /// Removes the staging directory unless committed.
  ~CheckpointWriter();

  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  /// The staging directory (write extra files here, then `add_existing`).
  const std::string& staging_dir() const noexcept {
    return staging_;
  }

  /// Writes `bytes` as `name` (a relative path) into the staging directory.
  void add_file(const std::string& name, const std::vector<char>& bytes);
  void add_file(const std::string& name, const std::string& text);

  /// Records a file already written into the staging directory.
  void add_existing(const std::string& name);

  /// Copies every file of the directory `source` (recursively) into the checkpoint.
  void add_directory(const std::string& source);

  /// Moves every file of `source` into the checkpoint (a rename on the same file system,
  /// else a copy) and removes `source`. A file the digests file of `source` lists with
  /// its size is taken with that digest, not read again (nor fsynced again when its
  /// writer did).
  void move_directory(const std::string& source);

  /// Writes metadata.json (with the digests) and renames the directory into place.
  /// Throws `Error(io_error)` when `final_path` already exists.
  Checkpoint commit(CheckpointMetadata metadata);

  void set_fault_hook(FaultHook hook) {
    fault_ = std::move(hook);
  }

 private:
  void fault(const char* step) const;

  std::string final_;
  std::string staging_;
  std::map<std::string, FileDigest> files_;
  /// Files whose writer did not fsync them: `commit` does.
  std::set<std::string> unsynced_;
  FaultHook fault_;
  bool committed_ = false;
};

/// Metadata as JSON text, and back (throws `Error(corrupt_checkpoint)` on bad input).
std::string to_json(const CheckpointMetadata& metadata);
CheckpointMetadata metadata_from_json(const std::string& text, const std::string& origin);

} // namespace caftrain
