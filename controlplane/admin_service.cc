#include "controlplane/admin_service.h"

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
                                   absl::Time started_at)
    : admin_key_(std::move(admin_key)),
      registry_(registry),
      source_(source),
      key_service_(key_service),
      started_at_(started_at) {}

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
  LogWarning("admin_auth_failed", {{"method", method},
                                   {"peer", context->peer()},
                                   {"reason", it == metadata.end() ? "missing" : "wrong key"}});
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
  if (!outcome.ok()) {
    LogWarning("reload_failed", {{"reason", std::string(outcome.status().message())},
                                 {"peer", context->peer()},
                                 {"keys_kept", previous}});
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
  LogInfo("keys_reloaded", {{"previous", outcome->change.previous_count},
                            {"new", outcome->change.new_count},
                            {"added", outcome->change.added},
                            {"removed", outcome->change.removed},
                            {"warnings", outcome->warnings},
                            {"source", outcome->source},
                            {"reason", request->reason()},
                            {"peer", context->peer()}});
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::GetStats(grpc::ServerContext* context,
                                        const v1::GetStatsRequest* request,
                                        v1::GetStatsResponse* response) {
  grpc::Status auth = Authenticate(context, "GetStats");
  if (!auth.ok()) return auth;
  registry_->FillStats(response);
  *response->mutable_started_at() = ToProtoTime(started_at_);
  response->set_watching_replicas(key_service_->watching_replicas());
  response->set_source(source_->current_source());
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ListKeys(grpc::ServerContext* context,
                                        const v1::ListKeysRequest* request,
                                        v1::ListKeysResponse* response) {
  grpc::Status auth = Authenticate(context, "ListKeys");
  if (!auth.ok()) return auth;
  if (!v1::KeyState_IsValid(request->state())) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "unknown key state filter");
  }
  for (v1::KeyStatus& status : registry_->ListKeys(request->state())) {
    *response->add_keys() = std::move(status);
  }
  return grpc::Status::OK;
}

}  // namespace sflb
