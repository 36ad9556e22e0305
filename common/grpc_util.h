// Conversions between absl::Status and grpc::Status, and the admin-key call credential.
#ifndef SFLB_COMMON_GRPC_UTIL_H_
#define SFLB_COMMON_GRPC_UTIL_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace sflb {

// Same code, same message.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Metadata key carrying the admin key ("authorization: Bearer <key>").
inline constexpr char kAuthorizationMetadata[] = "authorization";

// Channel to a controlplane address ("host:port"), plaintext, with keepalive pings so dead
// connections are noticed within ~20 s.
std::shared_ptr<grpc::Channel> MakeControlplaneChannel(const std::string& address);

}  // namespace sflb

#endif  // SFLB_COMMON_GRPC_UTIL_H_
