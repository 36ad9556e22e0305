// Tests of controlplane/scope_blocks: the (account, model) block lifecycle (cooling, half-open
// probe, lift, backoff), duplicate and stale reports, correlated 429s, persistence.
// ScopeBlocks takes every time as an argument: the tests pass fixed instants, no clock at all.
#include "controlplane/scope_blocks.h"

#include <set>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "common/time_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

using ::testing::IsEmpty;
using ::testing::SizeIs;

// 2026-01-01T00:00:30Z: half a minute away from a minute boundary.
const absl::Time kT0 = absl::FromUnixSeconds(1767225600 + 30);
constexpr char kTpm[] = "Request was rejected due to rate limiting. Details: TPM limit reached.";

// The block of (account, model) in `blocks`, or nullptr.
const v1::ScopeBlock* Find(const std::vector<v1::ScopeBlock>& blocks, const std::string& account,
                           const std::string& model) {
  for (const v1::ScopeBlock& b : blocks) {
    if (b.account() == account && b.model() == model) return &b;
  }
  return nullptr;
}

class ScopeBlocksTest : public ::testing::Test {
 protected:
  // A 429 without Retry-After and a message naming no limit: the default 60 s (no jitter).
  bool RateLimited(const std::string& account, const std::string& model, absl::Time observed,
                   absl::Time now, size_t total_accounts = 10) {
    return blocks_.OnRateLimited(account, model, absl::nullopt, "", observed, now, total_accounts,
                                 0.0);
  }
  bool RateLimitedRetryAfter(const std::string& account, const std::string& model,
                             absl::Duration retry_after, absl::Time observed, absl::Time now) {
    return blocks_.OnRateLimited(account, model, retry_after, "", observed, now, 10, 0.0);
  }
  const v1::ScopeBlock* Get(const std::string& account, const std::string& model) {
    all_ = blocks_.All();
    return Find(all_, account, model);
  }

  ScopeBlockOptions options_;
  ScopeBlocks blocks_{options_};
  std::vector<v1::ScopeBlock> all_;
};

// ---------------------------------------------------------------------------------------------
// Cooling

TEST_F(ScopeBlocksTest, StartsEmpty) {
  EXPECT_THAT(blocks_.All(), IsEmpty());
  EXPECT_EQ(blocks_.NextDeadline(), absl::nullopt);
  EXPECT_FALSE(blocks_.Tick(kT0, {"r1"}));
}

TEST_F(ScopeBlocksTest, FirstRateLimitStartsCooling) {
  EXPECT_TRUE(RateLimited("team-a", "m1", kT0, kT0));
  ASSERT_THAT(blocks_.All(), SizeIs(1));
  const v1::ScopeBlock* b = Get("team-a", "m1");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(FromProtoTime(b->until()), kT0 + absl::Seconds(60));
  EXPECT_EQ(b->strikes(), 1u);
  EXPECT_EQ(b->limit(), "default");
  EXPECT_EQ(b->probe_replica(), "");
  EXPECT_EQ(blocks_.NextDeadline(), kT0 + absl::Seconds(60));
}

TEST_F(ScopeBlocksTest, NamedLimitSetsLengthLimitAndReason) {
  EXPECT_TRUE(blocks_.OnRateLimited("team-a", "m1", absl::nullopt, kTpm, kT0, kT0, 10, 0.0));
  const v1::ScopeBlock* b = Get("team-a", "m1");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->limit(), "TPM");
  EXPECT_EQ(b->reason(), kTpm);
  EXPECT_EQ(FromProtoTime(b->until()), absl::FromUnixSeconds(1767225600 + 60))
      << "the next minute boundary";
}

TEST_F(ScopeBlocksTest, LongReasonIsTruncated) {
  EXPECT_TRUE(
      blocks_.OnRateLimited("a", "m", absl::nullopt, std::string(2000, 'x'), kT0, kT0, 10, 0.0));
  EXPECT_EQ(Get("a", "m")->reason().size(), 512u);
}

TEST_F(ScopeBlocksTest, BlocksOnlyThatAccountAndModel) {
  ASSERT_TRUE(RateLimited("team-a", "m1", kT0, kT0));
  EXPECT_THAT(blocks_.BlocksFor("team-a"), SizeIs(1));
  EXPECT_THAT(blocks_.BlocksFor("team-b"), IsEmpty());
  EXPECT_EQ(Get("team-a", "m2"), nullptr);
}

TEST_F(ScopeBlocksTest, DuplicateWhileCoolingAddsNoStrikeAndKeepsTheEnd) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  // Another replica's echo, and a later 429 from a request that was already in flight.
  EXPECT_FALSE(RateLimited("a", "m", kT0, kT0 + absl::Milliseconds(50)));
  EXPECT_FALSE(RateLimited("a", "m", kT0 + absl::Seconds(20), kT0 + absl::Seconds(20)));
  const v1::ScopeBlock* b = Get("a", "m");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->strikes(), 1u);
  EXPECT_EQ(FromProtoTime(b->until()), kT0 + absl::Seconds(60));
  EXPECT_EQ(b->phase(), v1::BLOCK_PHASE_COOLING);
}

TEST_F(ScopeBlocksTest, LongerRetryAfterWhileCoolingExtendsShorterDoesNot) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const absl::Time t = kT0 + absl::Seconds(10);
  EXPECT_FALSE(RateLimitedRetryAfter("a", "m", absl::Seconds(30), t, t)) << "ends before 60 s";
  EXPECT_EQ(FromProtoTime(Get("a", "m")->until()), kT0 + absl::Seconds(60));
  EXPECT_TRUE(RateLimitedRetryAfter("a", "m", absl::Seconds(120), t, t));
  const v1::ScopeBlock* b = Get("a", "m");
  EXPECT_EQ(FromProtoTime(b->until()), t + absl::Seconds(120));
  EXPECT_EQ(b->strikes(), 1u) << "an extension is not a new strike";
  EXPECT_EQ(blocks_.NextDeadline(), t + absl::Seconds(120));
}

TEST_F(ScopeBlocksTest, StaleReportWhoseCooldownIsOverCreatesNoBlock) {
  // Seen ten minutes ago (a replica that was cut off from the controlplane): long over.
  EXPECT_FALSE(RateLimited("a", "m", kT0, kT0 + absl::Minutes(10)));
  EXPECT_THAT(blocks_.All(), IsEmpty());
  EXPECT_FALSE(RateLimitedRetryAfter("a", "m", absl::Seconds(5), kT0, kT0 + absl::Seconds(6)));
  EXPECT_THAT(blocks_.All(), IsEmpty());
  // A delayed report whose cooldown would still be in force does block.
  EXPECT_TRUE(RateLimited("a", "m", kT0, kT0 + absl::Seconds(30)));
  const v1::ScopeBlock* b = Get("a", "m");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_GT(FromProtoTime(b->until()), kT0 + absl::Seconds(30));
}

// ---------------------------------------------------------------------------------------------
// Half-open and probes

TEST_F(ScopeBlocksTest, TickAfterTheEndTurnsHalfOpenWithAProbeReplica) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const std::vector<std::string> replicas = {"r1", "r2"};
  EXPECT_FALSE(blocks_.Tick(kT0 + absl::Seconds(59), replicas));
  EXPECT_EQ(Get("a", "m")->phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_TRUE(blocks_.Tick(kT0 + absl::Seconds(60), replicas));
  const v1::ScopeBlock* b = Get("a", "m");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->phase(), v1::BLOCK_PHASE_HALF_OPEN);
  EXPECT_TRUE(b->probe_replica() == "r1" || b->probe_replica() == "r2") << b->probe_replica();
  EXPECT_EQ(blocks_.NextDeadline(), absl::nullopt) << "nothing is cooling any more";
  // A Tick with nothing to do changes nothing.
  EXPECT_FALSE(blocks_.Tick(kT0 + absl::Seconds(61), replicas));
}

TEST_F(ScopeBlocksTest, ProbeReplicasRotateAcrossScopes) {
  const std::vector<std::string> replicas = {"r1", "r2", "r3"};
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  ASSERT_TRUE(RateLimited("b", "m", kT0, kT0));
  ASSERT_TRUE(RateLimited("c", "m", kT0, kT0));
  ASSERT_TRUE(blocks_.Tick(kT0 + absl::Minutes(1), replicas));
  std::set<std::string> probers;
  for (const v1::ScopeBlock& b : blocks_.All()) {
    EXPECT_EQ(b.phase(), v1::BLOCK_PHASE_HALF_OPEN);
    probers.insert(b.probe_replica());
  }
  EXPECT_EQ(probers, (std::set<std::string>{"r1", "r2", "r3"}))
      << "three scopes turning half-open at once get three different replicas";
}

TEST_F(ScopeBlocksTest, StaleProbeIsReassignedToAnotherReplica) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const std::vector<std::string> replicas = {"r1", "r2", "r3"};
  const absl::Time open = kT0 + absl::Seconds(60);
  ASSERT_TRUE(blocks_.Tick(open, replicas));
  std::string first = Get("a", "m")->probe_replica();
  EXPECT_FALSE(blocks_.Tick(open + options_.probe_timeout - absl::Milliseconds(1), replicas));
  EXPECT_EQ(Get("a", "m")->probe_replica(), first);
  EXPECT_TRUE(blocks_.Tick(open + options_.probe_timeout, replicas));
  std::string second = Get("a", "m")->probe_replica();
  EXPECT_NE(second, first);
  EXPECT_FALSE(second.empty());
  EXPECT_EQ(Get("a", "m")->phase(), v1::BLOCK_PHASE_HALF_OPEN);
  // The new replica gets a whole probe_timeout of its own.
  EXPECT_FALSE(blocks_.Tick(open + 2 * options_.probe_timeout - absl::Milliseconds(1), replicas));
  EXPECT_TRUE(blocks_.Tick(open + 2 * options_.probe_timeout, replicas));
  EXPECT_NE(Get("a", "m")->probe_replica(), second);
}

TEST_F(ScopeBlocksTest, StaleProbeWithTheSameReplicaEveryTimeWhenThereIsOnlyOne) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const absl::Time open = kT0 + absl::Seconds(60);
  ASSERT_TRUE(blocks_.Tick(open, {"only"}));
  EXPECT_EQ(Get("a", "m")->probe_replica(), "only");
  EXPECT_FALSE(blocks_.Tick(open + options_.probe_timeout, {"only"}));
  EXPECT_EQ(Get("a", "m")->probe_replica(), "only");
}

TEST_F(ScopeBlocksTest, WithoutReplicasNoProbeIsNamedUntilOneWatches) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const absl::Time open = kT0 + absl::Seconds(60);
  ASSERT_TRUE(blocks_.Tick(open, {}));
  EXPECT_EQ(Get("a", "m")->phase(), v1::BLOCK_PHASE_HALF_OPEN);
  EXPECT_EQ(Get("a", "m")->probe_replica(), "");
  EXPECT_TRUE(blocks_.Tick(open + options_.probe_timeout, {"r9"}));
  EXPECT_EQ(Get("a", "m")->probe_replica(), "r9");
}

TEST_F(ScopeBlocksTest, ProbeSuccessLiftsAHalfOpenBlockOnly) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  ASSERT_TRUE(RateLimited("a", "other", kT0, kT0));
  EXPECT_FALSE(blocks_.OnProbeSuccess("a", "m", kT0 + absl::Seconds(5)))
      << "a success while cooling is not a probe (a request sent before the block)";
  EXPECT_NE(Get("a", "m"), nullptr);
  ASSERT_TRUE(blocks_.Tick(kT0 + absl::Seconds(60), {"r1"}));
  EXPECT_TRUE(blocks_.OnProbeSuccess("a", "m", kT0 + absl::Seconds(61)));
  EXPECT_EQ(Get("a", "m"), nullptr);
  EXPECT_NE(Get("a", "other"), nullptr) << "another model of the account stays blocked";
  EXPECT_FALSE(blocks_.OnProbeSuccess("a", "m", kT0 + absl::Seconds(62))) << "nothing to lift";
  EXPECT_FALSE(blocks_.OnProbeSuccess("zzz", "m", kT0 + absl::Seconds(62)));
}

TEST_F(ScopeBlocksTest, RateLimitWhileHalfOpenCoolsAgainWithBackoff) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const absl::Time open = kT0 + absl::Seconds(60);
  ASSERT_TRUE(blocks_.Tick(open, {"r1"}));
  // The probe got another 429.
  const absl::Time t = open + absl::Seconds(1);
  EXPECT_TRUE(RateLimited("a", "m", t, t));
  const v1::ScopeBlock* b = Get("a", "m");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(b->strikes(), 2u);
  EXPECT_EQ(FromProtoTime(b->until()), t + absl::Seconds(120)) << "twice the first cooldown";
  EXPECT_EQ(b->probe_replica(), "");
  EXPECT_EQ(blocks_.NextDeadline(), t + absl::Seconds(120));
  // And once more: 240 s.
  const absl::Time open2 = t + absl::Seconds(120);
  ASSERT_TRUE(blocks_.Tick(open2, {"r1"}));
  EXPECT_TRUE(RateLimited("a", "m", open2, open2));
  EXPECT_EQ(Get("a", "m")->strikes(), 3u);
  EXPECT_EQ(FromProtoTime(Get("a", "m")->until()), open2 + absl::Seconds(240));
}

// A 429 observed while the scope was still cooling (reported late: a replica that was cut off,
// or a slow report) is an echo of the event that caused the block, not the probe's answer.
// While cooling such echoes are ignored; once the block turned half-open the same echo counts
// as a failed probe: another strike and a doubled cooldown.
TEST_F(ScopeBlocksTest, EchoObservedDuringCoolingDoesNotReCoolAHalfOpenBlock) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));
  const absl::Time open = kT0 + absl::Seconds(60);
  ASSERT_TRUE(blocks_.Tick(open, {"r1"}));
  // Observed 30 s into the cooldown, arriving 1 s after the block turned half-open.
  EXPECT_FALSE(RateLimited("a", "m", kT0 + absl::Seconds(30), open + absl::Seconds(1)));
  const v1::ScopeBlock* b = Get("a", "m");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->phase(), v1::BLOCK_PHASE_HALF_OPEN);
  EXPECT_EQ(b->strikes(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Correlated 429s

TEST_F(ScopeBlocksTest, MostAccountsWithinTheWindowMakeAPoolWideBlock) {
  // 3 of 5 accounts (60%) within 10 s.
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0, 5));
  ASSERT_TRUE(RateLimited("b", "m", kT0 + absl::Seconds(2), kT0 + absl::Seconds(2), 5));
  EXPECT_EQ(Get("*", "m"), nullptr) << "2 of 5 is not most";
  ASSERT_TRUE(RateLimited("c", "m", kT0 + absl::Seconds(4), kT0 + absl::Seconds(4), 5));
  const v1::ScopeBlock* pool = Get("*", "m");
  ASSERT_NE(pool, nullptr);
  EXPECT_EQ(pool->phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(pool->limit(), "pool-wide");
  EXPECT_FALSE(pool->reason().empty());
  EXPECT_GT(FromProtoTime(pool->until()), kT0 + absl::Seconds(4));
  // Every account sees it, also those that were not rate limited.
  EXPECT_NE(Find(blocks_.BlocksFor("e"), "*", "m"), nullptr);
  EXPECT_THAT(blocks_.BlocksFor("e"), SizeIs(1));
  EXPECT_EQ(Get("*", "other"), nullptr) << "other models are not affected";
}

TEST_F(ScopeBlocksTest, TwoOfFiveAccountsAreNoPoolWideEvent) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0, 5));
  ASSERT_TRUE(RateLimited("b", "m", kT0, kT0, 5));
  EXPECT_EQ(Get("*", "m"), nullptr);
  EXPECT_THAT(blocks_.All(), SizeIs(2));
}

TEST_F(ScopeBlocksTest, AccountsOutsideTheWindowAreNoPoolWideEvent) {
  // One every 6 s: never three within 10 s.
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0, 3));
  ASSERT_TRUE(RateLimited("b", "m", kT0 + absl::Seconds(6), kT0 + absl::Seconds(6), 3));
  ASSERT_TRUE(RateLimited("c", "m", kT0 + absl::Seconds(12), kT0 + absl::Seconds(12), 3));
  EXPECT_EQ(Get("*", "m"), nullptr);
}

TEST_F(ScopeBlocksTest, DifferentModelsAreNotCorrelated) {
  ASSERT_TRUE(RateLimited("a", "m1", kT0, kT0, 3));
  ASSERT_TRUE(RateLimited("b", "m2", kT0, kT0, 3));
  ASSERT_TRUE(RateLimited("c", "m1", kT0, kT0, 3));
  EXPECT_EQ(Get("*", "m1"), nullptr);
  EXPECT_EQ(Get("*", "m2"), nullptr);
}

TEST_F(ScopeBlocksTest, TooFewAccountsAreNeverPoolWide) {
  // 2 of 2 accounts is everyone, but below correlation_min_accounts.
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0, 2));
  ASSERT_TRUE(RateLimited("b", "m", kT0, kT0, 2));
  EXPECT_EQ(Get("*", "m"), nullptr);
}

TEST_F(ScopeBlocksTest, ProbeSuccessLiftsThePoolWideBlockForTheModel) {
  for (const char* account : {"a", "b", "c"}) ASSERT_TRUE(RateLimited(account, "m", kT0, kT0, 3));
  ASSERT_NE(Get("*", "m"), nullptr);
  const absl::Time open = kT0 + absl::Minutes(5);
  ASSERT_TRUE(blocks_.Tick(open, {"r1", "r2"}));
  for (const v1::ScopeBlock& b : blocks_.All()) EXPECT_EQ(b.phase(), v1::BLOCK_PHASE_HALF_OPEN);
  // Account "a" probed successfully: its own block and the pool-wide one go.
  EXPECT_TRUE(blocks_.OnProbeSuccess("a", "m", open + absl::Seconds(1)));
  EXPECT_EQ(Get("a", "m"), nullptr);
  EXPECT_EQ(Get("*", "m"), nullptr);
  EXPECT_NE(Get("b", "m"), nullptr);
  EXPECT_NE(Get("c", "m"), nullptr);
}

TEST_F(ScopeBlocksTest, ProbeSuccessOfAnUnblockedAccountLiftsThePoolWideBlock) {
  for (const char* account : {"a", "b", "c"}) ASSERT_TRUE(RateLimited(account, "m", kT0, kT0, 4));
  ASSERT_NE(Get("*", "m"), nullptr);
  ASSERT_TRUE(blocks_.Tick(kT0 + absl::Minutes(5), {"r1"}));
  EXPECT_TRUE(blocks_.OnProbeSuccess("d", "m", kT0 + absl::Minutes(5)));
  EXPECT_EQ(Get("*", "m"), nullptr);
  EXPECT_THAT(blocks_.All(), SizeIs(3));
}

// ---------------------------------------------------------------------------------------------
// ClearAccount

TEST_F(ScopeBlocksTest, ClearAccountLiftsEveryBlockOfThatAccountOnly) {
  ASSERT_TRUE(RateLimited("a", "m1", kT0, kT0));
  ASSERT_TRUE(RateLimited("a", "m2", kT0, kT0));
  ASSERT_TRUE(RateLimited("b", "m1", kT0, kT0));
  EXPECT_TRUE(blocks_.ClearAccount("a"));
  ASSERT_THAT(blocks_.All(), SizeIs(1));
  EXPECT_NE(Get("b", "m1"), nullptr);
  EXPECT_FALSE(blocks_.ClearAccount("a")) << "nothing left to clear";
  EXPECT_FALSE(blocks_.ClearAccount("nobody"));
}

TEST_F(ScopeBlocksTest, ClearAccountKeepsPoolWideBlocks) {
  for (const char* account : {"a", "b", "c"}) ASSERT_TRUE(RateLimited(account, "m", kT0, kT0, 3));
  ASSERT_TRUE(blocks_.ClearAccount("a"));
  EXPECT_NE(Get("*", "m"), nullptr);
}

// ---------------------------------------------------------------------------------------------
// NextDeadline

TEST_F(ScopeBlocksTest, NextDeadlineIsTheEarliestCoolingEnd) {
  ASSERT_TRUE(RateLimitedRetryAfter("a", "m", absl::Seconds(90), kT0, kT0));
  ASSERT_TRUE(RateLimitedRetryAfter("b", "m", absl::Seconds(30), kT0, kT0));
  ASSERT_TRUE(RateLimitedRetryAfter("c", "m", absl::Seconds(60), kT0, kT0));
  EXPECT_EQ(blocks_.NextDeadline(), kT0 + absl::Seconds(30));
  ASSERT_TRUE(blocks_.Tick(kT0 + absl::Seconds(30), {"r1"}));
  EXPECT_EQ(blocks_.NextDeadline(), kT0 + absl::Seconds(60)) << "half-open ones do not count";
  ASSERT_TRUE(blocks_.Tick(kT0 + absl::Seconds(90), {"r1"}));
  EXPECT_EQ(blocks_.NextDeadline(), absl::nullopt);
}

// ---------------------------------------------------------------------------------------------
// ToJson / Restore

TEST_F(ScopeBlocksTest, ToJsonAndRestoreRoundTrip) {
  ASSERT_TRUE(blocks_.OnRateLimited("a", "m1", absl::nullopt, kTpm, kT0, kT0, 10, 0.0));
  ASSERT_TRUE(RateLimitedRetryAfter("b", "m2", absl::Minutes(10), kT0, kT0));
  // A second strike for (b, m2) does not exist yet; give (a, m1) one via half-open + 429.
  ASSERT_TRUE(blocks_.Tick(kT0 + absl::Seconds(30), {"r1"}));
  ASSERT_TRUE(blocks_.OnRateLimited("a", "m1", absl::nullopt, kTpm, kT0 + absl::Seconds(31),
                                    kT0 + absl::Seconds(31), 10, 0.0));
  const std::vector<v1::ScopeBlock> before = blocks_.All();
  ASSERT_THAT(before, SizeIs(2));
  const v1::ScopeBlock* a_before = Find(before, "a", "m1");
  ASSERT_NE(a_before, nullptr);
  ASSERT_EQ(a_before->strikes(), 2u);
  const absl::Time a_until = FromProtoTime(a_before->until());

  // Through text, as the state file does.
  nlohmann::json saved = nlohmann::json::parse(blocks_.ToJson().dump());
  ScopeBlocks restored(options_);
  const absl::Time now = kT0 + absl::Seconds(40);  // before both ends
  restored.Restore(saved, now);
  std::vector<v1::ScopeBlock> after = restored.All();
  ASSERT_THAT(after, SizeIs(2));
  for (const v1::ScopeBlock& b : before) {
    const v1::ScopeBlock* r = Find(after, b.account(), b.model());
    ASSERT_NE(r, nullptr) << b.account() << "/" << b.model();
    EXPECT_EQ(r->phase(), v1::BLOCK_PHASE_COOLING);
    EXPECT_EQ(FromProtoTime(r->until()), FromProtoTime(b.until()));
    EXPECT_EQ(r->strikes(), b.strikes());
    EXPECT_EQ(r->limit(), b.limit());
    EXPECT_EQ(r->reason(), b.reason());
  }
  EXPECT_EQ(restored.NextDeadline(), a_until);
  // The strikes survive: the next 429 after half-open backs off from there.
  ASSERT_TRUE(restored.Tick(a_until, {"r1"}));
  ASSERT_TRUE(restored.OnRateLimited("a", "m1", absl::nullopt, "", a_until, a_until, 10, 0.0));
  EXPECT_EQ(Find(restored.All(), "a", "m1")->strikes(), 3u);
}

TEST_F(ScopeBlocksTest, RestoredBlocksPastTheirEndCoolUntilNowThenTurnHalfOpen) {
  ASSERT_TRUE(RateLimited("a", "m", kT0, kT0));  // until kT0 + 60 s
  ASSERT_TRUE(RateLimitedRetryAfter("b", "m", absl::Hours(1), kT0, kT0));
  nlohmann::json saved = blocks_.ToJson();
  ScopeBlocks restored(options_);
  const absl::Time now = kT0 + absl::Minutes(5);  // the controlplane was down for 5 minutes
  restored.Restore(saved, now);
  std::vector<v1::ScopeBlock> after = restored.All();
  const v1::ScopeBlock* a = Find(after, "a", "m");
  const v1::ScopeBlock* b = Find(after, "b", "m");
  ASSERT_TRUE(a != nullptr && b != nullptr);
  EXPECT_EQ(a->phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(FromProtoTime(a->until()), now);
  EXPECT_EQ(FromProtoTime(b->until()), kT0 + absl::Hours(1));
  EXPECT_TRUE(restored.Tick(now, {"r1"}));
  after = restored.All();
  EXPECT_EQ(Find(after, "a", "m")->phase(), v1::BLOCK_PHASE_HALF_OPEN);
  EXPECT_EQ(Find(after, "a", "m")->probe_replica(), "r1");
  EXPECT_EQ(Find(after, "b", "m")->phase(), v1::BLOCK_PHASE_COOLING);
}

TEST_F(ScopeBlocksTest, RestoreIgnoresMalformedInput) {
  for (const char* text :
       {"null", "{}", "\"blocks\"", "42", "[1, \"x\", null, []]", "[{\"model\": \"m\"}]",
        "[{\"account\": \"a\"}]", "[{\"account\": 7, \"model\": \"m\"}]"}) {
    ScopeBlocks restored(options_);
    restored.Restore(nlohmann::json::parse(text), kT0);
    EXPECT_THAT(restored.All(), IsEmpty()) << text;
  }
  // Good entries next to bad ones are kept.
  ScopeBlocks restored(options_);
  restored.Restore(
      nlohmann::json::parse("[{\"account\": 1}, {\"account\": \"a\", \"model\": \"m\", "
                            "\"until_unix_ms\": 1767225700000, \"strikes\": 2}]"),
      kT0);
  ASSERT_THAT(restored.All(), SizeIs(1));
  EXPECT_EQ(restored.All()[0].strikes(), 2u);
  EXPECT_EQ(FromProtoTime(restored.All()[0].until()), absl::FromUnixMillis(1767225700000));
}

// The header promises "Restore ignores malformed entries". An entry whose account and model are
// fine but whose other fields have the wrong JSON type (a hand-edited or older state file)
// makes nlohmann::json::value() throw type_error out of Restore instead.
TEST_F(ScopeBlocksTest, RestoreIgnoresEntriesWithWronglyTypedFields) {
  for (const char* text : {"[{\"account\": \"a\", \"model\": \"m\", \"until_unix_ms\": \"soon\"}]",
                           "[{\"account\": \"a\", \"model\": \"m\", \"strikes\": \"two\"}]",
                           "[{\"account\": \"a\", \"model\": \"m\", \"limit\": 5}]"}) {
    ScopeBlocks restored(options_);
    EXPECT_NO_THROW(restored.Restore(nlohmann::json::parse(text), kT0)) << text;
  }
}

}  // namespace
}  // namespace sflb
