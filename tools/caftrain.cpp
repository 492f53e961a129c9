// The `caftrain` command: runs a cluster's head and nodes, and looks at and steers it.
//
//   caftrain head [--port 6380] [--host 0.0.0.0] [--token-file F] [--address-file F]
//   caftrain node --head HOST:PORT [--cpus N] [--gpus M] [--resource NAME=AMOUNT]... [--name ID] [--token-file F]
//   caftrain status --head HOST:PORT [--token-file F]
//   caftrain stop --head HOST:PORT RUN [--token-file F]
//
// A driver joins with `caftrain::connect(system, "HOST:PORT")` (the examples take
// `--address HOST:PORT`). The token file (default ~/.caftrain/cluster_token, written by
// `caftrain head` when missing) must be copied to every node and driver.
#include <unistd.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <spdlog/spdlog.h>

#include "actors/cluster.hpp"
#include "actors/head.hpp"
#include "actors/messages.hpp"
#include "actors/node_agent.hpp"
#include "core/error.hpp"

namespace {

using namespace caftrain;

const char* kUsage =
  "usage:\n"
  "  caftrain head [--port 6380] [--host 0.0.0.0] [--token-file F] [--address-file F]\n"
  "      runs a cluster's head: its node registry, resource pool and run registry\n"
  "  caftrain node --head HOST:PORT [--cpus N] [--gpus M] [--resource NAME=AMOUNT]...\n"
  "                [--name ID] [--token-file F] [--host ADDRESS_DRIVERS_REACH]\n"
  "      joins this machine to the cluster with its resources; runs its worker processes\n"
  "  caftrain status --head HOST:PORT [--token-file F]\n"
  "      lists the nodes, their free resources, the runs and the waiting requests\n"
  "  caftrain stop --head HOST:PORT RUN [--token-file F]\n"
  "      cancels a run of the cluster\n"
  "The cluster token is read from --token-file, else $CAFTRAIN_TOKEN_FILE, else\n"
  "~/.caftrain/cluster_token (the head writes one there when it has none).\n";

[[noreturn]] void usage_error(const std::string& what) {
  std::fprintf(stderr, "caftrain: %s\n%s", what.c_str(), kUsage);
  std::exit(64);
}

/// "--name value" options and positional arguments of one command.
struct Args {
  std::map<std::string, std::vector<std::string>> options;
  std::vector<std::string> positional;

  std::string get(const std::string& name, const std::string& fallback = "") const {
    auto i = options.find(name);
    return i == options.end() ? fallback : i->second.back();
  }
};

Args parse(int argc, char** argv, int first, const std::vector<std::string>& known) {
  Args args;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      args.positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    auto eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      usage_error("--" + name + " needs a value");
    }
    if (std::find(known.begin(), known.end(), name) == known.end())
      usage_error("unknown option --" + name);
    args.options[name].push_back(value);
  }
  return args;
}

double number(const std::string& what, const std::string& text) {
  try {
    size_t used = 0;
    auto v = std::stod(text, &used);
    if (used == text.size() && v >= 0)
      return v;
  } catch (const std::exception&) {
    // below
  }
  usage_error(what + " '" + text + "' is not a non-negative number");
}

/// An actor system for one command; `timeout` is how long a silent peer is kept.
struct System {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;

  explicit System(caf::timespan connection_timeout) {
    caftrain::init(cfg);
    cfg.set("middleman.connection-timeout", connection_timeout);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
};

/// Connects a command to the head; exits with a message when it cannot.
ClusterHandle connect_command(caf::actor_system& sys, const Args& args) {
  auto head = args.get("head");
  if (head.empty())
    usage_error("--head HOST:PORT is required");
  try {
    caftrain::connect(sys, head, {.token_file = args.get("token-file")});
  } catch (const Error& e) {
    std::fprintf(stderr, "caftrain: %s\n", e.what());
    std::_Exit(2);
  }
  return *cluster_of(sys);
}

int status_command(const Args& args) {
  System s(caf::timespan{std::chrono::seconds(30)});
  auto cluster = connect_command(*s.sys, args);
  caf::scoped_actor self{*s.sys};
  ClusterStatus status;
  bool ok = false;
  self->request(cluster.head, std::chrono::seconds(10), cluster_status_atom::value)
    .receive([&](ClusterStatus& st) { status = std::move(st); ok = true; },
             [&](caf::error& err) { std::fprintf(stderr, "caftrain: %s\n", s.sys->render(err).c_str()); });
  if (!ok)
    return 1;
  std::printf("nodes: %zu\n", status.nodes.size());
  for (auto& n : status.nodes)
    std::printf("  %-24s %s pid %d at %s  total %s  free %s\n", n.id.c_str(), n.host.c_str(), n.pid,
                n.address.c_str(), n.total.to_string().c_str(), n.available.to_string().c_str());
  std::printf("runs: %zu\n", status.runs.size());
  for (auto& r : status.runs) {
    std::string state = "?";
    int64_t attempt = 0, reports = 0;
    self->request(r.trainer, std::chrono::seconds(5), status_atom::value)
      .receive([&](RunStatus& rs) {
                 state = rs.state;
                 attempt = rs.attempt;
                 reports = rs.reports;
               },
               [&](caf::error&) { state = "unreachable"; });
    std::printf("  %-24s %-10s attempt %lld, %lld reports  (driver %s)\n", r.name.c_str(), state.c_str(),
                static_cast<long long>(attempt), static_cast<long long>(reports), r.driver.c_str());
  }
  if (!status.pending.empty()) {
    std::printf("waiting:\n");
    for (auto& p : status.pending)
      std::printf("  %s: %s\n", p.request.owner.c_str(), p.reason.c_str());
  }
  return 0;
}

int stop_command(const Args& args) {
  if (args.positional.size() != 1)
    usage_error("stop takes the name of one run");
  System s(caf::timespan{std::chrono::seconds(30)});
  auto cluster = connect_command(*s.sys, args);
  caf::scoped_actor self{*s.sys};
  int rc = 1;
  self->request(cluster.head, std::chrono::seconds(10), run_stop_atom::value, args.positional[0])
    .receive(
      [&](bool found) {
        if (found) {
          std::printf("caftrain: stopping run '%s'\n", args.positional[0].c_str());
          rc = 0;
        } else {
          std::fprintf(stderr, "caftrain: the cluster has no run '%s' (see caftrain status)\n",
                       args.positional[0].c_str());
        }
      },
      [&](caf::error& err) { std::fprintf(stderr, "caftrain: %s\n", s.sys->render(err).c_str()); });
  return rc;
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 64 : 0;
  }
  std::string command = argv[1];
  int rc = 0;
  if (command == "head") {
    auto args = parse(argc, argv, 2, {"port", "host", "token-file", "address-file"});
    HeadOptions o;
    o.host = args.get("host", o.host);
    o.port = static_cast<uint16_t>(number("--port", args.get("port", std::to_string(o.port))));
    o.token_file = args.get("token-file");
    o.address_file = args.get("address-file");
    // A node that stops answering is dropped after this long (its heartbeats are 4x as
    // frequent): a lost node is known within 1.5 s.
    System s(caf::timespan{std::chrono::milliseconds(1500)});
    try {
      rc = run_head(*s.sys, o);
    } catch (const Error& e) {
      std::fprintf(stderr, "caftrain head: %s\n", e.what());
      rc = 2;
    }
  } else if (command == "node") {
    auto args = parse(argc, argv, 2, {"head", "name", "cpus", "gpus", "resource", "token-file", "host"});
    NodeOptions o;
    o.head = args.get("head");
    if (o.head.empty())
      usage_error("--head HOST:PORT is required");
    o.name = args.get("name");
    if (!args.get("cpus").empty())
      o.cpus = number("--cpus", args.get("cpus"));
    if (!args.get("gpus").empty())
      o.gpus = number("--gpus", args.get("gpus"));
    if (args.options.count("resource"))
      for (auto& item : args.options.at("resource")) {
        auto eq = item.find('=');
        if (eq == std::string::npos || eq == 0)
          usage_error("--resource takes NAME=AMOUNT, not '" + item + "'");
        o.custom[item.substr(0, eq)] = number("--resource " + item.substr(0, eq), item.substr(eq + 1));
      }
    o.token_file = args.get("token-file");
    o.host = args.get("host");
    // The head is given up on after 5 s of silence (a driver's runs outlive no head).
    System s(caf::timespan{std::chrono::seconds(5)});
    rc = run_node(*s.sys, o);
  } else if (command == "status") {
    spdlog::set_level(spdlog::level::warn);
    rc = status_command(parse(argc, argv, 2, {"head", "token-file"}));
  } else if (command == "stop") {
    spdlog::set_level(spdlog::level::warn);
    rc = stop_command(parse(argc, argv, 2, {"head", "token-file"}));
  } else {
    usage_error("unknown command '" + command + "'");
  }
  std::fflush(stdout);
  std::fflush(stderr);
  // Worker processes end with their node (PR_SET_PDEATHSIG); nothing else needs an orderly
  // shutdown of the actor system.
  std::_Exit(rc);
}
