#include "actors/messages.hpp"

#include <caf/all.hpp>

#include "actors/cluster.hpp"
#include "actors/network.hpp"
#include "actors/pool_actor.hpp"
#include "actors/process_launcher.hpp"
#include "actors/worker_process.hpp"
#include "tune/tuner_actor.hpp"

namespace caftrain {

namespace {

/// Category of caftrain's errors in caf::error.
constexpr caf::atom_value kErrorCategory = caf::atom("caftrain");

} // namespace

void init(caf::actor_system_config& cfg) {
  // The one place that knows every layer's messages: the pool's, the trainer's, Tune's.
  detail::detect_worker_process(cfg); // and loads the middleman
  // TLS for every connection when the environment names this machine's certificates
  // (worker processes get them from the node or driver that starts them).
  if (auto tls = tls_from_environment())
    use_tls(cfg, *tls);
  add_pool_message_types(cfg);
  add_cluster_message_types(cfg);
  // Peers on other machines (a cluster's head and nodes, a run's worker processes) send
  // heartbeats, so that a peer that stops answering is dropped after the connection
  // timeout its side sets (`caftrain head`: 1.5 s) rather than never.
  if (!caf::get_if<caf::timespan>(&cfg, "middleman.heartbeat-interval"))
    cfg.set("middleman.heartbeat-interval", caf::timespan{std::chrono::milliseconds(250)});
  add_worker_process_message_types(cfg);
  tune::add_message_types(cfg);
  cfg.add_message_type<FileDigest>("caftrain::FileDigest");
  cfg.add_message_type<CheckpointMetadata>("caftrain::CheckpointMetadata");
  cfg.add_message_type<Checkpoint>("caftrain::Checkpoint");
  cfg.add_message_type<std::vector<Checkpoint>>("std::vector<caftrain::Checkpoint>");
  cfg.add_message_type<RunError>("caftrain::RunError");
  cfg.add_message_type<ReportRecord>("caftrain::ReportRecord");
  cfg.add_message_type<std::vector<ReportRecord>>("std::vector<caftrain::ReportRecord>");
  cfg.add_message_type<RunStatus>("caftrain::RunStatus");
  cfg.add_message_type<Result>("caftrain::Result");
  cfg.add_message_type<WorkerReport>("caftrain::WorkerReport");
  cfg.add_message_type<WorkerExit>("caftrain::WorkerExit");
  cfg.add_message_type<PersistRequest>("caftrain::PersistRequest");
  cfg.add_message_type<Metrics>("caftrain::Metrics");
  cfg.add_message_type<std::vector<char>>("std::vector<char>");
  cfg.add_error_category(kErrorCategory,
                         [](uint8_t code, caf::atom_value, const caf::message& context) {
                           std::string result = to_string(static_cast<Errc>(code));
                           if (context.match_elements<std::string>())
                             result += ": " + context.get_as<std::string>(0);
                           return result;
                         });
}

caf::error make_caf_error(Errc code, const std::string& message) {
  return caf::error(static_cast<uint8_t>(code), kErrorCategory, caf::make_message(message));
}

RunError to_run_error(const caf::error& err, int64_t rank, int64_t attempt) {
  RunError result;
  result.rank = rank;
  result.attempt = attempt;
  if (err.category() == kErrorCategory) {
    result.code = static_cast<Errc>(err.code());
    if (err.context().match_elements<std::string>())
      result.message = err.context().get_as<std::string>(0);
    else
      result.message = to_string(result.code);
  } else {
    result.code = Errc::worker_failed;
    result.message = caf::to_string(err);
  }
  return result;
}

} // namespace caftrain
