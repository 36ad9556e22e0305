// ClientAuth: who is calling the dataplane, from the Authorization header.
#ifndef SFLB_DATAPLANE_CLIENT_AUTH_H_
#define SFLB_DATAPLANE_CLIENT_AUTH_H_

#include <string>

#include "absl/strings/string_view.h"

namespace sflb {

enum class ClientRole { kNone, kUser, kAdmin };

// Thread-safe (immutable).
class ClientAuth {
 public:
  // Both keys non-empty and distinct (checked at startup).
  ClientAuth(std::string api_key, std::string admin_key);

  // Role for an Authorization header value: "Bearer <key>" with a case-insensitive scheme; the
  // admin key is accepted wherever the user key is. Comparison is constant-time.
  ClientRole Check(absl::string_view authorization_header) const;

 private:
  const std::string api_key_;
  const std::string admin_key_;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_CLIENT_AUTH_H_
