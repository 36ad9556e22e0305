// Tests of common/key_format (KeyFingerprint, MaskKey) and, because common_test has no file of
// its own for it, of common/time_format (ISO-8601 text and protobuf time conversions): both are
// "how a value is shown / carried" helpers.
#include "common/key_format.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/time_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

constexpr absl::string_view kEllipsis = "\xE2\x80\xA6";  // U+2026, 3 bytes of UTF-8

// A key shaped like SiliconFlow's: "sk-" + 48 lowercase letters.
std::string RealisticKey() {
  std::string key = "sk-";
  for (int i = 0; i < 48; ++i) key.push_back(static_cast<char>('a' + (i * 7) % 26));
  return key;
}

// Number of key bytes a mask shows (the mask minus its ellipsis).
size_t RevealedBytes(const std::string& mask) {
  EXPECT_TRUE(absl::StrContains(mask, kEllipsis)) << "every mask has an ellipsis";
  return mask.size() - kEllipsis.size();
}

// ---------------------------------------------------------------------------------------------
// KeyFingerprint

TEST(KeyFingerprintTest, IsFirst12HexDigitsOfSha256) {
  // Known SHA-256 vectors.
  EXPECT_EQ(KeyFingerprint(""), "e3b0c44298fc");
  EXPECT_EQ(KeyFingerprint("abc"), "ba7816bf8f01");
}

TEST(KeyFingerprintTest, StableLowercaseHexOfLength12) {
  const std::string key = RealisticKey();
  const std::string fp = KeyFingerprint(key);
  EXPECT_EQ(fp.size(), 12u);
  for (char c : fp) {
    EXPECT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << "not lowercase hex: " << c;
  }
  EXPECT_EQ(KeyFingerprint(key), fp) << "must be deterministic";
  EXPECT_FALSE(absl::StrContains(key, fp));
}

TEST(KeyFingerprintTest, DiffersForKeysDifferingInOneByte) {
  std::string a = RealisticKey();
  std::string b = a;
  b.back() = b.back() == 'x' ? 'y' : 'x';
  EXPECT_NE(KeyFingerprint(a), KeyFingerprint(b));
}

TEST(KeyFingerprintTest, HandlesEmbeddedNulBytes) {
  // The whole string_view is hashed, not a C string up to the first NUL.
  std::string with_nul("ab\0cd", 5);
  EXPECT_NE(KeyFingerprint(with_nul), KeyFingerprint("ab"));
}

// ---------------------------------------------------------------------------------------------
// MaskKey

TEST(MaskKeyTest, LongKeyShowsFirstFiveAndLastFour) {
  const std::string key = RealisticKey();
  EXPECT_EQ(MaskKey(key), absl::StrCat(key.substr(0, 5), kEllipsis, key.substr(key.size() - 4)));
  EXPECT_EQ(MaskKey("sk-abcdefghijklmnopqrstuvwxyz"), "sk-ab\xE2\x80\xA6wxyz");
}

TEST(MaskKeyTest, MediumKeyShowsTwoAndTwo) {
  EXPECT_EQ(MaskKey("abcdefgh"), "ab\xE2\x80\xA6gh");         // 8 bytes
  EXPECT_EQ(MaskKey("abcdefghijklmno"), "ab\xE2\x80\xA6no");  // 15 bytes
}

TEST(MaskKeyTest, ShortKeyShowsNothing) {
  EXPECT_EQ(MaskKey(""), std::string(kEllipsis));
  EXPECT_EQ(MaskKey("a"), std::string(kEllipsis));
  EXPECT_EQ(MaskKey("abcdefg"), std::string(kEllipsis));  // 7 bytes
}

TEST(MaskKeyTest, NeverContainsTheWholeKey) {
  for (size_t len = 1; len <= 80; ++len) {
    std::string key;
    for (size_t i = 0; i < len; ++i) key.push_back(static_cast<char>('A' + i % 26));
    EXPECT_FALSE(absl::StrContains(MaskKey(key), key)) << "length " << len;
  }
}

// Regression test: the header promises "a mask never reveals more than half of a
// key", but keys of 16 and 17 bytes are masked as first 5 + last 4 = 9 bytes, more than half.
// This test states the documented invariant and fails for lengths 16 and 17.
TEST(MaskKeyTest, NeverRevealsMoreThanHalfOfTheKey) {
  for (size_t len = 0; len <= 80; ++len) {
    std::string key(len, 'k');
    size_t revealed = RevealedBytes(MaskKey(key));
    EXPECT_LE(2 * revealed, len) << "a " << len << "-byte key shows " << revealed << " bytes";
  }
}

// ---------------------------------------------------------------------------------------------
// time_format

TEST(TimeFormatTest, FormatIso8601IsUtcWithMilliseconds) {
  absl::Time t = absl::FromUnixSeconds(1795698000) + absl::Milliseconds(123);
  EXPECT_EQ(FormatIso8601(t), "2026-11-26T13:00:00.123Z");
  EXPECT_EQ(FormatIso8601(absl::FromUnixSeconds(1767225600)), "2026-01-01T00:00:00.000Z");
  // Sub-millisecond digits are truncated, never shown.
  EXPECT_EQ(FormatIso8601(absl::FromUnixSeconds(0) + absl::Microseconds(1999)),
            "1970-01-01T00:00:00.001Z");
}

TEST(TimeFormatTest, ProtoTimeRoundTrip) {
  absl::Time t = absl::FromUnixSeconds(1795698000) + absl::Nanoseconds(123456789);
  google::protobuf::Timestamp p = ToProtoTime(t);
  EXPECT_EQ(p.seconds(), 1795698000);
  EXPECT_EQ(p.nanos(), 123456789);
  EXPECT_EQ(FromProtoTime(p), t);
}

TEST(TimeFormatTest, ProtoTimeBeforeEpochHasNonNegativeNanos) {
  // 1969-12-31T23:59:59.750Z: protobuf wants seconds=-1, nanos=750000000.
  absl::Time t = absl::FromUnixSeconds(0) - absl::Milliseconds(250);
  google::protobuf::Timestamp p = ToProtoTime(t);
  EXPECT_EQ(p.seconds(), -1);
  EXPECT_EQ(p.nanos(), 750000000);
  EXPECT_EQ(FromProtoTime(p), t);
}

TEST(TimeFormatTest, UnsetTimestampIsInfinitePast) {
  google::protobuf::Timestamp unset;
  EXPECT_EQ(FromProtoTime(unset), absl::InfinitePast());
  google::protobuf::Timestamp p = ToProtoTime(absl::InfinitePast());
  EXPECT_EQ(p.seconds(), 0);
  EXPECT_EQ(p.nanos(), 0);
}

TEST(TimeFormatTest, ProtoDurationRoundTripKeepsSignsTogether) {
  google::protobuf::Duration p = ToProtoDuration(absl::Milliseconds(1500));
  EXPECT_EQ(p.seconds(), 1);
  EXPECT_EQ(p.nanos(), 500000000);
  EXPECT_EQ(FromProtoDuration(p), absl::Milliseconds(1500));

  // Protobuf's Duration requires seconds and nanos of the same sign.
  google::protobuf::Duration n = ToProtoDuration(-absl::Milliseconds(1500));
  EXPECT_EQ(n.seconds(), -1);
  EXPECT_EQ(n.nanos(), -500000000);
  EXPECT_EQ(FromProtoDuration(n), -absl::Milliseconds(1500));

  EXPECT_EQ(FromProtoDuration(ToProtoDuration(absl::ZeroDuration())), absl::ZeroDuration());
  EXPECT_EQ(FromProtoDuration(ToProtoDuration(absl::Hours(30))), absl::Hours(30));
}

}  // namespace
}  // namespace sflb
