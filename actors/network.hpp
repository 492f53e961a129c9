// How caftrain's processes reach each other: CAF's middleman over plain TCP, or over TLS
// with CAF's OpenSSL module when the process is given certificates.
//
// Every port caftrain opens (a head, a node's agent and hub, a run's hub) and every
// connection it makes (nodes and drivers to the head, drivers to agents, worker processes
// to their hub and driver) goes through `publish` / `remote_actor` / `connector` below,
// so one switch, `use_tls`, covers them all. TLS here is mutual: each side presents a
// certificate signed by the cluster's CA and refuses a peer without one, so a machine
// without the CA's blessing cannot even open a session (the token is still checked on
// top of it).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/expected.hpp>
#include <caf/fwd.hpp>
#include <caf/io/middleman_actor.hpp>

namespace caftrain {

/// The files of a process's TLS identity (PEM).
struct TlsOptions {
  /// This machine's certificate (chain), signed by the cluster's CA.
  std::string certificate;
  /// Its private key, unencrypted, readable by its owner only.
  std::string key;
  /// The CA certificate(s) every peer's certificate must be signed by.
  std::string ca_file;
};

/// TLS from `$CAFTRAIN_TLS_CERT`, `$CAFTRAIN_TLS_KEY` and `$CAFTRAIN_TLS_CA` (all three,
/// or none: nullopt). Throws `Error(invalid_config)` when only some are set.
std::optional<TlsOptions> tls_from_environment();

/// Makes every connection of the actor system `cfg` configures use TLS with `tls` (call
/// before the system exists; `caftrain::init` calls it for the variables above). Checks
/// the files now, with OpenSSL: throws `Error(invalid_config)` naming the file and the
/// fix when one is missing, unreadable, not PEM, a key readable by others, or a key that
/// does not match the certificate.
void use_tls(caf::actor_system_config& cfg, const TlsOptions& tls);

/// The TLS identity of `system`, if it uses TLS. Worker processes a node or driver starts
/// get the same files (through the variables above).
std::optional<TlsOptions> tls_of(const caf::actor_system& system);

/// What to check when a connection of `system` failed, as a clause for its error: the
/// two sides must agree on TLS.
std::string tls_hint(const caf::actor_system& system);

namespace net {

/// Publishes `whom` at `port` (0: any free one) on interface `in` (nullptr: all),
/// with TLS when the system uses it. The port, or why not.
caf::expected<uint16_t> publish(caf::actor_system& system, const caf::actor& whom, uint16_t port,
                                const char* in, bool reuse = true);

/// Stops publishing `whom` at `port` (asynchronously).
void unpublish(caf::actor_system& system, const caf::actor& whom, uint16_t port);

/// The actor published at `host:port`, over TLS when the system uses it (blocking).
caf::expected<caf::actor> remote_actor(caf::actor_system& system, const std::string& host, uint16_t port);

/// The middleman actor that makes this system's connections (for an actor that must not
/// block: request it `(caf::connect_atom, host, port)`).
caf::io::middleman_actor connector(caf::actor_system& system);

} // namespace net

} // namespace caftrain
