// Jobs (`caftrain submit`, `logs`, `stop`) and TLS on a cluster of real `caftrain`
// processes on loopback. The drivers of the jobs are caftrain_driver_child processes;
// the TLS run's driver is this test binary, its workers this binary again.
#include <catch2/catch.hpp>

#include <caf/all.hpp>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "actors/cluster.hpp"
#include "actors/network.hpp"
#include "core/subprocess.hpp"
#include "helpers.hpp"
#include "local_cluster.hpp"

using namespace caftrain;
using Catch::Matchers::Contains;

namespace {

namespace fs = std::filesystem;
using test::LocalCluster;
using test::read_file;
using test::run_to_end;
using Clock = std::chrono::steady_clock;

int exit_status(int wait_status) {
  return WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
}

/// `caftrain ARGS...` with the cluster's address and token, to its end; its exit status
/// and its output.
std::pair<int, std::string> cli(const test::TempDir& dir, const LocalCluster& cluster,
                                std::vector<std::string> args, const std::string& name) {
  std::vector<std::string> argv{CAFTRAIN_CLI, args[0], "--head", cluster.address, "--token-file", cluster.token_file};
  argv.insert(argv.end(), args.begin() + 1, args.end());
  auto out = dir / (name + ".out");
  auto status = run_to_end(argv, out);
  return {exit_status(status), read_file(out)};
}

/// The job id `caftrain submit` printed on a line of its own.
std::string job_id(const std::string& text) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.rfind("job-", 0) == 0)
      return line;
  return "";
}

/// A CA, and certificates it signed, made with the openssl command (EC keys: fast).
struct Certificates {
  explicit Certificates(const test::TempDir& dir, const std::string& ca_name = "ca") : dir_(dir) {
    ca = dir / (ca_name + ".pem");
    ca_key_ = dir / (ca_name + ".key");
    run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=" +
        ca_name + " -keyout " + ca_key_ + " -out " + ca);
  }

  /// A certificate and key for `name`, signed by this CA: {certificate, key}.
  std::pair<std::string, std::string> issue(const std::string& name) {
    auto key = dir_ / (name + ".key"), csr = dir_ / (name + ".csr"), cert = dir_ / (name + ".pem");
    run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=" + name + " -keyout " +
        key + " -out " + csr);
    run("openssl x509 -req -in " + csr + " -CA " + ca + " -CAkey " + ca_key_ + " -CAcreateserial -days 2 -out " +
        cert);
    ::chmod(key.c_str(), 0600);
    return {cert, key};
  }

  /// `caftrain` options for `name`'s identity.
  std::vector<std::string> options(const std::string& name) {
    auto [cert, key] = issue(name);
    return {"--tls-cert", cert, "--tls-key", key, "--tls-ca", ca};
  }

  std::string ca;

 private:
  static void run(const std::string& command) {
    auto rc = std::system((command + " >/dev/null 2>&1").c_str());
    INFO(command);
    REQUIRE(rc == 0);
  }

  const test::TempDir& dir_;
  std::string ca_key_;
};

/// Waits until process `pid` ends or `timeout` passes; its wait status, or nullopt.
std::optional<int> wait_for_end(pid_t pid, std::chrono::seconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return std::nullopt;
}

} // namespace

TEST_CASE("caftrain submit runs a driver on the head whose run trains on the nodes; logs, status and stop reach the job", "[cluster][jobs]") {
  if (is_worker_process())
    return; // the drivers here are processes of their own
  test::TempDir dir;
  LocalCluster cluster(dir, {"--storage", dir / "head"});
  REQUIRE_FALSE(cluster.address.empty());
  cluster.add_node("node-a", 2, "", {}, dir / "node-a.out");
  test::ActorSystem s;
  REQUIRE(cluster.connect_and_wait(s.sys, 1));

  // Waiting: the job's output streams back and its status is the command's.
  auto [rc, out] = cli(dir, cluster, {"submit", "--", CAFTRAIN_DRIVER_CHILD, "job", dir / "runs"}, "submit");
  INFO(out);
  CHECK(rc == 0);
  auto id = job_id(out);
  REQUIRE_FALSE(id.empty());
  CHECK_THAT(out, Contains("job_child: ok, 3 reports"));
  CHECK_THAT(out, Contains("cluster at 127.0.0.1:"));
  // The output is kept on the head, under its storage, by job id and by the run's name.
  auto log = dir / ("head/jobs/" + id + "/output.log");
  CHECK_THAT(read_file(log), Contains("job_child: ok, 3 reports"));
  auto by_id = cli(dir, cluster, {"logs", id}, "logs-id");
  CHECK(by_id.first == 0);
  CHECK_THAT(by_id.second, Contains("job_child: ok, 3 reports"));
  auto by_run = cli(dir, cluster, {"logs", "job_child"}, "logs-run");
  CHECK(by_run.first == 0);
  CHECK_THAT(by_run.second, Contains("job_child: ok, 3 reports"));
  // The job's run was the cluster's: its workers ran on the node and gave back its CPUs.
  auto status = cluster.status(s.sys);
  REQUIRE(status.jobs.size() == 1);
  CHECK(status.jobs[0].state == "succeeded");
  CHECK(status.jobs[0].exit_code == 0);
  REQUIRE(status.nodes.size() == 1);
  CHECK(status.nodes[0].available.get("CPU") == 2);

  // Not waiting: the id comes back at once; `logs --follow` ends with the job's status.
  auto [rc3, out3] = cli(dir, cluster, {"submit", "--no-wait", "--", CAFTRAIN_DRIVER_CHILD, "job", dir / "runs", "3"},
                         "submit-3");
  CHECK(rc3 == 0);
  auto id3 = job_id(out3);
  auto followed = cli(dir, cluster, {"logs", "--follow", id3}, "follow-3");
  CHECK(followed.first == 3);
  CHECK_THAT(followed.second, Contains("job_child: ok, 3 reports"));

  // Stopping a job that would run forever ends its driver; the node stops its workers.
  auto [rcs, outs] = cli(dir, cluster, {"submit", "--no-wait", "--", CAFTRAIN_DRIVER_CHILD, dir / "runs", dir / "forever"},
                         "submit-forever");
  CHECK(rcs == 0);
  auto forever = job_id(outs);
  fs::create_directories(dir / "forever");
  auto deadline = Clock::now() + std::chrono::seconds(60);
  while (!(fs::exists(dir / "forever/worker-0") && fs::exists(dir / "forever/worker-1")) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(fs::exists(dir / "forever/worker-1"));
  auto stopped = cli(dir, cluster, {"stop", forever}, "stop");
  CHECK(stopped.first == 0);
  CHECK_THAT(stopped.second, Contains("stopping job '" + forever + "'"));
  auto end = cli(dir, cluster, {"logs", "--follow", forever}, "follow-forever");
  CHECK(end.first == 128 + SIGTERM);
  CHECK_THAT(end.second, Contains("stopped"));
  for (auto rank : {"0", "1"}) {
    std::string pid;
    std::ifstream(dir / (std::string("forever/worker-") + rank)) >> pid;
    auto gone_by = Clock::now() + std::chrono::seconds(10);
    while (test::process_exists(pid) && Clock::now() < gone_by)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CAPTURE(rank, pid);
    CHECK_FALSE(test::process_exists(pid));
  }

  // Bad requests are refused by name; the cluster is unchanged.
  auto missing = cli(dir, cluster, {"submit", "--", "/no/such/program"}, "missing");
  CHECK(missing.first == 2);
  CHECK_THAT(missing.second, Contains("'/no/such/program' is not an executable file on the head's machine"));
  auto unknown = cli(dir, cluster, {"logs", "no-such-job"}, "unknown");
  CHECK(unknown.first != 0);
  CHECK_THAT(unknown.second, Contains("has no job or run 'no-such-job'"));
  auto listing = cli(dir, cluster, {"status"}, "status");
  CHECK(listing.first == 0);
  CHECK_THAT(listing.second, Contains("jobs: 3"));
  CHECK_THAT(listing.second, Contains(id) && Contains("succeeded") && Contains("stopped") && Contains("exited with status 3"));
}

TEST_CASE("TLS files are checked when a process is configured, naming the file and the fix", "[cluster][tls]") {
  if (is_worker_process())
    return;
  test::TempDir dir;
  Certificates ca(dir);
  auto [cert, key] = ca.issue("node");
  auto [other_cert, other_key] = ca.issue("other");
  auto refused = [](TlsOptions tls) {
    caf::actor_system_config cfg;
    try {
      use_tls(cfg, tls);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK(refused({cert, key, ca.ca}) == "accepted");
  CHECK_THAT(refused({dir / "nope.pem", key, ca.ca}), Contains("certificate '" + dir / "nope.pem" + "' does not exist"));
  CHECK_THAT(refused({cert, other_key, ca.ca}), Contains("does not belong to the certificate"));
  CHECK_THAT(refused({cert, key, key}), Contains("CA file"));
  ::chmod(key.c_str(), 0644);
  CHECK_THAT(refused({cert, key, ca.ca}), Contains("chmod 600 " + key));
  ::setenv("CAFTRAIN_TLS_CERT", cert.c_str(), 1);
  CHECK_THROWS_WITH(tls_from_environment(), Contains("CAFTRAIN_TLS_KEY"));
  ::unsetenv("CAFTRAIN_TLS_CERT");
  CHECK_FALSE(tls_from_environment());
}

TEST_CASE("With TLS a run trains across two nodes, and a node or driver without the CA's certificate is refused", "[cluster][tls]") {
  test::TempDir dir;
  std::optional<Certificates> ca;
  std::optional<LocalCluster> cluster;
  caf::actor_system_config cfg;
  init(cfg); // a worker process gets TLS from its node, through the environment
  if (!is_worker_process()) {
    ca.emplace(dir);
    auto [cert, key] = ca->issue("driver");
    use_tls(cfg, {cert, key, ca->ca});
    cluster.emplace(dir, ca->options("head"));
    REQUIRE_FALSE(cluster->address.empty());
    cluster->add_node("node-a", 1, "", ca->options("node-a"));
    cluster->add_node("node-b", 1, "", ca->options("node-b"));
  }
  caf::actor_system sys{cfg};
  if (!is_worker_process()) {
    REQUIRE(tls_of(sys));
    REQUIRE(cluster->connect_and_wait(sys, 2));
  }
  auto o = test::two_node_run(dir, "tls");
  auto result = TorchTrainer(sys, [](const Config&) {
    // Each rank says whether its node gave it the TLS identity it connected with.
    double tls = std::getenv("CAFTRAIN_TLS_CERT") ? 1.0 : 0.0;
    for (int step = 0; step < 3; ++step)
      train::report({{"step", static_cast<double>(step)}, {"tls", tls}});
  }, o).fit();
  INFO((result.error ? result.error->message : ""));
  REQUIRE(result.ok());
  REQUIRE(result.metrics_history.size() == 3);
  for (auto& record : result.metrics_history) {
    REQUIRE(record.all_metrics.size() == 2);
    for (auto& rank : record.all_metrics)
      CHECK(rank.at("tls") == 1.0);
  }

  // A node without TLS, or with a certificate of another CA, never joins.
  Certificates stranger(dir, "stranger-ca");
  auto plain = cluster->add_node("plain", 1, "", {}, dir / "plain.out");
  auto foreign = cluster->add_node("foreign", 1, "", stranger.options("foreign"), dir / "foreign.out");
  for (auto [pid, out] : {std::pair{plain, dir / "plain.out"}, std::pair{foreign, dir / "foreign.out"}}) {
    auto end = wait_for_end(pid, std::chrono::seconds(60));
    INFO(read_file(out));
    REQUIRE(end);
    CHECK(exit_status(*end) == 2);
    CHECK_THAT(read_file(out), Contains("cannot reach the head"));
  }
  CHECK(cluster->status(sys).nodes.size() == 2);
  // Nor does a driver without TLS.
  test::ActorSystem no_tls;
  std::string why;
  try {
    connect(no_tls.sys, cluster->address, {.token_file = cluster->token_file, .timeout = std::chrono::seconds(1)});
  } catch (const Error& e) {
    why = e.what();
  }
  CHECK_THAT(why, Contains("cannot reach the cluster head") && Contains("--tls-cert"));
}
