// Reload reporting: what the log line and the audit entry say about a reload.
#include "controlplane/key_source.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

ReloadOutcome BigReload(size_t added) {
  ReloadOutcome outcome;
  outcome.change.previous_count = 1;
  outcome.change.new_count = static_cast<uint32_t>(added);
  for (size_t i = 0; i < added; ++i) outcome.change.added.push_back(absl::StrCat("fp", i));
  outcome.change.removed = {"gone"};
  outcome.source = "keys.txt";
  return outcome;
}

// The last JSON log line written to stderr while `fn` ran.
template <typename Fn>
nlohmann::json LoggedLine(Fn fn) {
  testing::internal::CaptureStderr();
  fn();
  std::string out = testing::internal::GetCapturedStderr();
  std::vector<std::string> lines = absl::StrSplit(out, '\n', absl::SkipEmpty());
  if (lines.empty()) return nullptr;
  return nlohmann::json::parse(lines.back(), nullptr, false);
}

TEST(ReloadReportTest, LogLineKeepsCountsButCutsLongFingerprintLists) {
  absl::StatusOr<ReloadOutcome> outcome = BigReload(10000);
  nlohmann::json line = LoggedLine([&] { LogReload(outcome, 1, {{"trigger", "SIGHUP"}}); });
  ASSERT_TRUE(line.is_object());
  EXPECT_EQ(line["event"], "keys_reloaded");
  EXPECT_EQ(line["trigger"], "SIGHUP");
  EXPECT_EQ(line["added_count"], 10000);
  ASSERT_EQ(line["added"].size(), kLoggedFingerprints);
  EXPECT_EQ(line["added"][0], "fp0");
  EXPECT_EQ(line["removed_count"], 1);
  EXPECT_EQ(line["removed"], nlohmann::json::array({"gone"}));
  EXPECT_EQ(line["new"], 10000);
}

TEST(ReloadReportTest, AuditDetailsKeepEveryFingerprint) {
  absl::StatusOr<ReloadOutcome> outcome = BigReload(10000);
  nlohmann::json details = ReloadAuditDetails(outcome, 1);
  EXPECT_EQ(details["result"], "ok");
  EXPECT_EQ(details["added"].size(), 10000u);
  EXPECT_EQ(details["source"], "keys.txt");
}

TEST(ReloadReportTest, FailureIsLoggedAsWarningAndAuditedWithTheKeysKept) {
  absl::StatusOr<ReloadOutcome> failed =
      absl::FailedPreconditionError("keys.txt:3: no usable key");
  nlohmann::json line = LoggedLine([&] { LogReload(failed, 7, {{"peer", "ipv4:1.2.3.4:5"}}); });
  ASSERT_TRUE(line.is_object());
  EXPECT_EQ(line["event"], "reload_failed");
  EXPECT_EQ(line["level"], "warning");
  EXPECT_EQ(line["error"], "keys.txt:3: no usable key");
  EXPECT_EQ(line["keys_kept"], 7);
  nlohmann::json details = ReloadAuditDetails(failed, 7);
  EXPECT_EQ(details["result"], "failed");
  EXPECT_EQ(details["keys_kept"], 7);
  EXPECT_EQ(details["error"], "keys.txt:3: no usable key");
}

}  // namespace
}  // namespace sflb
