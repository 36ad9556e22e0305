// KeyServiceImpl: the gRPC KeyService (Watch, Lease, Report) that dataplanes call.
// See controlplane/PROTOCOL.md for the design.
#ifndef SFLB_CONTROLPLANE_KEY_SERVICE_H_
#define SFLB_CONTROLPLANE_KEY_SERVICE_H_

#include <atomic>
#include <set>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/mutex.h"
#include "controlplane/audit_log.h"
#include "controlplane/key_registry.h"
#include "sflb/v1/key_service.grpc.pb.h"

namespace sflb {

// Thread-safe. Handlers run on gRPC's sync server threads.
class KeyServiceImpl final : public v1::KeyService::Service {
 public:
  // `registry` must outlive the service. `heartbeat` is the longest a Watch stream stays
  // silent.
  // `audit` may be null (audit off). With a non-empty `dataplane_token` every call must carry
  // it (`authorization: Bearer <token>`): missing or wrong -> UNAUTHENTICATED, the admin key
  // -> PERMISSION_DENIED (it may not read keys); both audited.
  KeyServiceImpl(KeyRegistry* registry, absl::Duration heartbeat, AuditLog* audit = nullptr,
                 std::string dataplane_token = "", std::string admin_key = "");

  grpc::Status Watch(grpc::ServerContext* context, const v1::WatchRequest* request,
                     grpc::ServerWriter<v1::WatchResponse>* writer) override;
  grpc::Status Lease(grpc::ServerContext* context, const v1::LeaseRequest* request,
                     v1::LeaseResponse* response) override;
  grpc::Status Report(grpc::ServerContext* context, const v1::ReportRequest* request,
                      v1::ReportResponse* response) override;

  // Ends every open Watch stream within one wait slice (for shutdown).
  void Shutdown() { shutting_down_.store(true); }
  // Open Watch streams.
  uint32_t watching_replicas() const { return watchers_.load(); }
  // Ids of the replicas with an open Watch stream (sorted, unique).
  std::vector<std::string> replica_ids() const;
  uint64_t lease_calls() const { return lease_calls_.load(); }
  uint64_t report_calls() const { return report_calls_.load(); }

 private:
  grpc::Status Authenticate(grpc::ServerContext* context, const char* method) const;

  KeyRegistry* const registry_;
  const absl::Duration heartbeat_;
  AuditLog* const audit_;
  const std::string dataplane_token_;
  const std::string admin_key_;
  std::atomic<bool> shutting_down_{false};
  std::atomic<uint32_t> watchers_{0};
  std::atomic<uint64_t> lease_calls_{0};
  std::atomic<uint64_t> report_calls_{0};
  mutable Mutex replicas_mu_;
  std::multiset<std::string> replicas_ ABSL_GUARDED_BY(replicas_mu_);
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_KEY_SERVICE_H_
