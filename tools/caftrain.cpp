// The `caftrain` command: runs a cluster's head and nodes, and looks at and steers it.
//
//   caftrain head [--port 6380] [--host 0.0.0.0] [--token-file F] [--address-file F]
//   caftrain node --head HOST:PORT [--cpus N] [--gpus M] [--resource NAME=AMOUNT]... [--name ID] [--token-file F]
//   caftrain status --head HOST:PORT [--token-file F]
//   caftrain stop --head HOST:PORT RUN|JOB [--token-file F]
//   caftrain submit --head HOST:PORT [--no-wait] [--env NAME=VALUE]... [--working-dir D] -- PROGRAM ARGS...
//   caftrain logs --head HOST:PORT JOB|RUN [--follow]
//   (every command: [--tls-cert F --tls-key F --tls-ca F], or $CAFTRAIN_TLS_CERT/KEY/CA)
//
// A driver joins with `caftrain::connect(system, "HOST:PORT")` (the examples take
// `--address HOST:PORT`). The token file (default ~/.caftrain/cluster_token, written by
// `caftrain head` when missing) must be copied to every node and driver.
#include <unistd.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <thread>
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
#include "actors/network.hpp"
#include "actors/node_agent.hpp"
#include "core/error.hpp"

namespace {

using namespace caftrain;

const char* kUsage =
  "usage:\n"
  "  caftrain head [--port 6380] [--host 0.0.0.0] [--token-file F] [--address-file F] [--storage DIR]\n"
  "      runs a cluster's head: its node registry, resource pool, run registry and jobs\n"
  "      (their output under --storage, default ~/.caftrain/head)\n"
  "  caftrain node --head HOST:PORT [--cpus N] [--gpus M] [--resource NAME=AMOUNT]...\n"
  "                [--name ID] [--token-file F] [--host ADDRESS_DRIVERS_REACH]\n"
  "      joins this machine to the cluster with its resources; runs its worker processes\n"
  "  caftrain status --head HOST:PORT [--token-file F]\n"
  "      lists the nodes, their free resources, the runs and the waiting requests\n"
  "  caftrain stop --head HOST:PORT RUN|JOB [--token-file F]\n"
  "      cancels a run of the cluster, or ends a job's driver\n"
  "  caftrain submit --head HOST:PORT [--no-wait] [--env NAME=VALUE]... [--working-dir DIR]\n"
  "                  [--token-file F] -- PROGRAM ARGS...\n"
  "      runs PROGRAM as a driver on the head's machine (it finds the cluster in\n"
  "      $CAFTRAIN_ADDRESS) and, unless --no-wait, prints its output until it ends and\n"
  "      exits with its status\n"
  "  caftrain logs --head HOST:PORT JOB|RUN [--follow] [--token-file F]\n"
  "      prints the output of a job (or of the job whose driver runs RUN)\n"
  "The cluster token is read from --token-file, else $CAFTRAIN_TOKEN_FILE, else\n"
  "~/.caftrain/cluster_token (the head writes one there when it has none).\n"
  "TLS: every command takes --tls-cert F --tls-key F --tls-ca F (or $CAFTRAIN_TLS_CERT,\n"
  "$CAFTRAIN_TLS_KEY, $CAFTRAIN_TLS_CA); then every connection is TLS and a peer\n"
  "without a certificate from that CA is refused.\n";

[[noreturn]] void usage_error(const std::string& what) {
  std::fprintf(stderr, "caftrain: %s\n%s", what.c_str(), kUsage);
  std::exit(64);
}

/// "--name value" options and positional arguments of one command, and what follows "--".
struct Args {
  std::map<std::string, std::vector<std::string>> options;
  std::vector<std::string> positional;
  std::vector<std::string> rest;
  bool has(const std::string& name) const { return options.count(name) > 0; }

  std::string get(const std::string& name, const std::string& fallback = "") const {
    auto i = options.find(name);
    return i == options.end() ? fallback : i->second.back();
  }
};

const std::vector<std::string> kTlsOptions{"tls-cert", "tls-key", "tls-ca"};

/// Options that take no value.
const std::vector<std::string> kFlags{"no-wait", "follow"};

Args parse(int argc, char** argv, int first, std::vector<std::string> known) {
  known.insert(known.end(), kTlsOptions.begin(), kTlsOptions.end());
  Args args;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      args.rest.assign(argv + i + 1, argv + argc);
      break;
    }
    if (arg.rfind("--", 0) != 0) {
      args.positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    auto eq = name.find('=');
    if (std::find(kFlags.begin(), kFlags.end(), name) != kFlags.end()) {
      if (std::find(known.begin(), known.end(), name) == known.end())
        usage_error("unknown option --" + name);
      args.options[name].push_back("");
      continue;
    }
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

  System(caf::timespan connection_timeout, const Args& args) {
    try {
      caftrain::init(cfg); // TLS from the environment
      if (args.has("tls-cert") || args.has("tls-key") || args.has("tls-ca")) {
        if (!args.has("tls-cert") || !args.has("tls-key") || !args.has("tls-ca"))
          usage_error("TLS needs all of --tls-cert, --tls-key and --tls-ca");
        use_tls(cfg, TlsOptions{args.get("tls-cert"), args.get("tls-key"), args.get("tls-ca")});
      }
    } catch (const Error& e) {
      std::fprintf(stderr, "caftrain: %s\n", e.what());
      std::_Exit(2);
    }
    cfg.set("middleman.connection-timeout", connection_timeout);
    sys = std::make_unique<caf::actor_system>(cfg);
  }
};

/// Connects a command to the head; exits with a message when it cannot.
ClusterHandle connect_command(caf::actor_system& sys, const Args& args) {
  auto head = args.get("head", default_address());
  if (head.empty())
    usage_error("--head HOST:PORT is required (or $CAFTRAIN_ADDRESS)");
  try {
    caftrain::connect(sys, head, {.token_file = args.get("token-file")});
  } catch (const Error& e) {
    std::fprintf(stderr, "caftrain: %s\n", e.what());
    std::_Exit(2);
  }
  return *cluster_of(sys);
}

int status_command(const Args& args) {
  System s(caf::timespan{std::chrono::seconds(30)}, args);
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
  if (!status.jobs.empty()) {
    std::printf("jobs: %zu\n", status.jobs.size());
    for (auto& j : status.jobs)
      std::printf("  %-16s %-10s pid %d  %s%s%s\n", j.id.c_str(), j.state.c_str(), j.pid, j.command.c_str(),
                  j.end.empty() ? "" : "  -- ", j.end.c_str());
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
    usage_error("stop takes the name of one run or job");
  auto& name = args.positional[0];
  System s(caf::timespan{std::chrono::seconds(30)}, args);
  auto cluster = connect_command(*s.sys, args);
  caf::scoped_actor self{*s.sys};
  auto ask = [&](auto atom, const char* what) {
    int found = -1; // -1: no answer, 0: none of that name, 1: stopping
    self->request(cluster.head, std::chrono::seconds(10), atom, name)
      .receive([&](bool yes) { found = yes ? 1 : 0; },
               [&](caf::error& err) { std::fprintf(stderr, "caftrain: %s\n", s.sys->render(err).c_str()); });
    if (found == 1)
      std::printf("caftrain: stopping %s '%s'\n", what, name.c_str());
    return found;
  };
  auto found = ask(run_stop_atom::value, "run");
  if (found == 0)
    found = ask(job_stop_atom::value, "job");
  if (found == 0)
    std::fprintf(stderr, "caftrain: the cluster has no run or job '%s' (see caftrain status)\n", name.c_str());
  return found == 1 ? 0 : 1;
}

/// Prints the output of job (or run) `name` from `offset` on; with `follow`, until the
/// job ends. The job's exit status (1 when it was killed or could not be read), or -1
/// when `follow` is off and the job still runs.
int print_logs(System& s, const ClusterHandle& cluster, const std::string& name, bool follow) {
  caf::scoped_actor self{*s.sys};
  int64_t offset = 0;
  for (;;) {
    std::optional<JobLogs> piece;
    self->request(cluster.head, std::chrono::seconds(10), job_logs_atom::value, name, offset)
      .receive([&](JobLogs& logs) { piece = std::move(logs); },
               [&](caf::error& err) { std::fprintf(stderr, "caftrain: %s\n", to_run_error(err).message.c_str()); });
    if (!piece)
      return 1;
    std::fwrite(piece->text.data(), 1, piece->text.size(), stdout);
    std::fflush(stdout);
    offset = piece->next_offset;
    bool more = piece->text.size() >= (1u << 20);
    if (more)
      continue;
    if (piece->job.state != "running") {
      std::fprintf(stderr, "caftrain: job %s %s (%s)\n", piece->job.id.c_str(), piece->job.end.c_str(),
                   piece->job.state.c_str());
      return piece->job.exit_code;
    }
    if (!follow)
      return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

int logs_command(const Args& args) {
  if (args.positional.size() != 1)
    usage_error("logs takes the id of one job, or the name of a run");
  System s(caf::timespan{std::chrono::seconds(30)}, args);
  auto cluster = connect_command(*s.sys, args);
  auto rc = print_logs(s, cluster, args.positional[0], args.has("follow"));
  return rc < 0 ? 0 : rc;
}

int submit_command(const Args& args) {
  if (args.rest.empty())
    usage_error("submit needs the program to run after --: caftrain submit --head HOST:PORT -- PROGRAM ARGS...");
  JobSpec spec;
  spec.program = args.rest[0];
  spec.args.assign(args.rest.begin() + 1, args.rest.end());
  // A program given by a path that exists here is sent as an absolute path (the head
  // runs the same path on its machine, as nodes do); a bare name is looked up there.
  std::error_code ec;
  if (spec.program.find('/') != std::string::npos && std::filesystem::exists(spec.program, ec))
    spec.program = std::filesystem::absolute(spec.program).string();
  spec.working_dir = args.get("working-dir", std::filesystem::current_path(ec).string());
  if (args.has("env"))
    for (auto& item : args.options.at("env")) {
      auto eq = item.find('=');
      if (eq == std::string::npos || eq == 0)
        usage_error("--env takes NAME=VALUE, not '" + item + "'");
      spec.env[item.substr(0, eq)] = item.substr(eq + 1);
    }
  spec.submitter = process_label();
  System s(caf::timespan{std::chrono::seconds(30)}, args);
  auto cluster = connect_command(*s.sys, args);
  std::optional<JobView> job;
  {
    caf::scoped_actor self{*s.sys};
    self->request(cluster.head, std::chrono::seconds(30), job_submit_atom::value, spec)
      .receive([&](JobView& j) { job = std::move(j); },
               [&](caf::error& err) {
                 std::fprintf(stderr, "caftrain: the head refused the job: %s\n", to_run_error(err).message.c_str());
               });
  }
  if (!job)
    return 2;
  std::fprintf(stderr, "caftrain: job %s started on the head (pid %d); its output: caftrain logs --head %s %s\n",
               job->id.c_str(), job->pid, args.get("head", default_address()).c_str(), job->id.c_str());
  std::printf("%s\n", job->id.c_str());
  std::fflush(stdout);
  if (args.has("no-wait"))
    return 0;
  return print_logs(s, cluster, job->id, true);
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
    auto args = parse(argc, argv, 2, {"port", "host", "token-file", "address-file", "storage"});
    HeadOptions o;
    o.host = args.get("host", o.host);
    o.port = static_cast<uint16_t>(number("--port", args.get("port", std::to_string(o.port))));
    o.token_file = args.get("token-file");
    o.address_file = args.get("address-file");
    o.storage = args.get("storage");
    // A node that stops answering is dropped after this long (its heartbeats are 4x as
    // frequent): a lost node is known within 1.5 s.
    System s(caf::timespan{std::chrono::milliseconds(1500)}, args);
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
    System s(caf::timespan{std::chrono::seconds(5)}, args);
    rc = run_node(*s.sys, o);
  } else if (command == "status") {
    spdlog::set_level(spdlog::level::warn);
    rc = status_command(parse(argc, argv, 2, {"head", "token-file"}));
  } else if (command == "stop") {
    spdlog::set_level(spdlog::level::warn);
    rc = stop_command(parse(argc, argv, 2, {"head", "token-file"}));
  } else if (command == "submit") {
    spdlog::set_level(spdlog::level::warn);
    rc = submit_command(parse(argc, argv, 2, {"head", "token-file", "no-wait", "env", "working-dir"}));
  } else if (command == "logs") {
    spdlog::set_level(spdlog::level::warn);
    rc = logs_command(parse(argc, argv, 2, {"head", "token-file", "follow"}));
  } else {
    usage_error("unknown command '" + command + "'");
  }
  std::fflush(stdout);
  std::fflush(stderr);
  // Worker processes end with their node (PR_SET_PDEATHSIG); nothing else needs an orderly
  // shutdown of the actor system.
  std::_Exit(rc);
}
