// ClientIp: which address a request came from, for logs. The socket's peer address, unless the
// peer is a configured trusted proxy: then the right-most address in X-Forwarded-For that is
// not itself a trusted proxy (addresses further left are client-controlled and ignored).
#ifndef SFLB_DATAPLANE_CLIENT_IP_H_
#define SFLB_DATAPLANE_CLIENT_IP_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sflb {

// Immutable after Parse; thread-safe.
class TrustedProxies {
 public:
  // "10.0.0.0/8, 192.168.1.7, ::1, fd00::/8" (empty = trust nobody). INVALID_ARGUMENT naming
  // the bad entry.
  static absl::StatusOr<TrustedProxies> Parse(absl::string_view list);

  bool Contains(absl::string_view ip) const;
  // The client address for a request from `peer` carrying `forwarded_for` (may be empty).
  std::string ClientIp(absl::string_view peer, absl::string_view forwarded_for) const;

 private:
  struct Range {
    bool v6 = false;
    unsigned char addr[16] = {0};
    int prefix = 0;
  };
  std::vector<Range> ranges_;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_CLIENT_IP_H_
