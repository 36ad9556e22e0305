#include "dataplane/client_auth.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "common/secret_compare.h"

namespace sflb {

ClientAuth::ClientAuth(std::string api_key, std::string admin_key)
    : api_key_(std::move(api_key)), admin_key_(std::move(admin_key)) {}

ClientRole ClientAuth::Check(absl::string_view header) const {
  header = absl::StripAsciiWhitespace(header);
  if (header.size() < 7 || !absl::EqualsIgnoreCase(header.substr(0, 6), "bearer") ||
      (header[6] != ' ' && header[6] != '\t')) {
    return ClientRole::kNone;
  }
  absl::string_view token = absl::StripAsciiWhitespace(header.substr(7));
  // Compare against both so timing does not tell which one matched.
  bool admin = SecretEquals(token, admin_key_);
  bool user = SecretEquals(token, api_key_);
  if (admin) return ClientRole::kAdmin;
  if (user) return ClientRole::kUser;
  return ClientRole::kNone;
}

}  // namespace sflb
