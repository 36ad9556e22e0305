// AdminClient: the dataplane's calls to the controlplane's AdminService, for the old tool's
// endpoints (/stats, /balance, /reload-keys). Stats are cached briefly so a polling dashboard
// does not turn into controlplane load.
#ifndef SFLB_DATAPLANE_ADMIN_CLIENT_H_
#define SFLB_DATAPLANE_ADMIN_CLIENT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "grpcpp/grpcpp.h"
#include "sflb/v1/admin_service.grpc.pb.h"

namespace sflb {

// Thread-safe.
class AdminClient {
 public:
  // `admin_key` is sent as call metadata; `timeout` bounds every call.
  AdminClient(std::shared_ptr<grpc::Channel> channel, std::string admin_key,
              absl::Duration timeout, absl::Duration stats_cache_ttl);

  // Pool stats, from a cache at most `stats_cache_ttl` old. Errors: the RPC's status.
  absl::StatusOr<v1::GetStatsResponse> GetStats();
  absl::StatusOr<v1::GetBalancesResponse> GetBalances(bool refresh, bool cached_only = false);
  absl::StatusOr<v1::ReloadResponse> Reload(const std::string& reason);

 private:
  void Prepare(grpc::ClientContext* context, absl::Duration timeout) const;

  std::unique_ptr<v1::AdminService::Stub> stub_;
  const std::string admin_key_;
  const absl::Duration timeout_;
  const absl::Duration stats_cache_ttl_;
  Mutex mu_;
  std::shared_ptr<const v1::GetStatsResponse> cached_stats_ ABSL_GUARDED_BY(mu_);
  absl::Time cached_at_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_ADMIN_CLIENT_H_
