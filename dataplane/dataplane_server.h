// DataplaneServer: assembles sflb-dataplane (HTTP server, client auth, routes, proxy, key pool,
// controlplane link) from its Options. main.cc parses settings and calls RunDataplane().
#ifndef SFLB_DATAPLANE_DATAPLANE_SERVER_H_
#define SFLB_DATAPLANE_DATAPLANE_SERVER_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/options.h"

namespace sflb {

struct DataplaneOptions {
  // HTTP listen host (SFLB_HOST) and port (PORT). Port 0 picks a free port.
  std::string host = "0.0.0.0";
  int64_t port = 3000;
  // Key clients present (LB_API_KEY) and the admin key (LB_ADMIN_KEY). Both required, distinct.
  std::string api_key;
  std::string admin_key;
  // SiliconFlow API base URL (SILICONFLOW_BASE_URL).
  std::string base_url = "https://api.siliconflow.cn/v1";
  // Controlplane gRPC address (SFLB_CONTROLPLANE).
  std::string controlplane = "127.0.0.1:50051";
  // TLS towards the controlplane: CA of its certificate (enables TLS), optional client
  // certificate and key (mutual TLS), optional expected server name.
  std::string controlplane_ca_file;
  std::string controlplane_cert_file;
  std::string controlplane_key_file;
  std::string controlplane_server_name;
  // Token for the controlplane's key service (SFLB_DATAPLANE_TOKEN).
  std::string dataplane_token;
  // Name of this replica in controlplane stats; default "<hostname>-<pid>".
  std::string replica_id;
  // Upstream timeouts.
  absl::Duration connect_timeout = absl::Seconds(10);
  absl::Duration first_byte_timeout = absl::Minutes(10);
  absl::Duration idle_timeout = absl::Minutes(5);
  // A stream whose first body byte takes longer is retried on another key.
  absl::Duration stream_first_byte_timeout = absl::Seconds(60);
  // Local cooldown after a 429 that names no limit (the controlplane decides the real one).
  absl::Duration default_cooldown = absl::Seconds(60);
  // Extra CA bundle for the upstream (PEM), e.g. a corporate proxy's CA.
  std::string upstream_ca_file;
  // Upstream attempts per request, each on a different key.
  int64_t max_attempts = 3;
  // Largest request body accepted; larger gets 413.
  int64_t max_body_bytes = 32 * 1024 * 1024;
  // Most requests served on threads at once (streams until their first byte, sflb's own
  // endpoints, requests the event loops leave to threads) and most workers opening upstream
  // connections; more wait in a queue.
  int64_t max_connections = 16384;
  // Event-loop threads (StreamRelay): idle connections, plain requests, committed streams.
  int64_t relay_threads = 2;
  // Client socket timeouts: reading a request, writing a response piece, idle keep-alive.
  absl::Duration client_read_timeout = absl::Seconds(60);
  absl::Duration client_write_timeout = absl::Seconds(60);
  absl::Duration keep_alive_timeout = absl::Seconds(30);
  // Draining on SIGTERM: how long to keep accepting (so load balancers notice /readyz), then
  // how long in-flight requests and streams get before they are ended (streams with an SSE
  // error event).
  absl::Duration drain_grace = absl::Seconds(5);
  absl::Duration drain_timeout = absl::Seconds(540);
  // Proxies whose X-Forwarded-For is believed for the logged client IP (SFLB_TRUSTED_PROXIES:
  // comma-separated IPs and CIDR ranges; empty = none, the socket address is logged).
  std::string trusted_proxies;
  // Prometheus metrics listener (SFLB_METRICS_LISTEN), "off" to disable.
  std::string metrics_listen = "0.0.0.0:9090";
  // Log level and whether to write one log line per request.
  std::string log_level = "info";
  bool request_log = true;
  // Request-log lines are written together at least this often (0: each at once).
  absl::Duration request_log_flush = absl::Milliseconds(200);
};

// Declares every dataplane setting on `parser`, bound to `options`.
void RegisterDataplaneOptions(OptionParser* parser, DataplaneOptions* options);

// Checks the settings together (required keys, distinct keys, URL). INVALID_ARGUMENT naming
// the setting.
absl::Status ValidateDataplaneOptions(const DataplaneOptions& options);

// Serves until SIGTERM/SIGINT, then drains. OK on a clean shutdown, else why it could not start.
absl::Status RunDataplane(const DataplaneOptions& options);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_DATAPLANE_SERVER_H_
