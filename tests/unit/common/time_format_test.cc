// Tests of common/time_format: the fast ISO-8601 path against absl::FormatTime.
#include "common/time_format.h"

#include <cstdint>
#include <random>
#include <string>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

std::string Reference(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
}

TEST(FormatIso8601Test, Examples) {
  EXPECT_EQ(FormatIso8601(absl::UnixEpoch()), "1970-01-01T00:00:00.000Z");
  EXPECT_EQ(FormatIso8601(absl::FromUnixMillis(1764162000123)), "2025-11-26T13:00:00.123Z");
  EXPECT_EQ(FormatIso8601(absl::FromUnixNanos(999999999)), "1970-01-01T00:00:00.999Z")
      << "fractions are cut, not rounded";
}

TEST(FormatIso8601Test, MatchesAbslAtEdges) {
  const absl::TimeZone utc = absl::UTCTimeZone();
  for (absl::Time t : {
           absl::UnixEpoch(), absl::UnixEpoch() - absl::Nanoseconds(1),
           absl::UnixEpoch() - absl::Milliseconds(1500), absl::InfinitePast(),
           absl::InfiniteFuture(), absl::FromCivil(absl::CivilSecond(2000, 2, 29, 23, 59, 59), utc),
           absl::FromCivil(absl::CivilSecond(2100, 2, 28, 12, 0, 0), utc),
           absl::FromCivil(absl::CivilSecond(2100, 3, 1, 0, 0, 0), utc),
           absl::FromCivil(absl::CivilSecond(1972, 12, 31, 23, 59, 59), utc),
           absl::FromCivil(absl::CivilSecond(2400, 2, 29, 1, 2, 3), utc),
           absl::FromCivil(absl::CivilSecond(9999, 12, 31, 23, 59, 59), utc) +
               absl::Nanoseconds(999999999),
           absl::FromCivil(absl::CivilSecond(10000, 1, 1, 0, 0, 0), utc),
           absl::FromCivil(absl::CivilSecond(999, 1, 1, 0, 0, 0), utc),
           absl::FromCivil(absl::CivilSecond(-5, 6, 7, 8, 9, 10), utc)}) {
    EXPECT_EQ(FormatIso8601(t), Reference(t));
  }
}

TEST(FormatIso8601Test, MatchesAbslOnRandomTimes) {
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<int64_t> seconds(-100000000000, 300000000000);
  std::uniform_int_distribution<int64_t> nanos(0, 999999999);
  for (int i = 0; i < 200000; ++i) {
    absl::Time t = absl::FromUnixSeconds(seconds(rng)) + absl::Nanoseconds(nanos(rng));
    ASSERT_EQ(FormatIso8601(t), Reference(t)) << absl::ToUnixNanos(t);
  }
  // Every day of a few centuries, at a random time of day.
  std::uniform_int_distribution<int64_t> second_of_day(0, 86399);
  for (int64_t day = 0; day < 146097 * 2; ++day) {
    absl::Time t = absl::FromUnixSeconds(day * 86400 + second_of_day(rng));
    ASSERT_EQ(FormatIso8601(t), Reference(t)) << day;
  }
}

TEST(FormatIso8601Test, AppendAppends) {
  std::string out = "ts=";
  AppendIso8601(absl::UnixEpoch(), &out);
  EXPECT_EQ(out, "ts=1970-01-01T00:00:00.000Z");
  out = "x";
  AppendIso8601(absl::InfiniteFuture(), &out);
  EXPECT_EQ(out, "x" + Reference(absl::InfiniteFuture()));
  out.clear();
  absl::Time now = absl::Now();
  AppendIso8601(now, &out);
  EXPECT_EQ(out, Reference(now));
}

}  // namespace
}  // namespace sflb
