#include "actors/network.hpp"

#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdlib>
#include <memory>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <caf/openssl/all.hpp>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "core/error.hpp"

// CAF 0.17's OpenSSL sessions call SSL_read, SSL_write, SSL_accept and SSL_connect
// without clearing the thread's OpenSSL error queue first, which OpenSSL requires for
// SSL_get_error to be right. With OpenSSL 3 a peer that vanishes (a SIGKILLed node, a
// command that exits, a refused handshake) leaves an error in the middleman thread's
// queue, and the next session on that thread that merely would block reads it as a
// failure: every other connection of the process closed at once (found by the TLS test:
// a `caftrain status` exiting dropped every node). These definitions come first in
// symbol lookup (a program linking caftrain exports them to libcaf_openssl), clear the
// queue and call OpenSSL's own.
namespace {

template <class Fn>
Fn openssl_function(const char* name) {
  auto fn = reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
  if (!fn)
    std::abort(); // libssl is linked: this cannot happen
  return fn;
}

} // namespace

extern "C" {

int SSL_read(SSL* ssl, void* buf, int num) {
  static auto real = openssl_function<int (*)(SSL*, void*, int)>("SSL_read");
  ERR_clear_error();
  return real(ssl, buf, num);
}

int SSL_write(SSL* ssl, const void* buf, int num) {
  static auto real = openssl_function<int (*)(SSL*, const void*, int)>("SSL_write");
  ERR_clear_error();
  return real(ssl, buf, num);
}

int SSL_accept(SSL* ssl) {
  static auto real = openssl_function<int (*)(SSL*)>("SSL_accept");
  ERR_clear_error();
  return real(ssl);
}

int SSL_connect(SSL* ssl) {
  static auto real = openssl_function<int (*)(SSL*)>("SSL_connect");
  ERR_clear_error();
  return real(ssl);
}

} // extern "C"

namespace caftrain {

namespace {

const char* kTlsHelp = "give each machine a certificate and key signed by the cluster's CA "
                       "(see README, 'TLS')";

/// OpenSSL's own words for its last error.
std::string openssl_error() {
  std::string out;
  while (auto code = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof(buf));
    if (!out.empty())
      out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown error" : out;
}

void require_file(const std::string& what, const std::string& path, bool private_key) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0)
    throw Error(Errc::invalid_config, "the TLS " + what + " '" + path + "' does not exist; " + kTlsHelp);
  if (!S_ISREG(info.st_mode))
    throw Error(Errc::invalid_config, "the TLS " + what + " '" + path + "' is not a file; " + kTlsHelp);
  if (private_key && (info.st_mode & 077) != 0)
    throw Error(Errc::invalid_config, "the TLS " + what + " '" + path +
                                        "' can be read by other users; run `chmod 600 " + path + "`");
}

/// Loads the files the way CAF's OpenSSL sessions will, so that a bad file is an error
/// now rather than an exception on the middleman's thread at the first connection.
void check_with_openssl(const TlsOptions& tls) {
  ERR_clear_error();
  std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_method()), SSL_CTX_free);
  if (!ctx)
    throw Error(Errc::invalid_config, "OpenSSL cannot create a context: " + openssl_error());
  // The key first: loading it before the certificate checks only the key itself (a
  // certificate loaded after a key it does not match drops the key, checked below).
  if (SSL_CTX_use_PrivateKey_file(ctx.get(), tls.key.c_str(), SSL_FILETYPE_PEM) != 1)
    throw Error(Errc::invalid_config, "the TLS key '" + tls.key +
                                        "' is not an unencrypted PEM private key OpenSSL can load (" +
                                        openssl_error() + ")");
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), tls.certificate.c_str()) != 1)
    throw Error(Errc::invalid_config, "the TLS certificate '" + tls.certificate +
                                        "' is not a PEM certificate OpenSSL can load (" + openssl_error() + ")");
  ERR_clear_error();
  if (SSL_CTX_check_private_key(ctx.get()) != 1)
    throw Error(Errc::invalid_config, "the TLS key '" + tls.key + "' does not belong to the certificate '" +
                                        tls.certificate + "'");
  if (SSL_CTX_load_verify_locations(ctx.get(), tls.ca_file.c_str(), nullptr) != 1)
    throw Error(Errc::invalid_config, "the TLS CA file '" + tls.ca_file +
                                        "' holds no PEM certificate OpenSSL can load (" + openssl_error() + ")");
}

bool uses_tls(const caf::actor_system& system) {
  return system.has_openssl_manager() && !system.config().openssl_certificate.empty();
}

} // namespace

std::optional<TlsOptions> tls_from_environment() {
  auto get = [](const char* name) {
    const char* v = std::getenv(name);
    return std::string(v ? v : "");
  };
  TlsOptions tls{get("CAFTRAIN_TLS_CERT"), get("CAFTRAIN_TLS_KEY"), get("CAFTRAIN_TLS_CA")};
  int given = !tls.certificate.empty() + !tls.key.empty() + !tls.ca_file.empty();
  if (given == 0)
    return std::nullopt;
  if (given != 3)
    throw Error(Errc::invalid_config,
                "TLS needs all of CAFTRAIN_TLS_CERT, CAFTRAIN_TLS_KEY and CAFTRAIN_TLS_CA (got CERT '" +
                  tls.certificate + "', KEY '" + tls.key + "', CA '" + tls.ca_file + "'); set the missing ones");
  return tls;
}

void use_tls(caf::actor_system_config& cfg, const TlsOptions& tls) {
  if (tls.certificate.empty() || tls.key.empty() || tls.ca_file.empty())
    throw Error(Errc::invalid_config, "TLS needs a certificate, a key and a CA file; " + std::string(kTlsHelp));
  require_file("certificate", tls.certificate, false);
  require_file("key", tls.key, true);
  require_file("CA file", tls.ca_file, false);
  check_with_openssl(tls);
  bool loaded = !cfg.openssl_certificate.empty();
  cfg.openssl_certificate = tls.certificate;
  cfg.openssl_key = tls.key;
  cfg.openssl_cafile = tls.ca_file;
  if (!loaded) {
    cfg.load<caf::io::middleman>();
    cfg.load<caf::openssl::manager>();
  }
}

std::optional<TlsOptions> tls_of(const caf::actor_system& system) {
  if (!uses_tls(system))
    return std::nullopt;
  auto& cfg = system.config();
  return TlsOptions{cfg.openssl_certificate, cfg.openssl_key, cfg.openssl_cafile};
}

std::string tls_hint(const caf::actor_system& system) {
  if (uses_tls(system))
    return " (this process uses TLS: the peer must too, with a certificate signed by the same CA)";
  return " (a peer that uses TLS refuses this process: give it the cluster's certificates with "
         "--tls-cert/--tls-key/--tls-ca or CAFTRAIN_TLS_CERT/KEY/CA)";
}

namespace net {

caf::expected<uint16_t> publish(caf::actor_system& system, const caf::actor& whom, uint16_t port,
                                const char* in, bool reuse) {
  if (uses_tls(system))
    return caf::openssl::publish(whom, port, in, reuse);
  return system.middleman().publish(whom, port, in, reuse);
}

void unpublish(caf::actor_system& system, const caf::actor& whom, uint16_t port) {
  // Asynchronous (callers are actors; CAF 0.17's openssl::unpublish does not compile).
  caf::anon_send(connector(system), caf::unpublish_atom::value, whom.address(), port);
}

caf::expected<caf::actor> remote_actor(caf::actor_system& system, const std::string& host, uint16_t port) {
  if (uses_tls(system))
    return caf::openssl::remote_actor(system, host, port);
  return system.middleman().remote_actor(host, port);
}

caf::io::middleman_actor connector(caf::actor_system& system) {
  if (uses_tls(system))
    return system.openssl_manager().actor_handle();
  return system.middleman().actor_handle();
}

} // namespace net

} // namespace caftrain
