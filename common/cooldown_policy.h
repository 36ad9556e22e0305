// CooldownPolicy: how long a rate-limited scope stays closed, from what the upstream said.
//
// Order of evidence: a Retry-After header; else the limit named in SiliconFlow's message
// ("... Details: TPM limit reached."): per-minute limits (RPM, TPM, IPM) wait for the next
// minute boundary plus jitter, per-day limits (RPD, TPD, IPD) for the next day boundary in
// China Standard Time (UTC+8, where SiliconFlow's quotas reset); else the default. Repeated
// 429s on the same scope back off exponentially up to a cap. Shared by the controlplane (the
// authority) and dataplanes (local cooldowns while the controlplane is away). Pure functions.
#ifndef SFLB_COMMON_COOLDOWN_POLICY_H_
#define SFLB_COMMON_COOLDOWN_POLICY_H_

#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"

namespace sflb {

struct CooldownOptions {
  // When neither Retry-After nor the message says anything usable.
  absl::Duration default_cooldown = absl::Seconds(60);
  // Longest cooldown for anything but a per-day limit.
  absl::Duration max_cooldown = absl::Minutes(30);
  // Random extra wait after a minute boundary, so replicas and scopes do not all return in the
  // same millisecond.
  absl::Duration max_jitter = absl::Seconds(3);
  // Multiplier per consecutive 429 on the same scope.
  double backoff_factor = 2.0;
};

struct CooldownDecision {
  absl::Duration duration;
  // "Retry-After", "RPM", "TPM", "IPM", "RPD", "TPD", "IPD" or "default".
  std::string limit;
};

// Limit named in an upstream 429 message ("TPM limit reached" -> "TPM"), or "".
std::string LimitNamedIn(absl::string_view message);

// Parses a Retry-After value: delay-seconds or an HTTP-date (RFC 9110). nullopt if malformed.
absl::optional<absl::Duration> ParseRetryAfter(absl::string_view value, absl::Time now);

// The cooldown for the `strikes`-th consecutive 429 (1 = first) on a scope. `jitter01` is a
// uniform random number in [0, 1) (injected so tests are deterministic).
CooldownDecision ComputeCooldown(absl::optional<absl::Duration> retry_after,
                                 absl::string_view message, absl::Time now, int strikes,
                                 double jitter01, const CooldownOptions& options);

}  // namespace sflb

#endif  // SFLB_COMMON_COOLDOWN_POLICY_H_
