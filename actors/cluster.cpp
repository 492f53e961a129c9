#include "actors/cluster.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/messages.hpp"
#include "actors/network.hpp"
#include "actors/worker_process.hpp"
#include "core/error.hpp"

namespace caftrain {

namespace fs = std::filesystem;

void add_cluster_message_types(caf::actor_system_config& cfg) {
  cfg.add_message_type<JoinRequest>("caftrain::JoinRequest");
  cfg.add_message_type<ClientHello>("caftrain::ClientHello");
  cfg.add_message_type<ClusterHandle>("caftrain::ClusterHandle");
  cfg.add_message_type<NodeView>("caftrain::NodeView");
  cfg.add_message_type<RunView>("caftrain::RunView");
  cfg.add_message_type<ClusterStatus>("caftrain::ClusterStatus");
  cfg.add_message_type<JobSpec>("caftrain::JobSpec");
  cfg.add_message_type<JobView>("caftrain::JobView");
  cfg.add_message_type<JobLogs>("caftrain::JobLogs");
}

// -- tokens and addresses ----------------------------------------------------------------

std::string default_address() {
  const char* address = std::getenv("CAFTRAIN_ADDRESS");
  return address ? address : "";
}

std::string default_token_file() {
  if (const char* path = std::getenv("CAFTRAIN_TOKEN_FILE"); path && *path)
    return path;
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : "/tmp") + "/.caftrain/cluster_token";
}

namespace {

const char* kTokenHelp = "copy the file `caftrain head` wrote (by default ~/.caftrain/cluster_token "
                         "on the head's machine) and name it with --token-file or "
                         "CAFTRAIN_TOKEN_FILE";

} // namespace

std::string read_token(const std::string& given, bool create) {
  auto path = given.empty() ? default_token_file() : given;
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    if (!create)
      throw Error(Errc::invalid_config, "the cluster token file '" + path + "' does not exist; " + kTokenHelp);
    std::error_code ec;
    fs::create_directories(fs::path(path).parent_path(), ec);
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
      throw Error(Errc::io_error, "cannot create the cluster token file '" + path + "': " + std::strerror(errno));
    auto token = random_hex(48) + "\n";
    auto written = ::write(fd, token.data(), token.size());
    ::fsync(fd);
    ::close(fd);
    if (written != static_cast<ssize_t>(token.size()))
      throw Error(Errc::io_error, "cannot write the cluster token file '" + path + "'");
    spdlog::info("caftrain: wrote a new cluster token to '{}' (nodes and drivers need a copy)", path);
    return read_token(path, false);
  }
  if ((info.st_mode & 077) != 0)
    throw Error(Errc::invalid_config, "the cluster token file '" + path +
                                        "' can be read by other users; run `chmod 600 " + path + "`");
  std::ifstream in(path);
  std::string token;
  std::getline(in, token);
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back())))
    token.pop_back();
  if (token.empty())
    throw Error(Errc::invalid_config, "the cluster token file '" + path + "' is empty; " + kTokenHelp);
  return token;
}

std::pair<std::string, uint16_t> parse_address(const std::string& address) {
  auto colon = address.rfind(':');
  auto bad = [&] {
    return Error(Errc::invalid_argument, "the address '" + address +
                                           "' is not of the form HOST:PORT (e.g. 127.0.0.1:6380)");
  };
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size())
    throw bad();
  try {
    size_t used = 0;
    auto port = std::stoi(address.substr(colon + 1), &used);
    if (used != address.size() - colon - 1 || port <= 0 || port > 65535)
      throw bad();
    return {address.substr(0, colon), static_cast<uint16_t>(port)};
  } catch (const std::logic_error&) {
    throw bad();
  }
}

std::string random_hex(size_t n) {
  std::random_device rd;
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i)
    out += hex[rd() % 16];
  return out;
}

caf::expected<caf::actor> reach(caf::actor_system& system, const std::string& host, uint16_t port,
                                std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto found = net::remote_actor(system, host, port);
    if (found || std::chrono::steady_clock::now() > deadline)
      return found;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

std::string process_label() {
  return process_label(::getpid());
}

std::string process_label(int64_t pid) {
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return std::string(host) + " pid " + std::to_string(pid);
}

// -- drivers ---------------------------------------------------------------------------------

namespace {

/// The cluster of each actor system, held weakly: proxies must not outlive their system.
struct Connection {
  caf::weak_actor_ptr head;
  caf::weak_actor_ptr pool;
  std::string host;
};

std::mutex connections_mtx;
std::map<const caf::actor_system*, Connection> connections;

} // namespace

void connect(caf::actor_system& system, const std::string& address, ClusterOptions options) {
  if (is_worker_process())
    return;
  auto [host, port] = parse_address(address);
  auto token = read_token(options.token_file);
  auto reached = reach(system, host, port, options.timeout);
  if (!reached)
    throw Error(Errc::unavailable, "cannot reach the cluster head at " + address + ": " +
                                     system.render(reached.error()) + tls_hint(system) +
                                     "; start one with `caftrain head --port " + std::to_string(port) + "`");
  auto head = std::move(*reached);
  caf::scoped_actor self{system};
  std::optional<ClusterHandle> handle;
  std::string refused;
  self->request(head, options.timeout, connect_atom::value, ClientHello{kClusterProtocol, token, process_label()})
    .receive([&](ClusterHandle& h) { handle = std::move(h); },
             [&](caf::error& err) { refused = to_run_error(err).message; });
  if (!handle)
    throw Error(Errc::invalid_config, "the cluster head at " + address + " refused this driver: " + refused);
  std::lock_guard<std::mutex> guard(connections_mtx);
  connections[&system] = Connection{caf::actor_cast<caf::weak_actor_ptr>(handle->head),
                                    caf::actor_cast<caf::weak_actor_ptr>(handle->pool),
                                    advertise_as(options.host, host)};
  spdlog::info("caftrain: connected to the cluster at {}", address);
}

std::optional<ClusterHandle> cluster_of(caf::actor_system& system) {
  std::lock_guard<std::mutex> guard(connections_mtx);
  auto i = connections.find(&system);
  if (i == connections.end())
    return std::nullopt;
  auto head = i->second.head.lock();
  auto pool = i->second.pool.lock();
  if (!head || !pool || head->home_system != &system) {
    connections.erase(i); // the head is gone, or this is another system at the same address
    return std::nullopt;
  }
  return ClusterHandle{caf::actor_cast<caf::actor>(head), caf::actor_cast<caf::actor>(pool)};
}

std::string advertised_host(caf::actor_system& system) {
  if (!cluster_of(system))
    return "";
  std::lock_guard<std::mutex> guard(connections_mtx);
  return connections[&system].host;
}

std::string advertise_as(const std::string& given, const std::string& head_host) {
  if (!given.empty())
    return given;
  if (head_host == "localhost" || head_host.rfind("127.", 0) == 0 || head_host == "::1")
    return "127.0.0.1";
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

caf::actor system_pool(caf::actor_system& system) {
  if (auto cluster = cluster_of(system))
    return cluster->pool;
  return local_pool(system);
}

} // namespace caftrain
