// Checkpoints without a shared filesystem. A worker process that does not see its
// driver's storage (a node of a cluster without NFS) sends the files of every checkpoint
// it reports to the run's I/O actor as messages, and fetches the checkpoint it resumes
// from the same way; a worker that sees the storage (threads, worker processes of the
// driver's machine, nodes on a shared filesystem) reads and writes it directly.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>

#include <caf/actor.hpp>
#include <caf/atom.hpp>
#include <caf/fwd.hpp>

#include "checkpoint/checkpoint.hpp"

namespace caftrain::transfer {

/// Worker -> the run's file gate (`file_gate` of trainer_actor.hpp, which hands them to
/// the run's I/O actor):
///   (upload_atom, upload, file, offset, bytes) -> uint64_t: the next piece of a file;
///   (upload_atom, upload, file, size, crc32) -> bool: the file is complete and checked;
///   (upload_atom, upload) -> string: the upload is complete; its directory on the driver.
using upload_atom = caf::atom_constant<caf::atom("ckupload")>;
/// Worker -> file gate: (fetch_atom, checkpoint path, file, offset) -> string: a piece of a
/// file of a checkpoint the trainer handed to its workers.
using fetch_atom = caf::atom_constant<caf::atom("ckfetch")>;

/// Bytes per message, both ways.
constexpr uint64_t kChunkBytes = 4u << 20;

/// Driver: writes a fresh storage id into `run_dir` and returns it; "" when it cannot
/// (then every worker process sends its files as messages).
std::string mark_storage(const std::string& run_dir);

/// Worker process: whether it sees its driver's storage, i.e. `run_dir` holds the id the
/// driver wrote, and `$CAFTRAIN_SHARED_STORAGE` is not "0" (which forces messages).
bool sees_storage(const std::string& run_dir, const std::string& id);

/// This process's own scratch directory for checkpoints it stages or fetches
/// (`<tmp>/caftrain-worker-<pid>`); a worker process removes it when it ends.
std::string local_root();

/// Worker: sends every file under `dir` to the run's file gate `gate` as upload `name` (letters, digits,
/// '-', '_', '.'); returns the directory on the driver's side that now holds them.
/// Throws `Error` naming the file when a message fails or the driver refuses a piece.
std::string upload(caf::actor_system& sys, const caf::actor& gate, const std::string& dir,
                   const std::string& name, std::chrono::milliseconds timeout);

/// Which files `download` fetches before it returns.
enum class Fetch {
  /// Every file.
  all,
  /// Every file but the rank shards of a sharded checkpoint (`shards/rank_<r>.pt`): each
  /// arrives (checked) when the loading code first names it (`Checkpoint::file`), so that
  /// a rank fetches only the shards that hold its elements, not the whole model and
  /// optimizer state of every rank.
  shards_on_demand,
};

/// Worker: fetches the files of the committed checkpoint `ckpt` (a path on the driver)
/// into `local_dir` (all, or all but the rank shards: `fetch`), checking each file's size
/// and CRC-32 against its metadata, and opens the copy. Throws
/// `Error(corrupt_checkpoint)` for a file that arrives altered, then or on demand. The
/// copy must stay reachable through `sys` and `gate` (the run's file gate) while files may be named, and
/// be removed with `forget_copy`.
Checkpoint download(caf::actor_system& sys, const caf::actor& gate, const Checkpoint& ckpt,
                    const std::string& local_dir, std::chrono::milliseconds timeout,
                    Fetch fetch = Fetch::all);

/// Removes a copy `download` made; its files no longer arrive on demand.
void forget_copy(const std::string& local_dir);

/// The I/O actor's side of uploads: files arrive in order into
/// `<run_dir>/.staging/upload-<name>/`, each checked (size, CRC-32) when complete.
/// Uploads that never completed, or were never committed, are removed with it.
class Receiver {
 public:
  Receiver() = default;
  Receiver(const Receiver&) = delete;
  Receiver& operator=(const Receiver&) = delete;
  ~Receiver();

  /// Appends `bytes` at `offset` (the file's size so far) to `file` of upload `name`;
  /// returns the file's new size.
  uint64_t write(const std::string& run_dir, const std::string& name, const std::string& file,
                 uint64_t offset, const std::string& bytes);

  /// Checks that `file` has `size` bytes with CRC-32 `crc`; throws `Error` otherwise
  /// (and the upload stays incomplete).
  void finish_file(const std::string& run_dir, const std::string& name, const std::string& file,
                   uint64_t size, uint32_t crc);

  /// Ends upload `name` (every file complete); returns its directory.
  std::string finish(const std::string& run_dir, const std::string& name);

 private:
  struct Incoming {
    int fd = -1;
    uint64_t size = 0;
    uint32_t crc = 0;
  };

  Incoming& incoming(const std::string& dir, const std::string& file);
  void close_all(const std::string& dir);

  std::map<std::string, Incoming> open_; // by the file's full path
  std::set<std::string> dirs_;           // upload directories this receiver made
};

/// Up to kChunkBytes of the file `path` from `offset` ("" at its end).
std::string read_chunk(const std::string& path, uint64_t offset);

/// Whether `file` is a relative path inside its directory (no "..", not absolute).
bool safe_relative(const std::string& file);

} // namespace caftrain::transfer
