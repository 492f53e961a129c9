// A cluster on one machine for the tests: a real `caftrain head` and `caftrain node`
// processes on loopback (CAFTRAIN_CLI), all killed when it goes out of scope.
#pragma once

#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <caf/all.hpp>

#include "actors/cluster.hpp"
#include "actors/torch_trainer.hpp"
#include "core/subprocess.hpp"
#include "helpers.hpp"

namespace caftrain::test {

inline void write_token(const std::string& path, const std::string& token) {
  std::ofstream(path) << token << "\n";
  ::chmod(path.c_str(), 0600);
}

class LocalCluster {
 public:
  using Clock = std::chrono::steady_clock;

  /// Starts a head on 127.0.0.1 with a fresh token in `dir`; `extra` are more options of
  /// `caftrain head` (TLS files, --storage). `address` stays "" when it never listened.
  explicit LocalCluster(const TempDir& dir, std::vector<std::string> extra = {}) {
    token_file = dir / "token";
    write_token(token_file, "the-cluster-token");
    auto address_file = dir / "head-address";
    std::vector<std::string> argv{CAFTRAIN_CLI, "head", "--host", "127.0.0.1", "--port", "0",
                                  "--token-file", token_file, "--address-file", address_file};
    argv.insert(argv.end(), extra.begin(), extra.end());
    head_ = spawn_process(CAFTRAIN_CLI, argv, {});
    auto deadline = Clock::now() + std::chrono::seconds(30);
    while (address.empty() && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::ifstream f(address_file);
      f >> address;
    }
  }

  ~LocalCluster() {
    for (auto& [name, pid] : nodes_)
      stop(pid);
    stop(head_);
  }

  LocalCluster(const LocalCluster&) = delete;
  LocalCluster& operator=(const LocalCluster&) = delete;

  /// Starts `caftrain node --name NAME --cpus CPUS` with `token` (the cluster's file by
  /// default) and `extra` options; returns its pid. Its output goes to `output` ("": the
  /// test's). `env` adds to its environment; a `hidden` directory is one the node and its
  /// worker processes cannot see (see `can_hide`): an empty file system over it.
  pid_t add_node(const std::string& name, int cpus, const std::string& token = "",
                 std::vector<std::string> extra = {}, const std::string& output = "",
                 const std::map<std::string, std::string>& env = {}, const std::string& hidden = "") {
    std::vector<std::string> argv;
    if (!hidden.empty())
      argv = hiding(hidden);
    argv.insert(argv.end(), {CAFTRAIN_CLI, "node", "--head", address, "--name", name, "--cpus",
                             std::to_string(cpus), "--token-file", token.empty() ? token_file : token});
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto pid = spawn_process(argv[0], argv, env, SpawnOptions{output});
    nodes_[name] = pid;
    return pid;
  }

  /// Whether this machine lets a process hide `dir` from itself (a mount namespace of its
  /// own with a tmpfs over it: root, or unprivileged user namespaces, and unshare(1)).
  static bool can_hide(const std::string& dir) {
    auto argv = hiding(dir);
    argv.push_back("true");
    return wait_process(spawn_process(argv[0], argv, {})) == 0;
  }

  /// A command prefix that runs the rest of its command line where `dir` is an empty
  /// tmpfs: another machine's view of a storage path it does not share. The command
  /// keeps its pid (unshare and sh exec it).
  static std::vector<std::string> hiding(const std::string& dir) {
    return {"/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            "mount -t tmpfs caftrain-hidden \"$0\" && exec \"$@\"", dir};
  }

  /// Waits until the head lists `n` nodes (as seen from `sys`, which is connected).
  bool wait_for_nodes(caf::actor_system& sys, size_t n) {
    auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline) {
      if (status(sys).nodes.size() == n)
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  /// Connects `sys` to the head as a driver and waits until it lists `n` nodes.
  bool connect_and_wait(caf::actor_system& sys, size_t n) {
    connect(sys, address, {.token_file = token_file});
    return wait_for_nodes(sys, n);
  }

  /// The head's view, asked from `sys` (connected to it); empty when it does not answer.
  ClusterStatus status(caf::actor_system& sys) {
    ClusterStatus out;
    auto cluster = cluster_of(sys);
    if (!cluster)
      return out;
    caf::scoped_actor self{sys};
    self->request(cluster->head, std::chrono::seconds(5), cluster_status_atom::value)
      .receive([&](ClusterStatus& st) { out = std::move(st); }, [](caf::error&) {});
    return out;
  }

  pid_t node_pid(const std::string& name) {
    return nodes_.at(name);
  }

  pid_t head_pid() const {
    return head_;
  }

  std::string address;
  std::string token_file;

 private:
  static void stop(pid_t pid) {
    if (pid <= 0)
      return;
    ::kill(pid, SIGKILL);
    wait_process(pid);
  }

  pid_t head_ = -1;
  std::map<std::string, pid_t> nodes_;
};

/// A run `name` of 2 worker processes on 2 different nodes (STRICT_SPREAD), stored in `dir`.
inline TorchTrainerOptions two_node_run(const TempDir& dir, const std::string& name) {
  TorchTrainerOptions o;
  o.scaling.num_workers = 2;
  o.scaling.worker_mode = "process";
  o.scaling.placement_strategy = "STRICT_SPREAD";
  o.run.name = name;
  o.run.storage_path = dir.path();
  return o;
}

/// Runs `argv` to its end with its output in `output`; its wait status.
inline int run_to_end(const std::vector<std::string>& argv, const std::string& output,
                      const std::map<std::string, std::string>& env = {}) {
  return wait_process(spawn_process(argv[0], argv, env, SpawnOptions{output}));
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

} // namespace caftrain::test
