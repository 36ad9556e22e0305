#include "controlplane/controlplane_server.h"

#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/mutex.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/signals.h"
#include "common/version.h"
#include "controlplane/admin_service.h"
#include "controlplane/key_registry.h"
#include "controlplane/key_service.h"
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
}

std::string DefaultStateFile(const std::string& keys_file) {
  size_t slash = keys_file.rfind('/');
  std::string dir = slash == std::string::npos ? "" : keys_file.substr(0, slash + 1);
  return dir + "sflb-state.json";
}

absl::Status ValidateControlplaneOptions(const ControlplaneOptions& options) {
  if (options.admin_key.empty()) {
    return absl::InvalidArgumentError(
        "LB_ADMIN_KEY is required: set it (or --admin-key-file) to the key sflbctl will present");
  }
  if (options.listen.empty()) return absl::InvalidArgumentError("SFLB_LISTEN is empty");
  if (options.watch_heartbeat < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError("SFLB_WATCH_HEARTBEAT must be at least 100ms");
  }
  LogLevel level;
  if (!ParseLogLevel(options.log_level, &level)) {
    return absl::InvalidArgumentError(
        absl::StrCat("SFLB_LOG_LEVEL: unknown level '", options.log_level, "'"));
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
  StateStore state_store(options.state_file.empty() ? DefaultStateFile(options.keys_file)
                                                    : options.state_file);

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

  KeyServiceImpl key_service(&registry, options.watch_heartbeat);
  AdminServiceImpl admin_service(options.admin_key, &registry, &source, &key_service, started_at);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &selected_port);
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
  std::thread maintenance([&] {
    MutexLock lock(&maintenance_mu);
    while (!stopping.load()) {
      maintenance_cv.WaitWithTimeout(&maintenance_mu, absl::Milliseconds(100));
      if (stopping.load()) break;
      registry.Tick(key_service.replica_ids());
      save_state(false);
    }
  });

  for (;;) {
    int sig = WaitForSignal(absl::Seconds(1));
    if (sig == SIGHUP) {
      absl::StatusOr<ReloadOutcome> outcome = source.Reload();
      if (outcome.ok()) {
        LogInfo("keys_reloaded", {{"trigger", "SIGHUP"},
                                  {"previous", outcome->change.previous_count},
                                  {"new", outcome->change.new_count},
                                  {"added", outcome->change.added},
                                  {"removed", outcome->change.removed},
                                  {"warnings", outcome->warnings}});
      } else {
        LogWarning("reload_failed", {{"trigger", "SIGHUP"},
                                     {"reason", std::string(outcome.status().message())}});
      }
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
  key_service.Shutdown();
  if (grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService()) {
    health->Shutdown();
  }
  server->Shutdown(absl::ToChronoTime(absl::Now() + options.shutdown_grace));
  server->Wait();
  save_state(true);
  LogInfo("stopped", {{"state_file", state_store.path()}});
  return absl::OkStatus();
}

}  // namespace sflb
