#include "dataplane/dataplane_server.h"

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/http_server.h"
#include "common/log.h"
#include "common/metrics_server.h"
#include "dataplane/dataplane_metrics.h"
#include "common/signals.h"
#include "common/time_format.h"
#include "common/version.h"
#include "common/grpc_util.h"
#include "dataplane/admin_client.h"
#include "dataplane/client_auth.h"
#include "dataplane/client_ip.h"
#include "dataplane/legacy_api.h"
#include "dataplane/controlplane_link.h"
#include "dataplane/elastic_thread_pool.h"
#include "dataplane/error_response.h"
#include "dataplane/forwarding.h"
#include "dataplane/key_pool.h"
#include "dataplane/proxy.h"
#include "dataplane/report_buffer.h"
#include "dataplane/request_record.h"
#include "dataplane/stream_relay.h"
#include "dataplane/upstream_client.h"
#include "httplib.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

constexpr char kRequestIdHeader[] = "x-request-id";

// Set by the forwarding route on the request's thread: the request record accounts for it.
// Everything else (sflb's own endpoints, auth failures, httplib's errors) is counted by the
// server's logger, which runs on the same thread after the response.
thread_local bool g_forwarded = false;
thread_local absl::Time g_request_started;

std::string DefaultReplicaId() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) host[0] = '\0';
  return absl::StrCat(host[0] ? host : "dataplane", "-", getpid());
}

// Paths answered without authentication.
bool IsPublicPath(absl::string_view path) {
  return path == "/info" || path == "/livez" || path == "/readyz";
}

// The old tool's own endpoints: they keep its error shapes.
bool IsLegacyPath(absl::string_view path) {
  return path == "/" || path == "/stats" || path == "/health" || path == "/balance" ||
         path == "/reload-keys";
}

// The pooled keys' account data (balance, identity) is for operators (see /balance): the
// user/info API is refused to non-admin callers. `canonical` as from NormalizePath and
// StripVersionPrefix, so "/v1/user/%69nfo" or "/v1//user/./info" cannot slip by.
bool IsAccountPath(absl::string_view canonical) {
  return canonical == "/user/info" || absl::StartsWith(canonical, "/user/info/");
}

void SetJson(httplib::Response& res, const nlohmann::ordered_json& body, int status = 200) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
                  "application/json");
}

// Everything the routes share. Owned by RunDataplane; outlives the server.
struct Dataplane {
  DataplaneOptions options;
  std::unique_ptr<UpstreamClient> upstream;
  KeyPool pool;
  ReportBuffer reports;
  std::unique_ptr<ControlplaneLink> link;
  std::unique_ptr<Proxy> proxy;
  std::unique_ptr<ClientAuth> auth;
  TrustedProxies trusted_proxies;
  std::unique_ptr<AdminClient> admin;
  DataplaneMetrics metrics;
  std::unique_ptr<MetricsServer> metrics_server;
  // The connection thread pool httplib created (owned by httplib while it listens).
  std::atomic<ElasticThreadPool*> thread_pool{nullptr};
  std::atomic<bool> draining{false};
  absl::Time started_at = absl::Now();

  // A request record for a proxied request, as both ways of serving start it.
  std::shared_ptr<RequestRecord> NewRecord(std::string request_id, absl::string_view method,
                                           absl::string_view path, absl::string_view peer_ip,
                                           absl::string_view forwarded_for, size_t body_bytes) {
    auto record = std::make_shared<RequestRecord>();
    record->enabled = options.request_log;
    record->metrics = &metrics;
    record->request_id = std::move(request_id);
    record->started = absl::Now();
    record->client_ip = trusted_proxies.ClientIp(peer_ip, forwarded_for);
    record->method = std::string(method);
    record->path = std::string(path);
    record->request_bytes = body_bytes;
    return record;
  }

  // StreamRelay's admission: the event loop serves a proxied request that passes
  // authentication and is not one of sflb's own endpoints or refused paths (those, and every
  // failure with its log line and error shape, stay with the routes below).
  std::shared_ptr<RequestRecord> AdmitToLoop(const RequestHead& head, absl::string_view path,
                                             absl::string_view body, const std::string& peer_ip) {
    if (IsPublicPath(path) || IsLegacyPath(path)) return nullptr;
    const std::string* authorization = head.Find("Authorization");
    if (authorization == nullptr || auth->Check(*authorization) == ClientRole::kNone) {
      return nullptr;
    }
    if (IsAccountPath(StripVersionPrefix(NormalizePath(path)))) return nullptr;
    const std::string* forwarded_for = head.Find("X-Forwarded-For");
    return NewRecord(NewRequestId(), head.method, path, peer_ip,
                     forwarded_for == nullptr ? absl::string_view() : *forwarded_for,
                     body.size());
  }

  // The /stats object from the controlplane; from this replica's snapshot when the
  // controlplane cannot be asked.
  nlohmann::ordered_json StatsJson() {
    absl::StatusOr<v1::GetStatsResponse> stats = admin->GetStats();
    if (stats.ok()) {
      absl::StatusOr<v1::GetBalancesResponse> balances =
          admin->GetBalances(/*refresh=*/false, /*cached_only=*/true);
      nlohmann::ordered_json out = LegacyStatsJson(*stats, balances.ok() ? &*balances : nullptr);
      out["source"] = "controlplane";
      return out;
    }
    nlohmann::ordered_json out;
    auto keys = pool.keys();
    size_t active = 0;
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    if (keys != nullptr) {
      for (const auto& k : *keys) {
        bool is_active = k->state == v1::KEY_STATE_ACTIVE;
        active += is_active ? 1 : 0;
        rows.push_back({{"index", k->index + 1},
                        {"requestCount", 0},
                        {"lastUsed", "Never"},
                        {"isActive", is_active},
                        {"lastBalanceCheck", "Never"},
                        {"fingerprint", k->fingerprint},
                        {"account", k->account}});
      }
    }
    out["totalKeys"] = keys == nullptr ? 0 : keys->size();
    out["activeKeys"] = active;
    out["keyStats"] = std::move(rows);
    out["source"] = "local snapshot (controlplane unreachable: counters unavailable)";
    out["controlplaneError"] = std::string(stats.status().message());
    return out;
  }
};

void InstallRoutes(httplib::Server& server, Dataplane* dp) {
  // Auth runs before routing and before the body is read.
  server.set_pre_routing_handler([dp](const httplib::Request& req, httplib::Response& res) {
    g_forwarded = false;
    g_request_started = absl::Now();
    res.set_header(kRequestIdHeader, NewRequestId());
    // Never let httplib compress: upstream bodies pass through byte for byte, and compressing a
    // stream would buffer it (see TOOLCHAIN.md). The request object is httplib's own mutable
    // local; only the const view reaches handlers.
    const_cast<httplib::Request&>(req).headers.erase("Accept-Encoding");
    if (IsPublicPath(req.path)) return httplib::Server::HandlerResponse::Unhandled;
    if (dp->auth->Check(req.get_header_value("Authorization")) != ClientRole::kNone) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    LogWarning("auth_failed", {{"client_ip", dp->trusted_proxies.ClientIp(
                                                 req.remote_addr,
                                                 req.get_header_value("X-Forwarded-For"))},
                               {"method", req.method},
                               {"path", req.path},
                               {"reason", req.has_header("Authorization") ? "wrong key"
                                                                          : "missing key"}});
    if (IsLegacyPath(req.path)) {
      SetLegacyError(res, 401, "Unauthorized",
                     "Valid API key required. Use Authorization: Bearer <your-key>");
    } else {
      SetOpenAiError(res, 401,
                     "Invalid or missing API key. Send 'Authorization: Bearer <LB_API_KEY>'.",
                     "invalid_request_error", "invalid_api_key");
    }
    // The request body (if any) was not read; do not reuse the connection.
    res.set_header("Connection", "close");
    return httplib::Server::HandlerResponse::Handled;
  });

  // Errors httplib produces itself (413, 400 on a malformed request, ...): OpenAI shape. Our own
  // handlers always set a body, so only empty bodies are filled in.
  server.set_error_handler(httplib::Server::HandlerWithResponse(
      [dp](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty() || res.content_length_ > 0) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    if (res.status == 413) {
      SetOpenAiError(res, 413,
                     absl::StrCat("request body exceeds the limit of ", dp->options.max_body_bytes,
                                  " bytes"),
                     "invalid_request_error", "request_too_large");
    } else {
      SetOpenAiError(res, res.status, absl::StrCat("request rejected by sflb (HTTP ", res.status, ")"),
                     "invalid_request_error", "bad_request");
    }
    return httplib::Server::HandlerResponse::Handled;
  }));
  server.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr) {
        LogError("handler_exception", {{"path", req.path}});
        SetOpenAiError(res, 500, "internal error in sflb", "server_error", "internal_error");
      });

  server.Get("/info", [dp](const httplib::Request&, httplib::Response& res) {
    nlohmann::ordered_json body;
    body["name"] = "SiliconFlow API Load Balancer";
    body["implementation"] = "sflb";
    body["version"] = kVersion;
    body["status"] = "running";
    body["authentication"] = "required";
    body["endpoints"] = {
        {"/", "Basic info and stats (requires API key)"},
        {"/health", "Health check (requires API key)"},
        {"/stats", "Load balancer statistics (requires API key)"},
        {"/balance", "Balance check (requires API key)"},
        {"/reload-keys", "Reload API keys (requires admin key)"},
        {"/livez", "Liveness probe (no authentication)"},
        {"/readyz", "Readiness probe (no authentication)"},
        {"/*", "Proxy to SiliconFlow API (requires API key)"}};
    SetJson(res, body);
  });
  server.Get("/livez", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  server.Get("/readyz", [dp](const httplib::Request&, httplib::Response& res) {
    bool ready = dp->pool.has_snapshot() && !dp->draining.load();
    res.status = ready ? 200 : 503;
    res.set_content(ready ? "ready\n" : "not ready\n", "text/plain");
  });
  server.Get("/health", [dp](const httplib::Request&, httplib::Response& res) {
    nlohmann::ordered_json stats = dp->StatsJson();
    size_t total = dp->pool.key_count();
    size_t usable = dp->pool.eligible_count();
    nlohmann::ordered_json body;
    body["status"] = HealthStatus(dp->pool.has_snapshot(), dp->link->connected(), total, usable);
    body["timestamp"] = FormatIso8601(absl::Now());
    body["stats"] = std::move(stats);
    body["replica"] = {{"id", dp->options.replica_id},
                       {"controlplaneConnected", dp->link->connected()},
                       {"snapshotVersion", dp->pool.version()},
                       {"totalKeys", total},
                       {"usableKeys", usable},
                       {"draining", dp->draining.load()}};
    // The old tool always answered 200; a monitoring system reads "status".
    SetJson(res, body);
  });
  server.Get("/", [dp](const httplib::Request&, httplib::Response& res) {
    nlohmann::ordered_json body;
    body["message"] = "SiliconFlow API Load Balancer";
    body["status"] = "running";
    body["stats"] = dp->StatsJson();
    SetJson(res, body);
  });
  server.Get("/stats", [dp](const httplib::Request&, httplib::Response& res) {
    SetJson(res, dp->StatsJson());
  });
  server.Get("/balance", [dp](const httplib::Request& req, httplib::Response& res) {
    bool refresh = req.get_param_value("refresh") == "true";
    absl::StatusOr<v1::GetBalancesResponse> balances = dp->admin->GetBalances(refresh);
    if (!balances.ok()) {
      nlohmann::ordered_json body;
      body["success"] = false;
      body["error"] = "Failed to check balance";
      body["message"] = std::string(balances.status().message());
      SetJson(res, body, 503);
      return;
    }
    SetJson(res, LegacyBalanceJson(*balances, absl::Now()));
  });
  // A content-reader handler: httplib tries those before plain POST handlers, so a plain one
  // would lose to the proxy's catch-all below.
  server.Post("/reload-keys", [dp](const httplib::Request& req, httplib::Response& res,
                                   const httplib::ContentReader& reader) {
    reader([](const char*, size_t) { return true; });  // no body expected; drain it
    if (dp->auth->Check(req.get_header_value("Authorization")) != ClientRole::kAdmin) {
      SetLegacyError(res, 403, "Forbidden", "Admin API key required for this operation");
      return;
    }
    nlohmann::ordered_json body;
    body["timestamp"] = FormatIso8601(absl::Now());
    absl::StatusOr<v1::ReloadResponse> reload =
        dp->admin->Reload(absl::StrCat("POST /reload-keys from ", req.remote_addr, " via ",
                                       dp->options.replica_id));
    if (reload.ok()) {
      body["success"] = true;
      body["message"] = absl::StrCat("Successfully reloaded API keys. Previous: ",
                                     reload->previous_count(), ", New: ", reload->new_count());
      body["keyCount"] = reload->new_count();
      body["added"] = std::vector<std::string>(reload->added().begin(), reload->added().end());
      body["removed"] =
          std::vector<std::string>(reload->removed().begin(), reload->removed().end());
      body["warnings"] =
          std::vector<std::string>(reload->warnings().begin(), reload->warnings().end());
      SetJson(res, body);
      return;
    }
    body["success"] = false;
    body["message"] = std::string(reload.status().message());
    body["keyCount"] = dp->pool.key_count();
    SetJson(res, body, reload.status().code() == absl::StatusCode::kFailedPrecondition ? 400 : 503);
  });

  // Everything else is the SiliconFlow API.
  server.set_logger([dp](const httplib::Request& req, const httplib::Response& res) {
    if (std::exchange(g_forwarded, false)) return;
    dp->metrics.RecordRequest(DataplaneMetrics::RouteLabelView(req.path), res.status,
                              absl::Now() - g_request_started, absl::ZeroDuration(),
                              /*upstream_answered=*/false);
  });
  auto forward = [dp](const httplib::Request& req, httplib::Response& res, std::string body) {
    g_forwarded = true;
    std::shared_ptr<RequestRecord> record =
        dp->NewRecord(res.get_header_value(kRequestIdHeader), req.method, req.path,
                      req.remote_addr, req.get_header_value("X-Forwarded-For"), body.size());
    std::string path = StripVersionPrefix(SplitTarget(req.target).first);
    // The check looks at the path as the upstream will understand it: decoded (httplib's
    // req.path) and normalized.
    if (IsAccountPath(StripVersionPrefix(NormalizePath(req.path))) &&
        dp->auth->Check(req.get_header_value("Authorization")) != ClientRole::kAdmin) {
      SetOpenAiError(res, 403, "user/info of the pooled keys is not available through sflb; "
                               "operators can use /balance or 'sflbctl balance'",
                     "permission_error", "forbidden_endpoint");
      record->status = 403;
      record->error_code = "forbidden_endpoint";
      return;
    }
    dp->proxy->Forward(req, path, std::move(body), record, res);
    record->status = res.status;
  };
  auto without_body = [forward](const httplib::Request& req, httplib::Response& res) {
    forward(req, res, std::string());
  };
  auto with_body = [dp, forward](const httplib::Request& req, httplib::Response& res,
                                 const httplib::ContentReader& reader) {
    std::string body;
    size_t limit = static_cast<size_t>(dp->options.max_body_bytes);
    bool too_large = false;
    bool complete = reader([&](const char* data, size_t length) {
      if (body.size() + length > limit) {
        too_large = true;
        return false;
      }
      body.append(data, length);
      return true;
    });
    if (too_large || res.status == 413) {
      SetOpenAiError(res, 413,
                     absl::StrCat("request body exceeds the limit of ", limit, " bytes"),
                     "invalid_request_error", "request_too_large");
      res.set_header("Connection", "close");
      return;
    }
    if (!complete) {
      SetOpenAiError(res, 400, "could not read the request body", "invalid_request_error",
                     "bad_request_body");
      res.set_header("Connection", "close");
      return;
    }
    forward(req, res, std::move(body));
  };
  // [\s\S] rather than '.': std::regex's '.' does not match a newline, and a path with an
  // encoded newline must still reach the proxy (and its request log) rather than no route.
  const char* kAll = R"(/[\s\S]*)";
  server.Get(kAll, without_body);
  server.Options(kAll, without_body);
  server.Post(kAll, with_body);
  server.Put(kAll, with_body);
  server.Patch(kAll, with_body);
  server.Delete(kAll, with_body);
}

}  // namespace

void RegisterDataplaneOptions(OptionParser* parser, DataplaneOptions* o) {
  parser->AddString("host", "SFLB_HOST", &o->host, "HTTP listen address");
  parser->AddInt("port", "PORT", &o->port, 0, 65535, "HTTP listen port (0 picks a free port)");
  parser->AddSecret("lb-api-key", "LB_API_KEY", &o->api_key,
                    "Key clients must send as 'Authorization: Bearer <key>' (required)");
  parser->AddSecret("admin-key", "LB_ADMIN_KEY", &o->admin_key,
                    "Admin key; also accepted wherever LB_API_KEY is (required, distinct)");
  parser->AddString("base-url", "SILICONFLOW_BASE_URL", &o->base_url, "SiliconFlow API base URL");
  parser->AddString("controlplane", "SFLB_CONTROLPLANE", &o->controlplane,
                    "Controlplane gRPC address host:port");
  parser->AddString("controlplane-ca-file", "SFLB_CONTROLPLANE_CA_FILE", &o->controlplane_ca_file,
                    "CA (PEM) of the controlplane's certificate; enables TLS to the controlplane");
  parser->AddString("controlplane-cert-file", "SFLB_CONTROLPLANE_CERT_FILE",
                    &o->controlplane_cert_file, "Client certificate (PEM) for mutual TLS");
  parser->AddString("controlplane-key-file", "SFLB_CONTROLPLANE_KEY_FILE",
                    &o->controlplane_key_file, "Client private key (PEM) for mutual TLS");
  parser->AddString("controlplane-server-name", "SFLB_CONTROLPLANE_SERVER_NAME",
                    &o->controlplane_server_name,
                    "Name expected in the controlplane's certificate, if not the address host");
  parser->AddSecret("dataplane-token", "SFLB_DATAPLANE_TOKEN", &o->dataplane_token,
                    "Token presented to the controlplane's key service");
  parser->AddString("replica-id", "SFLB_REPLICA_ID", &o->replica_id,
                    "Name of this replica in controlplane stats (default hostname-pid)");
  parser->AddDuration("connect-timeout", "SFLB_CONNECT_TIMEOUT", &o->connect_timeout,
                      "Upstream TCP+TLS connect timeout");
  parser->AddDuration("first-byte-timeout", "SFLB_FIRST_BYTE_TIMEOUT", &o->first_byte_timeout,
                      "Longest wait for the upstream's response head (a model may think long)");
  parser->AddDuration("idle-timeout", "SFLB_IDLE_TIMEOUT", &o->idle_timeout,
                      "Longest silence between upstream body bytes");
  parser->AddDuration("stream-first-byte-timeout", "SFLB_STREAM_FIRST_BYTE_TIMEOUT",
                      &o->stream_first_byte_timeout,
                      "A stream with no first byte by then is abandoned and retried on another key");
  parser->AddDuration("default-cooldown", "SFLB_DEFAULT_COOLDOWN", &o->default_cooldown,
                      "Local cooldown after a 429 that names no limit (until the controlplane's)");
  parser->AddString("upstream-ca-file", "SFLB_UPSTREAM_CA_FILE", &o->upstream_ca_file,
                    "Extra CA bundle (PEM) trusted for the upstream, besides the system store");
  parser->AddInt("max-attempts", "SFLB_MAX_ATTEMPTS", &o->max_attempts, 1, 20,
                 "Upstream attempts per request, each with a different key");
  parser->AddInt("max-body-bytes", "SFLB_MAX_BODY_BYTES", &o->max_body_bytes, 1024,
                 int64_t{1} << 32, "Largest request body accepted (413 beyond)");
  parser->AddInt("max-connections", "SFLB_MAX_CONNECTIONS", &o->max_connections, 16, 1000000,
                 "Most requests served on threads at once (streams until their first byte, "
                 "sflb's own endpoints, what the event loops leave to threads), and most "
                 "workers opening upstream connections");
  parser->AddInt("relay-threads", "SFLB_RELAY_THREADS", &o->relay_threads, 0, 64,
                 "Event-loop threads: idle client connections, plain proxied requests and "
                 "committed streams (0: a thread per connection instead)");
  parser->AddDuration("client-read-timeout", "SFLB_CLIENT_READ_TIMEOUT", &o->client_read_timeout,
                      "Timeout reading a request from a client");
  parser->AddDuration("client-write-timeout", "SFLB_CLIENT_WRITE_TIMEOUT",
                      &o->client_write_timeout, "Timeout writing to a client");
  parser->AddDuration("keep-alive-timeout", "SFLB_KEEP_ALIVE_TIMEOUT", &o->keep_alive_timeout,
                      "How long an idle client connection is kept open");
  parser->AddDuration("drain-grace", "SFLB_DRAIN_GRACE", &o->drain_grace,
                      "On SIGTERM, keep accepting this long (readyz fails) before closing");
  parser->AddDuration("drain-timeout", "SFLB_DRAIN_TIMEOUT", &o->drain_timeout,
                      "After closing, how long in-flight requests and streams may finish");
  parser->AddString("trusted-proxies", "SFLB_TRUSTED_PROXIES", &o->trusted_proxies,
                    "IPs/CIDRs whose X-Forwarded-For is believed for the logged client IP");
  parser->AddString("metrics-listen", "SFLB_METRICS_LISTEN", &o->metrics_listen,
                    "Prometheus /metrics listener host:port, or 'off'");
  parser->AddString("log-level", "SFLB_LOG_LEVEL", &o->log_level,
                    "Log level: debug, info, warning, error");
  parser->AddBool("request-log", "SFLB_REQUEST_LOG", &o->request_log,
                  "Write one JSON log line per request");
  parser->AddDuration("request-log-flush", "SFLB_REQUEST_LOG_FLUSH", &o->request_log_flush,
                      "Write request-log lines in batches at least this often (0: each at once)");
}

absl::Status ValidateDataplaneOptions(const DataplaneOptions& o) {
  if (o.api_key.empty()) {
    return absl::InvalidArgumentError(
        "LB_API_KEY is required: the key clients send as 'Authorization: Bearer <key>'");
  }
  if (o.admin_key.empty()) {
    return absl::InvalidArgumentError("LB_ADMIN_KEY is required: the key for admin endpoints");
  }
  if (o.api_key == o.admin_key) {
    return absl::InvalidArgumentError(
        "LB_API_KEY and LB_ADMIN_KEY must differ: a user key must not grant admin rights");
  }
  absl::StatusOr<UpstreamEndpoint> endpoint = ParseBaseUrl(o.base_url);
  if (!endpoint.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("SILICONFLOW_BASE_URL: ", endpoint.status().message()));
  }
  if (o.controlplane.empty()) return absl::InvalidArgumentError("SFLB_CONTROLPLANE is empty");
  if (absl::StatusOr<TrustedProxies> t = TrustedProxies::Parse(o.trusted_proxies); !t.ok()) {
    return t.status();
  }
  LogLevel level;
  if (!ParseLogLevel(o.log_level, &level)) {
    return absl::InvalidArgumentError(absl::StrCat("SFLB_LOG_LEVEL: unknown level '", o.log_level, "'"));
  }
  if (o.request_log_flush > absl::Seconds(10)) {
    return absl::InvalidArgumentError(
        "SFLB_REQUEST_LOG_FLUSH: at most 10s (pending request-log lines are lost on a crash)");
  }
  if (o.request_log_flush > absl::ZeroDuration() && o.request_log_flush < absl::Milliseconds(10)) {
    return absl::InvalidArgumentError(
        "SFLB_REQUEST_LOG_FLUSH: 0 (each line at once) or at least 10ms");
  }
  return absl::OkStatus();
}

absl::Status RunDataplane(const DataplaneOptions& options) {
  auto dp = std::make_unique<Dataplane>();
  dp->options = options;
  if (dp->options.replica_id.empty()) dp->options.replica_id = DefaultReplicaId();

  absl::StatusOr<UpstreamEndpoint> endpoint = ParseBaseUrl(options.base_url);
  if (!endpoint.ok()) return endpoint.status();
  UpstreamClientOptions upstream_options;
  upstream_options.connect_timeout = options.connect_timeout;
  upstream_options.first_byte_timeout = options.first_byte_timeout;
  upstream_options.idle_timeout = options.idle_timeout;
  upstream_options.ca_file = options.upstream_ca_file;
  dp->upstream = std::make_unique<UpstreamClient>(*endpoint, upstream_options);
  if (absl::Status init = dp->upstream->init_status(); !init.ok()) return init;

  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeControlplaneChannel(
      options.controlplane,
      ControlplaneTls{options.controlplane_ca_file, options.controlplane_cert_file,
                      options.controlplane_key_file, options.controlplane_server_name});
  if (!channel.ok()) return channel.status();
  ControlplaneLink::Options link_options;
  link_options.address = options.controlplane;
  link_options.replica_id = dp->options.replica_id;
  link_options.token = options.dataplane_token;
  dp->link = std::make_unique<ControlplaneLink>(link_options, *channel, &dp->pool, &dp->reports);
  ProxyOptions proxy_options;
  proxy_options.max_attempts = static_cast<int>(options.max_attempts);
  proxy_options.stream_first_byte_timeout = options.stream_first_byte_timeout;
  proxy_options.cooldown.default_cooldown = options.default_cooldown;
  dp->proxy = std::make_unique<Proxy>(proxy_options, dp->upstream.get(), &dp->pool, &dp->reports,
                                      &dp->metrics);
  if (options.metrics_listen != "off") {
    absl::StatusOr<std::unique_ptr<MetricsServer>> metrics =
        MetricsServer::Start(options.metrics_listen, dp->metrics.registry());
    if (!metrics.ok()) return metrics.status();
    dp->metrics_server = std::move(*metrics);
    LogInfo("metrics_listening", {{"address", options.metrics_listen},
                                  {"port", dp->metrics_server->port()}});
  }
  dp->auth = std::make_unique<ClientAuth>(options.api_key, options.admin_key);
  dp->trusted_proxies = *TrustedProxies::Parse(options.trusted_proxies);  // validated before
  dp->admin = std::make_unique<AdminClient>(*channel, options.admin_key, absl::Seconds(5),
                                            absl::Seconds(1));

  HttpServer server;
  std::unique_ptr<StreamRelay> relay;
  if (options.relay_threads > 0) {
    StreamRelayOptions relay_options;
    relay_options.threads = static_cast<int>(options.relay_threads);
    relay_options.idle_timeout = options.idle_timeout;
    relay_options.write_timeout = options.client_write_timeout;
    relay_options.keep_alive_timeout = options.keep_alive_timeout;
    relay_options.read_timeout = options.client_read_timeout;
    relay_options.max_body_bytes = static_cast<size_t>(options.max_body_bytes);
    relay_options.first_byte_timeout = options.first_byte_timeout;
    relay_options.max_workers = static_cast<size_t>(options.max_connections);
    Dataplane* dp_admit = dp.get();
    relay = std::make_unique<StreamRelay>(
        relay_options, &server, dp->proxy.get(),
        [dp_admit](const RequestHead& head, absl::string_view path, absl::string_view body,
                   const std::string& peer_ip) {
          return dp_admit->AdmitToLoop(head, path, body, peer_ip);
        });
    dp->proxy->set_relay(relay.get());
    StreamRelay* relay_raw = relay.get();
    server.SetParkHandler([relay_raw](int fd) { return relay_raw->Park(fd); });
  }
  size_t max_connections = static_cast<size_t>(options.max_connections);
  Dataplane* dp_raw = dp.get();
  server.new_task_queue = [max_connections, dp_raw] {
    auto* pool = new ElasticThreadPool(max_connections, /*min_idle=*/8, absl::Seconds(30));
    dp_raw->thread_pool.store(pool);
    return pool;
  };
  auto to_parts = [](absl::Duration d, time_t* sec, time_t* usec) {
    int64_t us = absl::ToInt64Microseconds(d);
    *sec = static_cast<time_t>(us / 1000000);
    *usec = static_cast<time_t>(us % 1000000);
  };
  time_t sec, usec;
  to_parts(options.client_read_timeout, &sec, &usec);
  server.set_read_timeout(sec, usec);
  to_parts(options.client_write_timeout, &sec, &usec);
  server.set_write_timeout(sec, usec);
  server.set_keep_alive_timeout(
      static_cast<time_t>(absl::ToInt64Seconds(options.keep_alive_timeout)));
  server.set_keep_alive_max_count(100000);
  server.set_payload_max_length(static_cast<size_t>(options.max_body_bytes));
  server.set_tcp_nodelay(true);
  InstallRoutes(server, dp.get());

  int port = options.port == 0 ? server.bind_to_any_port(options.host)
                               : (server.bind_to_port(options.host, static_cast<int>(options.port))
                                      ? static_cast<int>(options.port)
                                      : -1);
  if (port <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.host, ":",
                                               options.port, " (address in use?)"));
  }
  // httplib listens with a backlog of 5: a burst of connects would see SYNs dropped.
  if (!server.RaiseBacklog(4096)) LogWarning("listen_backlog_not_raised");
  dp->link->Start();
  // From here on the only way out is the end of this function, which flushes.
  StartLogBuffering(options.request_log_flush);
  LogInfo("listening", {{"address", absl::StrCat(options.host, ":", port)},
                        {"port", port},
                        {"upstream", endpoint->Origin() + endpoint->base_path},
                        {"controlplane", options.controlplane},
                        {"replica", dp->options.replica_id},
                        {"version", kVersion}});
  std::atomic<bool> listener_done{false};
  std::thread listener([&server, &listener_done] {
    server.ListenAfterBind();  // returns once every connection has finished
    listener_done.store(true);
  });

  for (;;) {
    int sig = WaitForSignal(absl::Seconds(1));
    dp->metrics.SetPool(dp->pool.key_count(), dp->pool.eligible_count(),
                        dp->pool.leased_remaining(), dp->link->connected());
    if (ElasticThreadPool* threads = dp->thread_pool.load()) {
      ElasticThreadPool::Stats st = threads->stats();
      dp->metrics.SetThreads(st.threads, st.busy, st.queued);
    }
    if (sig == SIGTERM || sig == SIGINT) {
      LogInfo("draining", {{"signal", sig}, {"grace_ms", absl::ToInt64Milliseconds(options.drain_grace)}});
      break;
    }
  }
  // Drain: /readyz fails at once; new connections are still served for the grace so load
  // balancers can catch up; then the listener closes, idle connections close, and requests in
  // flight get until the drain deadline.
  dp->draining.store(true);
  dp->thread_pool.store(nullptr);
  absl::Time grace_end = absl::Now() + options.drain_grace;
  while (absl::Now() < grace_end) {
    if (WaitForSignal(std::min(absl::Seconds(1), grace_end - absl::Now())) == SIGINT) break;
  }
  server.StopAccepting();  // not stop(): that would cut every stream at once
  server.CloseIdleConnections();
  absl::Time deadline = absl::Now() + options.drain_timeout;
  LogInfo("listener_closed", {{"open_connections", server.open_connections()},
                              {"drain_timeout_ms", absl::ToInt64Milliseconds(options.drain_timeout)}});
  while (!listener_done.load() && absl::Now() < deadline) {
    int sig = WaitForSignal(absl::Milliseconds(100));
    if (sig == SIGINT) break;  // a second, impatient signal: end now
    server.CloseIdleConnections();  // connections that just finished a request
  }
  if (!listener_done.load()) {
    LogWarning("drain_deadline", {{"open_connections", server.open_connections()}});
    dp->proxy->AbortAll();  // streams end with an SSE error event within about a second
    absl::Time hard = absl::Now() + absl::Seconds(5);
    while (!listener_done.load() && absl::Now() < hard) absl::SleepFor(absl::Milliseconds(50));
    server.CloseConnections();
  }
  listener.join();
  if (relay != nullptr) relay->Stop();
  dp->link->Stop();
  StopLogBuffering();
  LogInfo("stopped");
  return absl::OkStatus();
}

}  // namespace sflb
