#include "controlplane/admin_service.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/secret_compare.h"
#include "common/time_format.h"

namespace sflb {

AdminServiceImpl::AdminServiceImpl(std::string admin_key, KeyRegistry* registry,
                                   KeySource* source, const KeyServiceImpl* key_service,
                                   AuditLog* audit, KeyBalances* balances, absl::Time started_at,
                                   std::string dataplane_token)
    : admin_key_(std::move(admin_key)),
      registry_(registry),
      source_(source),
      key_service_(key_service),
      audit_(audit),
      balances_(balances),
      started_at_(started_at),
      dataplane_token_(std::move(dataplane_token)) {}

grpc::Status AdminServiceImpl::Audit(grpc::ServerContext* context, const char* method,
                                     nlohmann::json details, const std::string& type) const {
  if (audit_ == nullptr) return grpc::Status::OK;
  details["method"] = method;
  absl::Status written =
      audit_->Append(AuditEntry{type, absl::StrCat("admin@", context->peer()), std::move(details)});
  if (written.ok()) return grpc::Status::OK;
  LogError("audit_write_failed", {{"method", method}, {"reason", std::string(written.message())}});
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      absl::StrCat("the audit log cannot be written, so the call was not "
                                   "acknowledged: ", written.message()));
}

grpc::Status AdminServiceImpl::Authenticate(grpc::ServerContext* context,
                                            const char* method) const {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kAuthorizationMetadata);
  absl::string_view presented;
  if (it != metadata.end()) {
    absl::string_view value(it->second.data(), it->second.size());
    if (value.size() > 7 && absl::EqualsIgnoreCase(value.substr(0, 7), "bearer ")) {
      presented = absl::StripAsciiWhitespace(value.substr(7));
    }
  }
  if (SecretEquals(presented, admin_key_)) return grpc::Status::OK;
  bool dataplane = SecretEquals(presented, dataplane_token_);
  const char* reason = it == metadata.end() ? "missing" : (dataplane ? "dataplane token" : "wrong key");
  LogWarning("admin_auth_failed", {{"method", method}, {"peer", context->peer()}, {"reason", reason}});
  if (audit_ != nullptr) {
    absl::Status written = audit_->Append(AuditEntry{
        "auth_failed", context->peer(), {{"method", method}, {"reason", reason}}});
    if (!written.ok()) LogError("audit_write_failed", {{"reason", std::string(written.message())}});
  }
  if (dataplane) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "the dataplane token cannot call admin methods");
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      it == metadata.end()
                          ? "admin key required: send 'authorization: Bearer <LB_ADMIN_KEY>'"
                          : "admin key rejected");
}

grpc::Status AdminServiceImpl::Reload(grpc::ServerContext* context,
                                      const v1::ReloadRequest* request,
                                      v1::ReloadResponse* response) {
  grpc::Status auth = Authenticate(context, "Reload");
  if (!auth.ok()) return auth;
  uint32_t previous = static_cast<uint32_t>(registry_->size());
  absl::StatusOr<ReloadOutcome> outcome = source_->Reload();
  LogReload(outcome, previous, {{"peer", context->peer()}, {"reason", request->reason()}});
  nlohmann::json details = ReloadAuditDetails(outcome, previous);
  details["reason"] = request->reason();
  grpc::Status audited = Audit(context, "Reload", std::move(details), "reload");
  if (!audited.ok()) return audited;
  if (!outcome.ok()) {
    // Whatever the loader's code, to the caller this is "the reload could not be applied".
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("reload failed, keeping the ", previous,
                                     " running keys: ", outcome.status().message()));
  }
  response->set_previous_count(outcome->change.previous_count);
  response->set_new_count(outcome->change.new_count);
  for (const std::string& fp : outcome->change.added) response->add_added(fp);
  for (const std::string& fp : outcome->change.removed) response->add_removed(fp);
  for (const std::string& w : outcome->warnings) response->add_warnings(w);
  response->set_source(outcome->source);
  response->set_snapshot_version(outcome->change.version);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::GetStats(grpc::ServerContext* context,
                                        const v1::GetStatsRequest* request,
                                        v1::GetStatsResponse* response) {
  grpc::Status auth = Authenticate(context, "GetStats");
  if (!auth.ok()) return auth;
  if (grpc::Status a = Audit(context, "GetStats", nlohmann::json::object()); !a.ok()) return a;
  registry_->FillStats(response);
  *response->mutable_started_at() = ToProtoTime(started_at_);
  response->set_watching_replicas(key_service_->watching_replicas());
  response->set_lease_calls(key_service_->lease_calls());
  response->set_report_calls(key_service_->report_calls());
  response->set_source(source_->current_source());
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ListKeys(grpc::ServerContext* context,
                                        const v1::ListKeysRequest* request,
                                        v1::ListKeysResponse* response) {
  grpc::Status auth = Authenticate(context, "ListKeys");
  if (!auth.ok()) return auth;
  if (grpc::Status a = Audit(context, "ListKeys", {{"state", v1::KeyState_Name(request->state())}});
      !a.ok()) {
    return a;
  }
  if (!v1::KeyState_IsValid(request->state())) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "unknown key state filter");
  }
  for (v1::KeyStatus& status : registry_->ListKeys(request->state())) {
    *response->add_keys() = std::move(status);
  }
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::GetKey(grpc::ServerContext* context,
                                      const v1::GetKeyRequest* request,
                                      v1::GetKeyResponse* response) {
  grpc::Status auth = Authenticate(context, "GetKey");
  if (!auth.ok()) return auth;
  if (grpc::Status a = Audit(context, "GetKey", {{"key", request->key().substr(0, 64)}}); !a.ok()) {
    return a;
  }
  absl::StatusOr<uint64_t> id = registry_->Resolve(request->key());
  if (!id.ok()) return ToGrpcStatus(id.status());
  absl::StatusOr<v1::GetKeyResponse> explained = registry_->Explain(*id);
  if (!explained.ok()) return ToGrpcStatus(explained.status());
  *response = std::move(*explained);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::SetKeyState(grpc::ServerContext* context,
                                           const v1::SetKeyStateRequest* request,
                                           v1::SetKeyStateResponse* response) {
  grpc::Status auth = Authenticate(context, "SetKeyState");
  if (!auth.ok()) return auth;
  if (request->action() == v1::KEY_ACTION_UNSPECIFIED || !v1::KeyAction_IsValid(request->action())) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "action must be KEY_ACTION_DISABLE, KEY_ACTION_ENABLE or KEY_ACTION_COOLDOWN");
  }
  if (request->reason().size() > 512) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "reason longer than 512 bytes");
  }
  absl::StatusOr<uint64_t> id = registry_->Resolve(request->key());
  if (!id.ok()) return ToGrpcStatus(id.status());
  std::string actor = absl::StrCat("admin@", context->peer());
  absl::StatusOr<v1::GetKeyResponse> before = registry_->Explain(*id);
  absl::StatusOr<v1::KeyStatus> status =
      registry_->ApplyAction(*id, request->action(), FromProtoDuration(request->duration()),
                             request->reason(), actor);
  if (!status.ok()) return ToGrpcStatus(status.status());
  grpc::Status audited = Audit(
      context, "SetKeyState",
      {{"key", status->fingerprint()},
       {"action", v1::KeyAction_Name(request->action())},
       {"from", before.ok() ? v1::KeyState_Name(before->key().state()) : std::string("?")},
       {"to", v1::KeyState_Name(status->state())},
       {"duration_s", absl::ToDoubleSeconds(FromProtoDuration(request->duration()))},
       {"reason", request->reason()}},
      "key_state");
  if (!audited.ok()) return audited;
  LogInfo("key_state_set", {{"key", status->fingerprint()},
                            {"action", v1::KeyAction_Name(request->action())},
                            {"state", v1::KeyState_Name(status->state())},
                            {"reason", request->reason()},
                            {"actor", actor}});
  *response->mutable_key() = std::move(*status);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::GetBalances(grpc::ServerContext* context,
                                           const v1::GetBalancesRequest* request,
                                           v1::GetBalancesResponse* response) {
  grpc::Status auth = Authenticate(context, "GetBalances");
  if (!auth.ok()) return auth;
  if (grpc::Status a = Audit(context, "GetBalances",
                             {{"refresh", request->refresh()}, {"cached_only", request->cached_only()}});
      !a.ok()) {
    return a;
  }
  *response = balances_->Check(request->refresh(), request->cached_only() && !request->refresh());
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ReadAudit(grpc::ServerContext* context,
                                         const v1::ReadAuditRequest* request,
                                         v1::ReadAuditResponse* response) {
  grpc::Status auth = Authenticate(context, "ReadAudit");
  if (!auth.ok()) return auth;
  if (audit_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "the audit log is off (SFLB_AUDIT_LOG=off)");
  }
  // Following polls (after_seq set) are not themselves audited: they would feed the log they
  // read. Every other read is.
  if (request->after_seq() == 0) {
    if (grpc::Status a = Audit(context, "ReadAudit", {{"limit", request->limit()}}); !a.ok()) return a;
  }
  if (request->limit() > 10000) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "limit must be at most 10000");
  }
  AuditQuery query;
  if (request->has_since()) query.since = FromProtoTime(request->since());
  query.after_seq = request->after_seq();
  query.limit = request->limit() == 0 ? 100 : request->limit();
  absl::Duration wait = std::min(FromProtoDuration(request->wait()), absl::Seconds(30));
  if (wait > absl::ZeroDuration() && audit_->last_seq() <= query.after_seq) {
    absl::Time deadline = absl::Now() + wait;
    // Wait in slices so a cancelled call returns promptly.
    while (!context->IsCancelled() && absl::Now() < deadline &&
           audit_->WaitForAppend(query.after_seq, absl::Milliseconds(250)) <= query.after_seq) {
    }
  }
  absl::StatusOr<std::vector<nlohmann::json>> entries = audit_->Read(query);
  if (!entries.ok()) return ToGrpcStatus(entries.status());
  for (const nlohmann::json& e : *entries) response->add_entries(e.dump());
  response->set_last_seq(audit_->last_seq());
  return grpc::Status::OK;
}

}  // namespace sflb
