#include "dataplane/client_ip.h"

#include <arpa/inet.h>

#include <cstring>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sflb {
namespace {

// Parses an IPv4 or IPv6 literal into 16 bytes (IPv4 in the first 4). False if neither.
bool ParseIp(absl::string_view text, bool* v6, unsigned char out[16]) {
  std::string s(absl::StripAsciiWhitespace(text));
  std::memset(out, 0, 16);
  if (inet_pton(AF_INET, s.c_str(), out) == 1) {
    *v6 = false;
    return true;
  }
  if (inet_pton(AF_INET6, s.c_str(), out) == 1) {
    *v6 = true;
    return true;
  }
  return false;
}

bool PrefixMatches(const unsigned char* a, const unsigned char* b, int prefix) {
  int full = prefix / 8;
  if (std::memcmp(a, b, static_cast<size_t>(full)) != 0) return false;
  int rest = prefix % 8;
  if (rest == 0) return true;
  unsigned char mask = static_cast<unsigned char>(0xff << (8 - rest));
  return (a[full] & mask) == (b[full] & mask);
}

}  // namespace

absl::StatusOr<TrustedProxies> TrustedProxies::Parse(absl::string_view list) {
  TrustedProxies out;
  for (absl::string_view entry : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    entry = absl::StripAsciiWhitespace(entry);
    Range range;
    absl::string_view ip = entry;
    int prefix = -1;
    size_t slash = entry.find('/');
    if (slash != absl::string_view::npos) {
      ip = entry.substr(0, slash);
      if (!absl::SimpleAtoi(entry.substr(slash + 1), &prefix)) prefix = -2;
    }
    if (!ParseIp(ip, &range.v6, range.addr)) {
      return absl::InvalidArgumentError(
          absl::StrCat("SFLB_TRUSTED_PROXIES: '", entry, "' is not an IP address or CIDR range"));
    }
    int max = range.v6 ? 128 : 32;
    if (prefix == -1) prefix = max;
    if (prefix < 0 || prefix > max) {
      return absl::InvalidArgumentError(
          absl::StrCat("SFLB_TRUSTED_PROXIES: bad prefix length in '", entry, "'"));
    }
    range.prefix = prefix;
    out.ranges_.push_back(range);
  }
  return out;
}

bool TrustedProxies::Contains(absl::string_view ip) const {
  bool v6;
  unsigned char addr[16];
  if (!ParseIp(ip, &v6, addr)) return false;
  for (const Range& r : ranges_) {
    if (r.v6 == v6 && PrefixMatches(r.addr, addr, r.prefix)) return true;
  }
  return false;
}

std::string TrustedProxies::ClientIp(absl::string_view peer, absl::string_view forwarded_for) const {
  if (forwarded_for.empty() || !Contains(peer)) return std::string(peer);
  std::vector<absl::string_view> hops = absl::StrSplit(forwarded_for, ',');
  for (auto it = hops.rbegin(); it != hops.rend(); ++it) {
    absl::string_view hop = absl::StripAsciiWhitespace(*it);
    bool v6;
    unsigned char addr[16];
    if (!ParseIp(hop, &v6, addr)) return std::string(peer);  // garbage: keep what we know
    if (!Contains(hop)) return std::string(hop);
  }
  return std::string(absl::StripAsciiWhitespace(hops.front()));
}

}  // namespace sflb
