// How upstream keys are shown: never in full. Fingerprints identify a key stably across
// processes and restarts; masks let a person recognise it.
#ifndef SFLB_COMMON_KEY_FORMAT_H_
#define SFLB_COMMON_KEY_FORMAT_H_

#include <string>

#include "absl/strings/string_view.h"

namespace sflb {

// First 12 hex digits of SHA-256(secret). Stable, safe to log. Thread-safe.
std::string KeyFingerprint(absl::string_view secret);

// "sk-ab…wxyz" (first 5, last 4) for keys of 18+ bytes; shorter keys show less ("ab…yz" for
// 8..17 bytes, "…" below 8) so that a mask never reveals more than half of a key.
std::string MaskKey(absl::string_view secret);

}  // namespace sflb

#endif  // SFLB_COMMON_KEY_FORMAT_H_
