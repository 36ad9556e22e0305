// Constant-time comparison for secrets (API keys, admin keys, tokens).
#ifndef SFLB_COMMON_SECRET_COMPARE_H_
#define SFLB_COMMON_SECRET_COMPARE_H_

#include <openssl/crypto.h>

#include "absl/strings/string_view.h"

namespace sflb {

// True when equal. Time depends only on the lengths, never on where the bytes differ.
inline bool SecretEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size() || a.empty()) return false;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace sflb

#endif  // SFLB_COMMON_SECRET_COMPARE_H_
