#include "common/time_format.h"

#include <cstdint>

namespace sflb {
namespace {

constexpr char kIso8601Format[] = "%Y-%m-%dT%H:%M:%E3SZ";

// Writes `value` as `width` decimal digits, zero-padded, ending just before `end`.
void PutDigits(uint32_t value, int width, char* end) {
  for (int i = 0; i < width; ++i) {
    *--end = static_cast<char>('0' + value % 10);
    value /= 10;
  }
}

}  // namespace

std::string FormatIso8601(absl::Time t) {
  std::string out;
  AppendIso8601(t, &out);
  return out;
}

void AppendIso8601(absl::Time t, std::string* out) {
  // absl::FormatTime goes through the time zone library and a strftime-like formatter (about
  // 180 ns); a log line per request wants less. Outside 1970..9999 (where %Y is not four
  // digits, or for infinite times) it is still the reference.
  constexpr int64_t kYear10000 = 253402300800;  // 10000-01-01T00:00:00Z in Unix seconds
  if (t < absl::UnixEpoch() || t >= absl::FromUnixSeconds(kYear10000)) {
    out->append(absl::FormatTime(kIso8601Format, t, absl::UTCTimeZone()));
    return;
  }
  int64_t millis = absl::ToUnixMillis(t);  // rounds down, like %E3S
  int64_t seconds = millis / 1000;
  int64_t days = seconds / 86400;
  uint32_t second_of_day = static_cast<uint32_t>(seconds % 86400);
  // Civil date from days since 1970-01-01 (H. Hinnant's civil_from_days, for days >= 0).
  int64_t z = days + 719468;
  int64_t era = z / 146097;
  int64_t day_of_era = z - era * 146097;
  int64_t year_of_era =
      (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146096) / 365;
  int64_t day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
  int64_t mp = (5 * day_of_year + 2) / 153;
  uint32_t day = static_cast<uint32_t>(day_of_year - (153 * mp + 2) / 5 + 1);
  uint32_t month = static_cast<uint32_t>(mp < 10 ? mp + 3 : mp - 9);
  uint32_t year = static_cast<uint32_t>(year_of_era + era * 400 + (month <= 2 ? 1 : 0));

  char buf[24] = {'0', '0', '0', '0', '-', '0', '0', '-', '0', '0', 'T', '0',
                  '0', ':', '0', '0', ':', '0', '0', '.', '0', '0', '0', 'Z'};
  PutDigits(year, 4, buf + 4);
  PutDigits(month, 2, buf + 7);
  PutDigits(day, 2, buf + 10);
  PutDigits(second_of_day / 3600, 2, buf + 13);
  PutDigits(second_of_day / 60 % 60, 2, buf + 16);
  PutDigits(second_of_day % 60, 2, buf + 19);
  PutDigits(static_cast<uint32_t>(millis % 1000), 3, buf + 23);
  out->append(buf, sizeof(buf));
}

google::protobuf::Timestamp ToProtoTime(absl::Time t) {
  google::protobuf::Timestamp out;
  if (t == absl::InfinitePast()) return out;
  int64_t nanos = absl::ToUnixNanos(t);
  out.set_seconds(nanos / 1000000000);
  out.set_nanos(static_cast<int32_t>(nanos % 1000000000));
  if (out.nanos() < 0) {
    out.set_seconds(out.seconds() - 1);
    out.set_nanos(out.nanos() + 1000000000);
  }
  return out;
}

absl::Time FromProtoTime(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0 && t.nanos() == 0) return absl::InfinitePast();
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

google::protobuf::Duration ToProtoDuration(absl::Duration d) {
  google::protobuf::Duration out;
  int64_t nanos = absl::ToInt64Nanoseconds(d);
  out.set_seconds(nanos / 1000000000);
  out.set_nanos(static_cast<int32_t>(nanos % 1000000000));
  return out;
}

absl::Duration FromProtoDuration(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

}  // namespace sflb
