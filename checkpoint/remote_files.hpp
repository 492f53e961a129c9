// Local copies of checkpoints whose files arrive on demand. Internal (not in caftrain.hpp).
#pragma once

#include <functional>
#include <string>

namespace caftrain {

/// Fetches file `name` (a relative path the checkpoint's metadata lists) into the copy,
/// checked against its digest, or throws.
using FileFetcher = std::function<void(const std::string& name)>;

/// Declares the directory `dir` a local copy of a checkpoint whose files arrive when
/// first named: `Checkpoint::file` calls `fetch` for a listed file the directory lacks,
/// and `Checkpoint::validate` skips such files (the fetcher checks each as it arrives).
/// A worker process without its driver's storage fetches this way the rank shards of a
/// sharded checkpoint, so that each rank transfers only the shards its elements are in.
void register_remote_files(const std::string& dir, FileFetcher fetch);

/// Forgets the copy at `dir` (before it is removed).
void unregister_remote_files(const std::string& dir);

/// The fetcher of the copy at `dir`; empty when `dir` is not one.
FileFetcher remote_files(const std::string& dir);

} // namespace caftrain
