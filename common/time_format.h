// Time conversions shared by all components: ISO-8601 text and protobuf Timestamp/Duration.
#ifndef SFLB_COMMON_TIME_FORMAT_H_
#define SFLB_COMMON_TIME_FORMAT_H_

#include <string>

#include "absl/time/time.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/timestamp.pb.h"

namespace sflb {

// "2026-11-26T13:00:00.123Z" (UTC, milliseconds), as JavaScript's Date.toISOString().
// Exactly absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone()) (fractions of a
// millisecond are cut, not rounded); times in 1970..9999 take a fast path without the time
// zone library.
std::string FormatIso8601(absl::Time t);
// Appends FormatIso8601(t) to `out`.
void AppendIso8601(absl::Time t, std::string* out);

// Protobuf conversions. A default (unset) Timestamp maps to absl::InfinitePast().
google::protobuf::Timestamp ToProtoTime(absl::Time t);
absl::Time FromProtoTime(const google::protobuf::Timestamp& t);
google::protobuf::Duration ToProtoDuration(absl::Duration d);
absl::Duration FromProtoDuration(const google::protobuf::Duration& d);

}  // namespace sflb

#endif  // SFLB_COMMON_TIME_FORMAT_H_
