// AdminServiceImpl: the gRPC AdminService for sflbctl and the dataplane's admin endpoints.
// Every call must present the admin key as `authorization: Bearer <key>` metadata.
#ifndef SFLB_CONTROLPLANE_ADMIN_SERVICE_H_
#define SFLB_CONTROLPLANE_ADMIN_SERVICE_H_

#include <string>

#include "absl/time/time.h"
#include "controlplane/audit_log.h"
#include "controlplane/key_balances.h"
#include "controlplane/key_registry.h"
#include "controlplane/key_service.h"
#include "controlplane/key_source.h"
#include "sflb/v1/admin_service.grpc.pb.h"

namespace sflb {

// Thread-safe.
class AdminServiceImpl final : public v1::AdminService::Service {
 public:
  // All pointers must outlive the service. `admin_key` must not be empty. `audit` may be null
  // (audit disabled).
  AdminServiceImpl(std::string admin_key, KeyRegistry* registry, KeySource* source,
                   const KeyServiceImpl* key_service, AuditLog* audit, KeyBalances* balances,
                   absl::Time started_at, std::string dataplane_token = "");

  grpc::Status Reload(grpc::ServerContext* context, const v1::ReloadRequest* request,
                      v1::ReloadResponse* response) override;
  grpc::Status GetStats(grpc::ServerContext* context, const v1::GetStatsRequest* request,
                        v1::GetStatsResponse* response) override;
  grpc::Status ListKeys(grpc::ServerContext* context, const v1::ListKeysRequest* request,
                        v1::ListKeysResponse* response) override;
  grpc::Status GetKey(grpc::ServerContext* context, const v1::GetKeyRequest* request,
                      v1::GetKeyResponse* response) override;
  grpc::Status SetKeyState(grpc::ServerContext* context, const v1::SetKeyStateRequest* request,
                           v1::SetKeyStateResponse* response) override;
  grpc::Status GetBalances(grpc::ServerContext* context, const v1::GetBalancesRequest* request,
                           v1::GetBalancesResponse* response) override;
  grpc::Status ReadAudit(grpc::ServerContext* context, const v1::ReadAuditRequest* request,
                         v1::ReadAuditResponse* response) override;

 private:
  // UNAUTHENTICATED unless the call carries the admin key. Logs and audits failures.
  grpc::Status Authenticate(grpc::ServerContext* context, const char* method) const;
  // Records an admin call in the audit log (durably) before the call is acknowledged. A
  // failing audit log fails the call with UNAVAILABLE: no unaudited admin operation.
  grpc::Status Audit(grpc::ServerContext* context, const char* method, nlohmann::json details,
                     const std::string& type = "admin_call") const;

  const std::string admin_key_;
  KeyRegistry* const registry_;
  KeySource* const source_;
  const KeyServiceImpl* const key_service_;
  AuditLog* const audit_;
  KeyBalances* const balances_;
  const absl::Time started_at_;
  // Presented here, the dataplane token gets PERMISSION_DENIED (not UNAUTHENTICATED).
  const std::string dataplane_token_;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_ADMIN_SERVICE_H_
