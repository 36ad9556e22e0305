#include "controlplane/controlplane_server.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/signals.h"
#include "common/version.h"
#include "controlplane/admin_service.h"
#include "controlplane/key_registry.h"
#include "controlplane/key_service.h"
#include "controlplane/audit_log.h"
#include "common/metrics_server.h"
#include "controlplane/balance_checker.h"
#include "controlplane/controlplane_metrics.h"
#include "controlplane/key_balances.h"
#include "controlplane/key_source.h"
#include "controlplane/state_store.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace sflb {

void RegisterControlplaneOptions(OptionParser* parser, ControlplaneOptions* options) {
  parser->AddString("listen", "SFLB_LISTEN", &options->listen,
                    "gRPC listen address host:port (port 0 picks a free port)");
  parser->AddString("keys-file", "SFLB_KEYS_FILE", &options->keys_file,
                    "Keys file, one key per line; when missing, SILICONFLOW_API_KEY_1..N are read");
  parser->AddSecret("admin-key", "LB_ADMIN_KEY", &options->admin_key,
                    "Admin key that sflbctl and dataplane admin endpoints must present (required)");
  parser->AddString("base-url", "SILICONFLOW_BASE_URL", &options->base_url,
                    "SiliconFlow API base URL (for balance checks)");
  parser->AddDuration("watch-heartbeat", "SFLB_WATCH_HEARTBEAT", &options->watch_heartbeat,
                      "Longest silence on a dataplane watch stream before a heartbeat");
  parser->AddDuration("shutdown-grace", "SFLB_SHUTDOWN_GRACE", &options->shutdown_grace,
                      "Time in-flight RPCs get to finish on SIGTERM");
  parser->AddString("log-level", "SFLB_LOG_LEVEL", &options->log_level,
                    "Log level: debug, info, warning, error");
  parser->AddString("state-file", "SFLB_STATE_FILE", &options->state_file,
                    "State file for key states, counters and rate-limit blocks (default: "
                    "sflb-state.json beside the keys file)");
  parser->AddDuration("default-cooldown", "SFLB_DEFAULT_COOLDOWN", &options->default_cooldown,
                      "Cooldown after a 429 that names no limit and has no Retry-After");
  parser->AddDuration("max-cooldown", "SFLB_MAX_COOLDOWN", &options->max_cooldown,
                      "Cap of the exponential backoff of repeated 429s (per-day limits excepted)");
  parser->AddDuration("probe-timeout", "SFLB_PROBE_TIMEOUT", &options->probe_timeout,
                      "Time a replica named to probe a half-open scope has before another is");
  parser->AddString("audit-log", "SFLB_AUDIT_LOG", &options->audit_log,
                    "Audit log (JSON Lines), or 'off' (default: sflb-audit.jsonl beside the keys "
                    "file)");
  parser->AddInt("audit-max-bytes", "SFLB_AUDIT_MAX_BYTES", &options->audit_max_bytes, 4096,
                 int64_t{1} << 40, "Audit log size that triggers rotation");
  parser->AddInt("audit-max-files", "SFLB_AUDIT_MAX_FILES", &options->audit_max_files, 0, 1000,
                 "Rotated audit log files kept");
  parser->AddDuration("balance-cache-ttl", "SFLB_BALANCE_CACHE_TTL", &options->balance_cache_ttl,
                      "How long a fetched balance is served from the cache");
  parser->AddInt("balance-concurrency", "SFLB_BALANCE_CONCURRENCY", &options->balance_concurrency,
                 1, 256, "Balance requests to the upstream in parallel");
  parser->AddDuration("balance-timeout", "SFLB_BALANCE_TIMEOUT", &options->balance_timeout,
                      "Timeout of one balance request");
  parser->AddDuration("balance-watch-interval", "SFLB_BALANCE_WATCH_INTERVAL",
                      &options->balance_watch_interval,
                      "How often every balance is refreshed in the background (0 = off)");
  parser->AddString("depleted-threshold", "SFLB_DEPLETED_THRESHOLD", &options->depleted_threshold,
                    "A known balance at or below this marks a key depleted");
  parser->AddString("tls-cert-file", "SFLB_TLS_CERT_FILE", &options->tls_cert_file,
                    "gRPC TLS certificate (PEM); with --tls-key-file enables TLS");
  parser->AddString("tls-key-file", "SFLB_TLS_KEY_FILE", &options->tls_key_file,
                    "gRPC TLS private key (PEM)");
  parser->AddString("tls-client-ca-file", "SFLB_TLS_CLIENT_CA_FILE", &options->tls_client_ca_file,
                    "CA (PEM) for client certificates; when set, clients must present one (mTLS)");
  parser->AddSecret("dataplane-token", "SFLB_DATAPLANE_TOKEN", &options->dataplane_token,
                    "Token dataplanes must present on the key service (distinct from the admin "
                    "key); empty leaves the key service open");
  parser->AddString("metrics-listen", "SFLB_METRICS_LISTEN", &options->metrics_listen,
                    "Prometheus /metrics listener host:port, or 'off'");
  parser->AddDuration("keys-file-poll", "SFLB_KEYS_FILE_POLL", &options->keys_file_poll,
                      "How often the keys file is checked for changes and reloaded (0 = never)");
}

std::string FileBeside(const std::string& keys_file, const std::string& name) {
  size_t slash = keys_file.rfind('/');
  std::string dir = slash == std::string::npos ? "" : keys_file.substr(0, slash + 1);
  return dir + name;
}

// Identity of the keys file's content as far as stat tells (follows symlinks, so a Kubernetes
// Secret's atomic symlink swap shows up).
std::string FileStamp(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return "missing";
  return absl::StrCat(st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec);
}



absl::Status ValidateControlplaneOptions(const ControlplaneOptions& options) {
  if (options.admin_key.empty()) {
    return absl::InvalidArgumentError(
        "LB_ADMIN_KEY is required: set it (or --admin-key-file) to the key sflbctl will present");
  }
  if (options.listen.empty()) return absl::InvalidArgumentError("SFLB_LISTEN is empty");
  if (!options.dataplane_token.empty() && options.dataplane_token == options.admin_key) {
    return absl::InvalidArgumentError(
        "SFLB_DATAPLANE_TOKEN and LB_ADMIN_KEY must differ: dataplanes must not hold admin rights");
  }
  if (options.watch_heartbeat < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError("SFLB_WATCH_HEARTBEAT must be at least 100ms");
  }
  LogLevel level;
  if (!ParseLogLevel(options.log_level, &level)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SFLB_LOG_LEVEL: unknown level '", options.log_level, "'"));
  }
  double threshold;
  if (!absl::SimpleAtod(options.depleted_threshold, &threshold) || !std::isfinite(threshold)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SFLB_DEPLETED_THRESHOLD: expected a number like 0 or 0.5, got '",
        options.depleted_threshold, "'"));
  }
  return absl::OkStatus();
}

absl::Status RunControlplane(const ControlplaneOptions& options, const EnvLookup& env) {
  absl::Time started_at = absl::Now();
  ScopeBlockOptions block_options;
  block_options.cooldown.default_cooldown = options.default_cooldown;
  block_options.cooldown.max_cooldown = options.max_cooldown;
  block_options.probe_timeout = options.probe_timeout;
  KeyRegistry registry(RealClock::Get(), block_options);
  KeySource source(options.keys_file, env, &registry);
  StateStore state_store(options.state_file.empty()
                             ? FileBeside(options.keys_file, "sflb-state.json")
                             : options.state_file);
  std::unique_ptr<AuditLog> audit;
  if (options.audit_log != "off") {
    AuditLogOptions audit_options;
    audit_options.path = options.audit_log.empty()
                             ? FileBeside(options.keys_file, "sflb-audit.jsonl")
                             : options.audit_log;
    audit_options.max_bytes = static_cast<uint64_t>(options.audit_max_bytes);
    audit_options.max_files = static_cast<int>(options.audit_max_files);
    absl::StatusOr<std::unique_ptr<AuditLog>> opened = AuditLog::Open(audit_options);
    if (!opened.ok()) return opened.status();
    audit = std::move(*opened);
  }
  auto audit_event = [&audit](const std::string& type, const std::string& actor,
                              nlohmann::json details) {
    if (audit == nullptr) return;
    absl::Status w = audit->Append(AuditEntry{type, actor, std::move(details)});
    if (!w.ok()) LogError("audit_write_failed", {{"reason", std::string(w.message())}});
  };
  BalanceCheckerOptions balance_options;
  balance_options.base_url = options.base_url;
  balance_options.timeout = options.balance_timeout;
  balance_options.max_concurrency = static_cast<int>(options.balance_concurrency);
  balance_options.cache_ttl = options.balance_cache_ttl;
  BalanceChecker balance_checker(balance_options);
  double threshold = 0;
  absl::SimpleAtod(options.depleted_threshold, &threshold);
  KeyBalances balances(&registry, &balance_checker, audit.get(), threshold);

  std::string keys_stamp = FileStamp(options.keys_file);
  absl::StatusOr<ReloadOutcome> initial = source.Reload();
  if (initial.ok()) {
    LogInfo("keys_loaded", {{"count", initial->change.new_count},
                            {"source", initial->source},
                            {"warnings", initial->warnings}});
  } else {
    // Starting empty lets a Secret or a keys file arrive later (reload / SIGHUP); dataplanes
    // answer 503 until then.
    LogError("no_keys_loaded", {{"reason", std::string(initial.status().message())},
                                {"hint", "create the keys file or set SILICONFLOW_API_KEY_1, then "
                                         "run 'sflbctl reload' or send SIGHUP"}});
  }

  absl::StatusOr<nlohmann::json> saved = state_store.Load();
  if (saved.ok()) {
    registry.ImportState(*saved);
    LogInfo("state_restored", {{"file", state_store.path()}});
  } else if (!absl::IsNotFound(saved.status())) {
    // A damaged state file must not keep the pool down: start fresh, keep the file for a look.
    LogError("state_unreadable", {{"file", state_store.path()},
                                  {"reason", std::string(saved.status().message())}});
  }

  // A state file that cannot be written would silently forget states at the next restart:
  // refuse to start instead.
  if (absl::Status writable = state_store.Save(registry.ExportState()); !writable.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the state file cannot be written (set SFLB_STATE_FILE to a writable path): ",
        writable.message()));
  }
  ControlplaneMetrics metrics;
  std::unique_ptr<MetricsServer> metrics_server;
  if (options.metrics_listen != "off") {
    absl::StatusOr<std::unique_ptr<MetricsServer>> started =
        MetricsServer::Start(options.metrics_listen, metrics.registry());
    if (!started.ok()) return started.status();
    metrics_server = std::move(*started);
    LogInfo("metrics_listening",
            {{"address", options.metrics_listen}, {"port", metrics_server->port()}});
  }

  KeyServiceImpl key_service(&registry, options.watch_heartbeat, audit.get(),
                             options.dataplane_token, options.admin_key);
  AdminServiceImpl admin_service(options.admin_key, &registry, &source, &key_service, audit.get(),
                                 &balances, started_at, options.dataplane_token);
  audit_event("start", "controlplane",
              {{"keys", registry.size()}, {"source", source.current_source()}});

  // One place for reloads not made through the AdminService (SIGHUP, a changed keys file).
  auto reload = [&](const std::string& trigger) {
    const size_t running = registry.size();
    absl::StatusOr<ReloadOutcome> outcome = source.Reload();
    LogReload(outcome, running, {{"trigger", trigger}});
    audit_event("reload", trigger, ReloadAuditDetails(outcome, running));
  };

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = MakeServerCredentials(
      ServerTls{options.tls_cert_file, options.tls_key_file, options.tls_client_ca_file});
  if (!credentials.ok()) return credentials.status();
  if (options.dataplane_token.empty()) {
    LogWarning("key_service_open", {{"hint", "set SFLB_DATAPLANE_TOKEN so only dataplanes can "
                                             "read the keys"}});
  }
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(options.listen, *credentials, &selected_port);
  builder.RegisterService(&key_service);
  builder.RegisterService(&admin_service);
  builder.SetMaxReceiveMessageSize(16 * 1024 * 1024);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || selected_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen, " (address in use or invalid?)"));
  }
  std::string host = options.listen.substr(0, options.listen.rfind(':'));
  LogInfo("listening", {{"address", absl::StrCat(host, ":", selected_port)},
                        {"port", selected_port},
                        {"tls", options.tls_cert_file.empty()
                                    ? "off"
                                    : (options.tls_client_ca_file.empty() ? "tls" : "mtls")},
                        {"version", kVersion}});

  // Maintenance: time-driven state transitions every 100 ms, the state file when it changed.
  std::atomic<bool> stopping{false};
  Mutex maintenance_mu;
  CondVar maintenance_cv;
  uint64_t saved_generation = registry.state_generation();
  absl::Time last_save = absl::Now();
  auto save_state = [&](bool force) {
    uint64_t generation = registry.state_generation();
    // Counters change without a generation bump: save them at least every 30 s.
    if (!force && generation == saved_generation && absl::Now() - last_save < absl::Seconds(30)) {
      return;
    }
    absl::Status saved_ok = state_store.Save(registry.ExportState());
    if (!saved_ok.ok()) {
      LogError("state_save_failed", {{"reason", std::string(saved_ok.message())}});
      return;
    }
    saved_generation = generation;
    last_save = absl::Now();
  };
  absl::Time next_keys_check = absl::Now() + options.keys_file_poll;
  absl::Time next_metrics = absl::Now();
  std::thread maintenance([&] {
    MutexLock lock(&maintenance_mu);
    while (!stopping.load()) {
      maintenance_cv.WaitWithTimeout(&maintenance_mu, absl::Milliseconds(100));
      if (stopping.load()) break;
      for (const KeyRegistry::StateChange& c : registry.Tick(key_service.replica_ids())) {
        audit_event("key_state", c.actor,
                    {{"key", c.fingerprint},
                     {"from", v1::KeyState_Name(c.from)},
                     {"to", v1::KeyState_Name(c.to)},
                     {"reason", c.reason}});
      }
      save_state(false);
      if (absl::Now() >= next_metrics) {
        next_metrics = absl::Now() + absl::Seconds(1);
        metrics.Update(registry.GetCounts(), key_service.watching_replicas(),
                       key_service.lease_calls(), key_service.report_calls(),
                       registry.leased_total());
      }
      if (options.keys_file_poll > absl::ZeroDuration() && absl::Now() >= next_keys_check) {
        next_keys_check = absl::Now() + options.keys_file_poll;
        std::string stamp = FileStamp(options.keys_file);
        if (stamp != keys_stamp) {
          keys_stamp = stamp;
          if (stamp != "missing") reload("keys-file-watch");
        }
      }
    }
  });
  // Background balance refresh: the first one after one interval, so start-up stays quiet.
  std::thread balance_watch([&] {
    if (options.balance_watch_interval <= absl::ZeroDuration()) return;
    MutexLock lock(&maintenance_mu);
    absl::Time next = absl::Now() + options.balance_watch_interval;
    while (!stopping.load()) {
      maintenance_cv.WaitWithDeadline(&maintenance_mu, std::min(next, absl::Now() + absl::Seconds(1)));
      if (stopping.load() || absl::Now() < next) continue;
      maintenance_mu.Unlock();
      metrics.RecordBalances(balances.Check(/*refresh=*/false, /*cached_only=*/false),
                             registry.AccountsById());
      maintenance_mu.Lock();
      next = absl::Now() + options.balance_watch_interval;
    }
  });

  for (;;) {
    int sig = WaitForSignal(absl::Seconds(1));
    if (sig == SIGHUP) {
      reload("SIGHUP");
      continue;
    }
    if (sig == SIGTERM || sig == SIGINT) {
      LogInfo("shutting_down", {{"signal", sig}});
      break;
    }
  }
  {
    MutexLock lock(&maintenance_mu);
    stopping.store(true);
    maintenance_cv.SignalAll();
  }
  maintenance.join();
  balance_watch.join();
  key_service.Shutdown();
  if (grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService()) {
    health->Shutdown();
  }
  server->Shutdown(absl::ToChronoTime(absl::Now() + options.shutdown_grace));
  server->Wait();
  save_state(true);
  audit_event("stop", "controlplane", nlohmann::json::object());
  LogInfo("stopped", {{"state_file", state_store.path()}});
  return absl::OkStatus();
}

}  // namespace sflb
