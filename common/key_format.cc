#include "common/key_format.h"

#include <openssl/sha.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace sflb {

std::string KeyFingerprint(absl::string_view secret) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(secret.data()), secret.size(), digest);
  std::string hex = absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
  return hex.substr(0, 12);
}

std::string MaskKey(absl::string_view secret) {
  constexpr absl::string_view kEllipsis = "\xE2\x80\xA6";  // U+2026
  if (secret.size() >= 18) {
    return absl::StrCat(secret.substr(0, 5), kEllipsis, secret.substr(secret.size() - 4));
  }
  if (secret.size() >= 8) {
    return absl::StrCat(secret.substr(0, 2), kEllipsis, secret.substr(secret.size() - 2));
  }
  return std::string(kEllipsis);
}

}  // namespace sflb
