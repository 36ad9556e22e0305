#include "controlplane/key_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/secret_compare.h"
#include "common/time_format.h"

namespace sflb {
namespace {

constexpr uint32_t kMaxLease = 8192;
constexpr size_t kMaxReplicaIdLength = 256;
// How often a waiting Watch handler checks for cancellation and shutdown.
constexpr absl::Duration kWaitSlice = absl::Milliseconds(250);

grpc::Status CheckReplicaId(const std::string& replica_id) {
  if (replica_id.size() > kMaxReplicaIdLength) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("replica_id longer than ", kMaxReplicaIdLength, " bytes"));
  }
  return grpc::Status::OK;
}

}  // namespace

KeyServiceImpl::KeyServiceImpl(KeyRegistry* registry, absl::Duration heartbeat,
                               AuditLog* audit, std::string dataplane_token, std::string admin_key)
    : registry_(registry),
      heartbeat_(heartbeat),
      audit_(audit),
      dataplane_token_(std::move(dataplane_token)),
      admin_key_(std::move(admin_key)) {}

grpc::Status KeyServiceImpl::Authenticate(grpc::ServerContext* context, const char* method) const {
  if (dataplane_token_.empty()) return grpc::Status::OK;
  std::string presented = BearerToken(*context);
  if (SecretEquals(presented, dataplane_token_)) return grpc::Status::OK;
  bool admin = SecretEquals(presented, admin_key_);
  const char* reason = presented.empty() ? "missing token" : (admin ? "admin key" : "wrong token");
  LogWarning("dataplane_auth_failed", {{"method", method}, {"peer", context->peer()}, {"reason", reason}});
  if (audit_ != nullptr) {
    absl::Status w = audit_->Append(AuditEntry{
        "auth_failed", context->peer(), {{"service", "KeyService"}, {"method", method}, {"reason", reason}}});
    if (!w.ok()) LogError("audit_write_failed", {{"reason", std::string(w.message())}});
  }
  if (admin) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "the admin key cannot use the key service; dataplanes use "
                        "SFLB_DATAPLANE_TOKEN");
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      presented.empty() ? "dataplane token required" : "dataplane token rejected");
}

grpc::Status KeyServiceImpl::Watch(grpc::ServerContext* context, const v1::WatchRequest* request,
                                   grpc::ServerWriter<v1::WatchResponse>* writer) {
  grpc::Status auth = Authenticate(context, "Watch");
  if (!auth.ok()) return auth;
  grpc::Status valid = CheckReplicaId(request->replica_id());
  if (!valid.ok()) return valid;
  watchers_.fetch_add(1);
  {
    MutexLock lock(&replicas_mu_);
    replicas_.insert(request->replica_id());
  }
  LogInfo("watch_opened", {{"replica", request->replica_id()}, {"peer", context->peer()}});

  v1::WatchResponse first;
  *first.mutable_snapshot() = registry_->BuildSnapshot();
  *first.mutable_sent_at() = ToProtoTime(absl::Now());
  uint64_t sent_version = first.snapshot().version();
  bool open = writer->Write(first);
  absl::Time last_write = absl::Now();

  while (open && !context->IsCancelled() && !shutting_down_.load()) {
    v1::WatchResponse next;
    if (registry_->BuildUpdate(sent_version, &next)) {
      sent_version = next.has_snapshot() ? next.snapshot().version() : next.delta().version();
    } else if (absl::Now() - last_write < heartbeat_) {
      registry_->WaitForChange(sent_version, kWaitSlice);
      continue;
    }
    // Either an update or a heartbeat (no update set).
    *next.mutable_sent_at() = ToProtoTime(absl::Now());
    open = writer->Write(next);
    last_write = absl::Now();
  }
  watchers_.fetch_sub(1);
  {
    MutexLock lock(&replicas_mu_);
    auto it = replicas_.find(request->replica_id());
    if (it != replicas_.end()) replicas_.erase(it);
  }
  LogInfo("watch_closed", {{"replica", request->replica_id()}});
  if (shutting_down_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "controlplane shutting down");
  }
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::Lease(grpc::ServerContext* context, const v1::LeaseRequest* request,
                                   v1::LeaseResponse* response) {
  grpc::Status auth = Authenticate(context, "Lease");
  if (!auth.ok()) return auth;
  grpc::Status valid = CheckReplicaId(request->replica_id());
  if (!valid.ok()) return valid;
  if (request->count() == 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "count must be at least 1");
  }
  *response = registry_->Lease(std::min(request->count(), kMaxLease));
  lease_calls_.fetch_add(1);
  return grpc::Status::OK;
}

grpc::Status KeyServiceImpl::Report(grpc::ServerContext* context,
                                    const v1::ReportRequest* request,
                                    v1::ReportResponse* response) {
  grpc::Status auth = Authenticate(context, "Report");
  if (!auth.ok()) return auth;
  grpc::Status valid = CheckReplicaId(request->replica_id());
  if (!valid.ok()) return valid;
  for (const v1::KeyOutcome& outcome : request->outcomes()) {
    LogInfo("key_outcome", {{"replica", request->replica_id()},
                            {"key_id", outcome.key_id()},
                            {"kind", v1::OutcomeKind_Name(outcome.kind())},
                            {"status", outcome.http_status()},
                            {"model", outcome.model()},
                            {"probe", outcome.probe()}});
  }
  for (const KeyRegistry::StateChange& c : registry_->ApplyReport(*request)) {
    LogWarning("key_state_changed", {{"key", c.fingerprint},
                                     {"from", v1::KeyState_Name(c.from)},
                                     {"to", v1::KeyState_Name(c.to)},
                                     {"reason", c.reason},
                                     {"actor", c.actor}});
    if (audit_ != nullptr) {
      absl::Status w = audit_->Append(AuditEntry{"key_state", c.actor,
                                                 {{"key", c.fingerprint},
                                                  {"from", v1::KeyState_Name(c.from)},
                                                  {"to", v1::KeyState_Name(c.to)},
                                                  {"reason", c.reason}}});
      if (!w.ok()) LogError("audit_write_failed", {{"reason", std::string(w.message())}});
    }
  }
  report_calls_.fetch_add(1);
  response->set_snapshot_version(registry_->version());
  return grpc::Status::OK;
}

std::vector<std::string> KeyServiceImpl::replica_ids() const {
  MutexLock lock(&replicas_mu_);
  std::set<std::string> unique(replicas_.begin(), replicas_.end());
  return std::vector<std::string>(unique.begin(), unique.end());
}

}  // namespace sflb
