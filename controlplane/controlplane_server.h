// ControlplaneServer: assembles sflb-controlplane (registry, key source, gRPC services with
// health checking and reflection) from its Options. main.cc parses settings and calls Run().
#ifndef SFLB_CONTROLPLANE_CONTROLPLANE_SERVER_H_
#define SFLB_CONTROLPLANE_CONTROLPLANE_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/options.h"

namespace sflb {

struct ControlplaneOptions {
  // gRPC listen address (SFLB_LISTEN). Port 0 picks a free port (logged as "listening").
  std::string listen = "0.0.0.0:50051";
  // Keys file (SFLB_KEYS_FILE); when missing, SILICONFLOW_API_KEY_1..N are used.
  std::string keys_file = "keys.txt";
  // Admin key sflbctl must present (LB_ADMIN_KEY). Required.
  std::string admin_key;
  // Upstream base URL (SILICONFLOW_BASE_URL), for balance checks.
  std::string base_url = "https://api.siliconflow.cn/v1";
  // Longest a Watch stream stays silent before a heartbeat.
  absl::Duration watch_heartbeat = absl::Seconds(5);
  // Grace for in-flight RPCs on shutdown.
  absl::Duration shutdown_grace = absl::Seconds(5);
  // Log level: debug, info, warning, error.
  std::string log_level = "info";
  // State file (SFLB_STATE_FILE): key states, counters and blocks survive restarts. Default:
  // "sflb-state.json" beside the keys file.
  std::string state_file;
  // Cooldown of a 429 whose limit is unknown, and the cap for backoff (per-day limits excepted).
  absl::Duration default_cooldown = absl::Seconds(60);
  absl::Duration max_cooldown = absl::Minutes(30);
  // How long a replica named to probe a half-open scope has before another is named.
  absl::Duration probe_timeout = absl::Seconds(10);
  // Audit log (SFLB_AUDIT_LOG), "off" to disable. Default: "sflb-audit.jsonl" beside the keys
  // file. Rotated at `audit_max_bytes`, `audit_max_files` kept.
  std::string audit_log;
  int64_t audit_max_bytes = 64 << 20;
  int64_t audit_max_files = 5;
  // Balances: cache lifetime, upstream calls in parallel, per-call timeout, how often all
  // balances are refreshed in the background (0 = only on request), depletion threshold.
  absl::Duration balance_cache_ttl = absl::Minutes(5);
  int64_t balance_concurrency = 8;
  absl::Duration balance_timeout = absl::Seconds(10);
  absl::Duration balance_watch_interval = absl::Minutes(5);
  std::string depleted_threshold = "0";
  // gRPC TLS: certificate and key (SFLB_TLS_CERT_FILE, SFLB_TLS_KEY_FILE); with
  // SFLB_TLS_CLIENT_CA_FILE also client certificates are required (mutual TLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Token dataplanes present on the key service (SFLB_DATAPLANE_TOKEN). It can watch, lease
  // and report, never call admin methods; the admin key cannot read keys. Empty: the key
  // service is open (a warning is logged) — only for a trusted network.
  std::string dataplane_token;
  // Prometheus metrics listener (SFLB_METRICS_LISTEN), "off" to disable.
  std::string metrics_listen = "0.0.0.0:9091";
  // How often the keys file is checked for changes (reloaded when it changed); 0 = never.
  absl::Duration keys_file_poll = absl::Seconds(2);
};

// Declares every controlplane setting on `parser`, bound to `options`.
void RegisterControlplaneOptions(OptionParser* parser, ControlplaneOptions* options);

// Checks settings that cannot be checked one by one. INVALID_ARGUMENT with the reason.
absl::Status ValidateControlplaneOptions(const ControlplaneOptions& options);

// Runs the controlplane until SIGTERM/SIGINT. Returns OK on a clean shutdown, else the reason
// it could not start (e.g. the listen address is taken).
absl::Status RunControlplane(const ControlplaneOptions& options, const EnvLookup& env);

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_CONTROLPLANE_SERVER_H_
