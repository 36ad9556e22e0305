// Tests of common/cooldown_policy: which limit a 429 names, Retry-After parsing and the
// cooldown length (Retry-After, minute and day boundaries, default, backoff and caps).
// Pure functions: every time is a fixed absl::Time, nothing reads the real clock.
#include "common/cooldown_policy.h"

#include <string>

#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

constexpr char kTpmMessage[] =
    "{\"message\":\"Request was rejected due to rate limiting. Details: TPM limit reached.\","
    "\"data\":null}";

// A UTC instant from civil fields, plus `millis`.
absl::Time Utc(int y, int mo, int d, int h, int mi, int s, int millis = 0) {
  return absl::FromCivil(absl::CivilSecond(y, mo, d, h, mi, s), absl::UTCTimeZone()) +
         absl::Milliseconds(millis);
}

std::string Message(const std::string& limit) {
  return "Request was rejected due to rate limiting. Details: " + limit + " limit reached.";
}

// ---------------------------------------------------------------------------------------------
// LimitNamedIn

TEST(LimitNamedInTest, FindsEachLimitInSiliconFlowsMessage) {
  EXPECT_EQ(LimitNamedIn(kTpmMessage), "TPM");
  for (const char* limit : {"RPM", "TPM", "IPM", "RPD", "TPD", "IPD"}) {
    EXPECT_EQ(LimitNamedIn(Message(limit)), limit) << limit;
  }
}

TEST(LimitNamedInTest, FindsALimitAtEitherEndOrBetweenPunctuation) {
  EXPECT_EQ(LimitNamedIn("RPM"), "RPM");
  EXPECT_EQ(LimitNamedIn("limit: TPD"), "TPD");
  EXPECT_EQ(LimitNamedIn("IPD reached"), "IPD");
  EXPECT_EQ(LimitNamedIn("(TPM)"), "TPM");
  EXPECT_EQ(LimitNamedIn("\"RPD\""), "RPD");
}

TEST(LimitNamedInTest, OnlyWholeTokensCount) {
  EXPECT_EQ(LimitNamedIn("XTPM limit reached"), "");
  EXPECT_EQ(LimitNamedIn("TPMX limit reached"), "");
  EXPECT_EQ(LimitNamedIn("TPM2 limit reached"), "");
  EXPECT_EQ(LimitNamedIn("2TPM limit reached"), "");
  EXPECT_EQ(LimitNamedIn("RPMS and IPDs"), "");
  // A partial match earlier in the text does not hide a whole one later.
  EXPECT_EQ(LimitNamedIn("XTPM, then TPM limit reached"), "TPM");
}

TEST(LimitNamedInTest, NothingNamedIsEmpty) {
  EXPECT_EQ(LimitNamedIn(""), "");
  EXPECT_EQ(LimitNamedIn("Too many requests"), "");
  EXPECT_EQ(LimitNamedIn("{\"message\":\"rate limited\",\"data\":null}"), "");
}

// ---------------------------------------------------------------------------------------------
// ParseRetryAfter

TEST(ParseRetryAfterTest, DelaySeconds) {
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 0);
  EXPECT_EQ(ParseRetryAfter("120", now), absl::Seconds(120));
  EXPECT_EQ(ParseRetryAfter("0", now), absl::ZeroDuration());
  EXPECT_EQ(ParseRetryAfter("  7 \t", now), absl::Seconds(7)) << "surrounding whitespace";
  EXPECT_EQ(ParseRetryAfter("604800", now), absl::Hours(24 * 7)) << "7 days is the longest";
}

TEST(ParseRetryAfterTest, HttpDateInTheFutureIsTheTimeUntilIt) {
  const absl::Time now = Utc(2015, 10, 21, 7, 27, 0);
  EXPECT_EQ(ParseRetryAfter("Wed, 21 Oct 2015 07:28:00 GMT", now), absl::Seconds(60));
  EXPECT_EQ(ParseRetryAfter("Thu, 22 Oct 2015 07:27:00 GMT", now), absl::Hours(24));
}

TEST(ParseRetryAfterTest, HttpDateInThePastIsZero) {
  const absl::Time now = Utc(2015, 10, 21, 7, 30, 0);
  EXPECT_EQ(ParseRetryAfter("Wed, 21 Oct 2015 07:28:00 GMT", now), absl::ZeroDuration());
  EXPECT_EQ(ParseRetryAfter("Wed, 21 Oct 2015 07:30:00 GMT", now), absl::ZeroDuration());
}

TEST(ParseRetryAfterTest, MalformedNegativeAndHugeValuesAreRejected) {
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 0);
  for (const char* bad : {"", "   ", "soon", "abc", "1.5", "10s", "-1", "-3600", "604801",
                          "99999999999999999999999", "Wed, 21 Oct 2015", "21 Oct 2015 07:28:00",
                          "Wed, 21 Oct 2015 07:28:00 PST", "Wed, 21 Foo 2015 07:28:00 GMT"}) {
    EXPECT_EQ(ParseRetryAfter(bad, now), absl::nullopt) << "'" << bad << "'";
  }
}

// ---------------------------------------------------------------------------------------------
// ComputeCooldown

TEST(ComputeCooldownTest, RetryAfterWinsWithoutBackoffOrJitter) {
  const CooldownOptions options;
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30);
  for (int strikes : {1, 2, 5, 20}) {
    CooldownDecision d =
        ComputeCooldown(absl::Seconds(42), kTpmMessage, now, strikes, 0.9, options);
    EXPECT_EQ(d.duration, absl::Seconds(42)) << "strikes " << strikes;
    EXPECT_EQ(d.limit, "Retry-After");
  }
  // Even beyond max_cooldown: the upstream said exactly.
  EXPECT_EQ(ComputeCooldown(absl::Hours(2), "", now, 1, 0.0, options).duration, absl::Hours(2));
}

TEST(ComputeCooldownTest, RetryAfterOfZeroOrLessWaitsOneSecond) {
  const CooldownOptions options;
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30);
  EXPECT_EQ(ComputeCooldown(absl::ZeroDuration(), "", now, 1, 0.0, options).duration,
            absl::Seconds(1));
  EXPECT_EQ(ComputeCooldown(absl::Seconds(-5), "", now, 1, 0.0, options).duration,
            absl::Seconds(1));
}

TEST(ComputeCooldownTest, PerMinuteLimitEndsAtTheNextMinuteBoundary) {
  const CooldownOptions options;  // max_jitter 3 s
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30, 250);
  const absl::Time boundary = Utc(2026, 1, 1, 12, 1, 0);
  for (const char* limit : {"RPM", "TPM", "IPM"}) {
    CooldownDecision d = ComputeCooldown(absl::nullopt, Message(limit), now, 1, 0.0, options);
    EXPECT_EQ(d.limit, limit);
    EXPECT_EQ(now + d.duration, boundary) << limit;
  }
  // Exactly on a boundary: the next one, a whole minute away.
  EXPECT_EQ(ComputeCooldown(absl::nullopt, kTpmMessage, boundary, 1, 0.0, options).duration,
            absl::Minutes(1));
}

TEST(ComputeCooldownTest, PerMinuteJitterIsProportionalAndAtMostMaxJitter) {
  CooldownOptions options;
  options.max_jitter = absl::Seconds(4);
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30);
  const absl::Time boundary = Utc(2026, 1, 1, 12, 1, 0);
  EXPECT_EQ(now + ComputeCooldown(absl::nullopt, kTpmMessage, now, 1, 0.5, options).duration,
            boundary + absl::Seconds(2));
  for (double j : {0.0, 0.1, 0.5, 0.999, 1.0, 7.0, -3.0}) {
    absl::Time end = now + ComputeCooldown(absl::nullopt, kTpmMessage, now, 1, j, options).duration;
    EXPECT_GE(end, boundary) << "jitter01 " << j;
    EXPECT_LE(end, boundary + options.max_jitter) << "jitter01 " << j;
  }
}

TEST(ComputeCooldownTest, PerDayLimitEndsAtTheNextMidnightInChinaStandardTime) {
  const CooldownOptions options;
  // 2026-01-01 13:45:10 UTC is 21:45:10 in Beijing: the quota resets at 2026-01-02 00:00
  // Beijing time = 2026-01-01 16:00:00 UTC.
  const absl::Time now = Utc(2026, 1, 1, 13, 45, 10);
  const absl::Time reset = Utc(2026, 1, 1, 16, 0, 0);
  for (const char* limit : {"RPD", "TPD", "IPD"}) {
    CooldownDecision d = ComputeCooldown(absl::nullopt, Message(limit), now, 1, 0.0, options);
    EXPECT_EQ(d.limit, limit);
    EXPECT_EQ(now + d.duration, reset) << limit;
  }
  // Just after the reset (00:00:01 Beijing): almost a whole day.
  EXPECT_EQ(
      ComputeCooldown(absl::nullopt, Message("TPD"), reset + absl::Seconds(1), 1, 0.0, options)
          .duration,
      absl::Hours(24) - absl::Seconds(1));
  // 23:59 UTC on Dec 31 is 07:59 on Jan 1 in Beijing: the reset is 16:00 UTC on Jan 1.
  const absl::Time late = Utc(2025, 12, 31, 23, 59, 0);
  EXPECT_EQ(late + ComputeCooldown(absl::nullopt, Message("RPD"), late, 1, 0.0, options).duration,
            Utc(2026, 1, 1, 16, 0, 0));
  // With jitter: after the reset, by at most max_jitter.
  absl::Time jittered =
      now + ComputeCooldown(absl::nullopt, Message("RPD"), now, 1, 0.75, options).duration;
  EXPECT_EQ(jittered, reset + options.max_jitter * 0.75);
}

TEST(ComputeCooldownTest, PerDayLimitIsNotCappedByMaxCooldownNorBackedOff) {
  CooldownOptions options;
  options.max_cooldown = absl::Minutes(30);
  const absl::Time now = Utc(2026, 1, 1, 0, 0, 0);  // 08:00 Beijing: 16 h to the reset
  for (int strikes : {1, 2, 3, 10}) {
    CooldownDecision d = ComputeCooldown(absl::nullopt, Message("TPD"), now, strikes, 0.0, options);
    EXPECT_EQ(d.duration, absl::Hours(16)) << "strikes " << strikes;
  }
}

TEST(ComputeCooldownTest, DefaultWhenNothingIsNamed) {
  CooldownOptions options;
  options.default_cooldown = absl::Seconds(45);
  options.max_jitter = absl::Seconds(2);
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30);
  CooldownDecision d = ComputeCooldown(absl::nullopt, "Too many requests", now, 1, 0.0, options);
  EXPECT_EQ(d.limit, "default");
  EXPECT_EQ(d.duration, absl::Seconds(45));
  EXPECT_EQ(ComputeCooldown(absl::nullopt, "", now, 1, 0.5, options).duration, absl::Seconds(46));
  EXPECT_EQ(ComputeCooldown(absl::nullopt, "", now, 1, 0.0, CooldownOptions()).duration,
            absl::Seconds(60))
      << "the documented default";
}

TEST(ComputeCooldownTest, RepeatedStrikesBackOffExponentiallyUpToMaxCooldown) {
  CooldownOptions options;  // 60 s default, factor 2, cap 30 min
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30);
  auto duration = [&](int strikes) {
    return ComputeCooldown(absl::nullopt, "", now, strikes, 0.0, options).duration;
  };
  EXPECT_EQ(duration(1), absl::Seconds(60));
  EXPECT_EQ(duration(2), absl::Seconds(120));
  EXPECT_EQ(duration(3), absl::Seconds(240));
  EXPECT_EQ(duration(5), absl::Seconds(960));
  EXPECT_EQ(duration(6), absl::Minutes(30)) << "1920 s capped";
  EXPECT_EQ(duration(50), absl::Minutes(30));
  EXPECT_EQ(duration(1000), absl::Minutes(30)) << "no overflow with many strikes";
  EXPECT_EQ(duration(0), absl::Seconds(60)) << "0 strikes is treated as the first";

  options.backoff_factor = 3.0;
  EXPECT_EQ(ComputeCooldown(absl::nullopt, "", now, 3, 0.0, options).duration, absl::Seconds(540));
}

TEST(ComputeCooldownTest, PerMinuteLimitBacksOffToo) {
  const CooldownOptions options;
  const absl::Time now = Utc(2026, 1, 1, 12, 0, 30);
  absl::Duration first = ComputeCooldown(absl::nullopt, kTpmMessage, now, 1, 0.0, options).duration;
  absl::Duration third = ComputeCooldown(absl::nullopt, kTpmMessage, now, 3, 0.0, options).duration;
  EXPECT_EQ(first, absl::Seconds(30));
  EXPECT_GT(third, first);
  EXPECT_LE(ComputeCooldown(absl::nullopt, kTpmMessage, now, 30, 1.0, options).duration,
            options.max_cooldown);
}

}  // namespace
}  // namespace sflb
