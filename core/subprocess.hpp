// Child processes: started with posix_spawn (safe in a process that has threads, unlike
// fork), waited for, and their end described in words.
#pragma once

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

namespace caftrain {

/// Where a child's output goes and where it runs.
struct SpawnOptions {
  /// A file that gets the child's stdout and stderr (appended); "": this process's.
  std::string output = "";
  /// The child's working directory; "": this process's.
  std::string working_dir = "";
};

/// Starts `program` (a path; "/proc/self/exe" is this very binary, even if its file was
/// replaced since) with `argv`, this process's environment with `env` set on top of it
/// (an empty value sets the variable to ""), stdin from /dev/null, and the output and
/// working directory `options` name. Returns the child's pid; throws `Error(unavailable)`
/// naming the program and the reason when it cannot be started.
pid_t spawn_process(const std::string& program, const std::vector<std::string>& argv,
                    const std::map<std::string, std::string>& env, const SpawnOptions& options = {});

/// Blocks until child `pid` ends and returns its wait status (waitpid's), retrying on
/// EINTR; -1 when `pid` is not a child of this process.
int wait_process(pid_t pid);

/// The end of a process in words, from its wait status: "exited with status 3",
/// "was killed by signal 9 (Killed)", "dumped core on signal 11 (Segmentation fault)".
std::string describe_exit(int status);

/// True when the wait status is a normal exit with status 0.
bool exited_cleanly(int status) noexcept;

/// This program's command line, as /proc/self/cmdline holds it.
std::vector<std::string> own_command_line();

} // namespace caftrain
