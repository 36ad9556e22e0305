#include "common/cooldown_policy.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sflb {
namespace {

// Whole-token search so "TPM" does not match inside another word.
bool ContainsToken(absl::string_view text, absl::string_view token) {
  size_t pos = 0;
  while ((pos = text.find(token, pos)) != absl::string_view::npos) {
    bool left_ok = pos == 0 || !absl::ascii_isalnum(text[pos - 1]);
    size_t end = pos + token.size();
    bool right_ok = end >= text.size() || !absl::ascii_isalnum(text[end]);
    if (left_ok && right_ok) return true;
    pos = end;
  }
  return false;
}

absl::Time NextBoundary(absl::Time now, absl::Duration period, absl::Duration offset) {
  // Boundaries at offset + k * period since the Unix epoch.
  absl::Duration since = now - absl::UnixEpoch() + offset;
  absl::Duration into = since - absl::Floor(since, period);
  return now + (period - into);
}

}  // namespace

std::string LimitNamedIn(absl::string_view message) {
  for (const char* limit : {"RPM", "TPM", "IPM", "RPD", "TPD", "IPD"}) {
    if (ContainsToken(message, limit)) return limit;
  }
  return "";
}

absl::optional<absl::Duration> ParseRetryAfter(absl::string_view value, absl::Time now) {
  value = absl::StripAsciiWhitespace(value);
  if (value.empty()) return absl::nullopt;
  int64_t seconds;
  if (absl::SimpleAtoi(value, &seconds)) {
    if (seconds < 0 || seconds > 7 * 24 * 3600) return absl::nullopt;
    return absl::Seconds(seconds);
  }
  // IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT".
  absl::Time when;
  std::string err;
  if (absl::ParseTime("%a, %d %b %Y %H:%M:%S GMT", std::string(value), absl::UTCTimeZone(), &when,
                      &err)) {
    return std::max(absl::ZeroDuration(), when - now);
  }
  return absl::nullopt;
}

CooldownDecision ComputeCooldown(absl::optional<absl::Duration> retry_after,
                                 absl::string_view message, absl::Time now, int strikes,
                                 double jitter01, const CooldownOptions& options) {
  CooldownDecision out;
  absl::Duration jitter = options.max_jitter * std::clamp(jitter01, 0.0, 1.0);
  absl::Duration base;
  absl::Duration cap = options.max_cooldown;
  std::string limit = LimitNamedIn(message);
  if (retry_after.has_value()) {
    // The upstream said exactly: honour it, no backoff on top.
    out.duration = std::max(*retry_after, absl::Seconds(1));
    out.limit = "Retry-After";
    return out;
  }
  if (limit == "RPM" || limit == "TPM" || limit == "IPM") {
    base = NextBoundary(now, absl::Minutes(1), absl::ZeroDuration()) - now + jitter;
  } else if (!limit.empty()) {
    // Per-day quotas reset at midnight China Standard Time (UTC+8).
    base = NextBoundary(now, absl::Hours(24), absl::Hours(8)) - now + jitter;
    cap = std::max(cap, base);
  } else {
    base = options.default_cooldown + jitter;
    limit = "default";
  }
  out.limit = limit;
  double factor = std::min(std::pow(options.backoff_factor, std::max(0, strikes - 1)), 1e6);
  absl::Duration backed;
  if (limit == "RPM" || limit == "TPM" || limit == "IPM") {
    // Per-minute windows reset on the boundary; repeated strikes wait whole extra minutes
    // beyond it (0, 1, 3, 7, ... with the default factor 2), not a fraction of what is left.
    backed = base + absl::Minutes(1) * (factor - 1);
  } else {
    backed = base * factor;
  }
  out.duration = std::min(backed, std::max(cap, base));
  return out;
}

}  // namespace sflb
