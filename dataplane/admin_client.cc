#include "dataplane/admin_client.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"

namespace sflb {

AdminClient::AdminClient(std::shared_ptr<grpc::Channel> channel, std::string admin_key,
                         absl::Duration timeout, absl::Duration stats_cache_ttl)
    : stub_(v1::AdminService::NewStub(std::move(channel))),
      admin_key_(std::move(admin_key)),
      timeout_(timeout),
      stats_cache_ttl_(stats_cache_ttl) {}

void AdminClient::Prepare(grpc::ClientContext* context, absl::Duration timeout) const {
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  context->AddMetadata(kAuthorizationMetadata, absl::StrCat("Bearer ", admin_key_));
}

absl::StatusOr<v1::GetStatsResponse> AdminClient::GetStats() {
  {
    MutexLock lock(&mu_);
    if (cached_stats_ != nullptr && absl::Now() - cached_at_ < stats_cache_ttl_) {
      return *cached_stats_;
    }
  }
  grpc::ClientContext context;
  Prepare(&context, timeout_);
  auto response = std::make_shared<v1::GetStatsResponse>();
  grpc::Status status = stub_->GetStats(&context, v1::GetStatsRequest(), response.get());
  if (!status.ok()) return FromGrpcStatus(status);
  MutexLock lock(&mu_);
  cached_stats_ = response;
  cached_at_ = absl::Now();
  return *response;
}

absl::StatusOr<v1::GetBalancesResponse> AdminClient::GetBalances(bool refresh, bool cached_only) {
  grpc::ClientContext context;
  // A refresh asks the upstream for every key: allow it more time.
  Prepare(&context, refresh ? timeout_ * 6 : timeout_);
  v1::GetBalancesRequest request;
  request.set_refresh(refresh);
  request.set_cached_only(cached_only);
  v1::GetBalancesResponse response;
  grpc::Status status = stub_->GetBalances(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ReloadResponse> AdminClient::Reload(const std::string& reason) {
  grpc::ClientContext context;
  Prepare(&context, timeout_);
  v1::ReloadRequest request;
  request.set_reason(reason);
  v1::ReloadResponse response;
  grpc::Status status = stub_->Reload(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  {
    MutexLock lock(&mu_);
    cached_stats_ = nullptr;
  }
  return response;
}

}  // namespace sflb
