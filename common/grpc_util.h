// Conversions between absl::Status and grpc::Status, and the admin-key call credential.
#ifndef SFLB_COMMON_GRPC_UTIL_H_
#define SFLB_COMMON_GRPC_UTIL_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace sflb {

// Same code, same message.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Metadata key carrying the admin key ("authorization: Bearer <key>").
inline constexpr char kAuthorizationMetadata[] = "authorization";

// How a client reaches the controlplane. An empty `ca_file` means plaintext (loopback or a
// trusted network only); with it, TLS verified against that CA, and with `cert_file` and
// `key_file` also a client certificate (mutual TLS).
struct ControlplaneTls {
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  // Name to expect in the controlplane's certificate when it differs from the address host.
  std::string server_name;
};

// Channel to a controlplane address ("host:port") with keepalive pings so dead connections
// are noticed within ~20 s. Errors name the unreadable file.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeControlplaneChannel(const std::string& address,
                                                                      const ControlplaneTls& tls);
// Plaintext.
std::shared_ptr<grpc::Channel> MakeControlplaneChannel(const std::string& address);

// The controlplane's listening credentials: TLS with `cert_file`/`key_file` when set, requiring
// and verifying client certificates against `client_ca_file` when that is set too; else
// plaintext. INVALID_ARGUMENT for an inconsistent combination, errors naming unreadable files.
struct ServerTls {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;
};
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerTls& tls);

// Reads a small file (certificates, keys, tokens). Errors name the path.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path);

// The bearer token in a call's `authorization` metadata, or "" when there is none.
std::string BearerToken(const grpc::ServerContext& context);

}  // namespace sflb

#endif  // SFLB_COMMON_GRPC_UTIL_H_
