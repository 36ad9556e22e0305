// Tests of controlplane/key_registry: the key set, its round robin, states, counters, version
// history and operator views, and key health: report outcomes, scope blocks, operator actions,
// Tick, explanations and the persisted state. Time only moves with the FakeClock.
#include "controlplane/key_registry.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/types/optional.h"
#include "common/key_format.h"
#include "common/time_format.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/fake_clock.h"

namespace sflb {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::SizeIs;
using ::testing::UnorderedElementsAre;

// A realistic-looking, unique secret.
std::string Secret(int i) {
  return absl::StrCat("sk-registrytest", i, "-abcdefghijklmnopqrstuvwxyz");
}

KeySet MakeKeys(const std::vector<std::string>& secrets,
                const std::map<std::string, std::string>& accounts = {}) {
  KeySet set;
  set.source = "test";
  for (const std::string& s : secrets) {
    KeySpec spec;
    spec.secret = s;
    auto it = accounts.find(s);
    if (it != accounts.end()) spec.account = it->second;
    spec.origin = "test";
    set.keys.push_back(spec);
  }
  return set;
}

// Id of the key with `secret`, from a snapshot.
uint64_t IdOf(const KeyRegistry& registry, const std::string& secret) {
  v1::Snapshot snapshot = registry.BuildSnapshot();
  for (const v1::UpstreamKey& k : snapshot.keys()) {
    if (k.secret() == secret) return k.id();
  }
  ADD_FAILURE() << "key not in snapshot (fingerprint " << KeyFingerprint(secret) << ")";
  return 0;
}

const v1::KeyStatus* StatusOf(const std::vector<v1::KeyStatus>& list, uint64_t id) {
  for (const v1::KeyStatus& k : list) {
    if (k.id() == id) return &k;
  }
  return nullptr;
}

std::vector<uint64_t> Ids(const v1::LeaseResponse& lease) {
  return std::vector<uint64_t>(lease.key_ids().begin(), lease.key_ids().end());
}

v1::KeyUsage Usage(uint64_t id, uint64_t requests, uint64_t prompt, uint64_t completion,
                   absl::Time last_used = absl::InfinitePast()) {
  v1::KeyUsage u;
  u.set_key_id(id);
  u.set_requests(requests);
  u.set_prompt_tokens(prompt);
  u.set_completion_tokens(completion);
  if (last_used != absl::InfinitePast()) *u.mutable_last_used() = ToProtoTime(last_used);
  return u;
}

// Collects every string field value of `message`, recursively (singular and repeated).
void CollectStrings(const google::protobuf::Message& message, std::vector<std::string>* out) {
  const google::protobuf::Reflection* reflection = message.GetReflection();
  std::vector<const google::protobuf::FieldDescriptor*> fields;
  reflection->ListFields(message, &fields);
  for (const google::protobuf::FieldDescriptor* field : fields) {
    using FD = google::protobuf::FieldDescriptor;
    if (field->cpp_type() == FD::CPPTYPE_STRING) {
      if (field->is_repeated()) {
        for (int i = 0; i < reflection->FieldSize(message, field); ++i) {
          out->push_back(reflection->GetRepeatedString(message, field, i));
        }
      } else {
        out->push_back(reflection->GetString(message, field));
      }
    } else if (field->cpp_type() == FD::CPPTYPE_MESSAGE) {
      if (field->is_repeated()) {
        for (int i = 0; i < reflection->FieldSize(message, field); ++i) {
          CollectStrings(reflection->GetRepeatedMessage(message, field, i), out);
        }
      } else {
        CollectStrings(reflection->GetMessage(message, field), out);
      }
    }
  }
}

// Fails when any string field of `message`, or its wire bytes, contains one of `secrets`.
void ExpectNoSecrets(const google::protobuf::Message& message,
                     const std::vector<std::string>& secrets) {
  std::vector<std::string> strings;
  CollectStrings(message, &strings);
  std::string wire = message.SerializeAsString();
  for (const std::string& secret : secrets) {
    for (const std::string& s : strings) {
      EXPECT_FALSE(absl::StrContains(s, secret))
          << "a string field holds the secret of key " << KeyFingerprint(secret);
    }
    EXPECT_FALSE(absl::StrContains(wire, secret))
        << "the serialised message holds the secret of key " << KeyFingerprint(secret);
  }
}

class KeyRegistryTest : public ::testing::Test {
 protected:
  FakeClock clock_;
  KeyRegistry registry_{&clock_};
};

// ---------------------------------------------------------------------------------------------
// Replace

TEST_F(KeyRegistryTest, StartsEmpty) {
  EXPECT_EQ(registry_.size(), 0u);
  EXPECT_THAT(registry_.BuildSnapshot().keys(), IsEmpty());
  EXPECT_THAT(registry_.Lease(5).key_ids(), IsEmpty());
}

TEST_F(KeyRegistryTest, FirstReplaceAddsEveryKeyInOrder) {
  uint64_t v0 = registry_.version();
  ReplaceResult r = registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  EXPECT_EQ(r.previous_count, 0u);
  EXPECT_EQ(r.new_count, 3u);
  EXPECT_THAT(r.added, ElementsAre(KeyFingerprint(Secret(1)), KeyFingerprint(Secret(2)),
                                   KeyFingerprint(Secret(3))));
  EXPECT_THAT(r.removed, IsEmpty());
  EXPECT_GT(r.version, v0);
  EXPECT_EQ(r.version, registry_.version());
  EXPECT_EQ(registry_.size(), 3u);

  std::set<uint64_t> ids;
  for (int i = 1; i <= 3; ++i) ids.insert(IdOf(registry_, Secret(i)));
  EXPECT_THAT(ids, SizeIs(3)) << "ids must be distinct";
  EXPECT_EQ(ids.count(0), 0u) << "0 is not a valid id";
}

TEST_F(KeyRegistryTest, ReplaceKeepsIdStateAndCountersOfStayingKeys) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t id1 = IdOf(registry_, Secret(1));
  const uint64_t id2 = IdOf(registry_, Secret(2));
  const uint64_t id3 = IdOf(registry_, Secret(3));
  const absl::Time added = clock_.Now();

  clock_.Advance(absl::Minutes(1));
  ASSERT_TRUE(registry_.SetState(id3, v1::KEY_STATE_DISABLED, "operator", absl::InfinitePast()));
  v1::ReportRequest report;
  *report.add_usage() = Usage(id1, 5, 100, 50, clock_.Now());
  registry_.ApplyReport(report);

  clock_.Advance(absl::Minutes(1));
  ReplaceResult r =
      registry_.Replace(MakeKeys({Secret(3), Secret(4), Secret(1)}, {{Secret(1), "team-x"}}));
  EXPECT_EQ(r.previous_count, 3u);
  EXPECT_EQ(r.new_count, 3u);
  EXPECT_THAT(r.added, ElementsAre(KeyFingerprint(Secret(4))));
  EXPECT_THAT(r.removed, ElementsAre(KeyFingerprint(Secret(2))));

  EXPECT_EQ(IdOf(registry_, Secret(1)), id1);
  EXPECT_EQ(IdOf(registry_, Secret(3)), id3);
  const uint64_t id4 = IdOf(registry_, Secret(4));
  EXPECT_NE(id4, id1);
  EXPECT_NE(id4, id2);
  EXPECT_NE(id4, id3);

  std::vector<v1::KeyStatus> list = registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED);
  ASSERT_THAT(list, SizeIs(3));
  const v1::KeyStatus* k1 = StatusOf(list, id1);
  const v1::KeyStatus* k3 = StatusOf(list, id3);
  const v1::KeyStatus* k4 = StatusOf(list, id4);
  ASSERT_TRUE(k1 && k3 && k4);
  // Counters survive, the account and index follow the new spec.
  EXPECT_EQ(k1->request_count(), 5u);
  EXPECT_EQ(k1->prompt_tokens(), 100u);
  EXPECT_EQ(k1->completion_tokens(), 50u);
  EXPECT_EQ(k1->account(), "team-x");
  EXPECT_EQ(k1->index(), 2u);
  EXPECT_EQ(FromProtoTime(k1->added_at()), added);
  // State survives.
  EXPECT_EQ(k3->state(), v1::KEY_STATE_DISABLED);
  EXPECT_EQ(k3->state_reason(), "operator");
  EXPECT_EQ(k3->index(), 0u);
  // The new key starts ACTIVE, with its fingerprint as account and fresh counters.
  EXPECT_EQ(k4->state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(k4->account(), KeyFingerprint(Secret(4)));
  EXPECT_EQ(k4->request_count(), 0u);
  EXPECT_EQ(FromProtoTime(k4->added_at()), clock_.Now());
  EXPECT_EQ(k4->index(), 1u);
}

TEST_F(KeyRegistryTest, RemovedKeyComingBackGetsANewId) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t old_id = IdOf(registry_, Secret(2));
  registry_.Replace(MakeKeys({Secret(1)}));
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  EXPECT_NE(IdOf(registry_, Secret(2)), old_id) << "ids are never reused";
}

TEST_F(KeyRegistryTest, RemovedKeysAreReportedInFileOrder) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4), Secret(5)}));
  ReplaceResult r = registry_.Replace(MakeKeys({Secret(3)}));
  EXPECT_THAT(r.removed, ElementsAre(KeyFingerprint(Secret(1)), KeyFingerprint(Secret(2)),
                                     KeyFingerprint(Secret(4)), KeyFingerprint(Secret(5))));
  EXPECT_EQ(registry_.size(), 1u);
}

TEST_F(KeyRegistryTest, ReplaceBumpsTheVersion) {
  uint64_t v1 = registry_.Replace(MakeKeys({Secret(1)})).version;
  uint64_t v2 = registry_.Replace(MakeKeys({Secret(1), Secret(2)})).version;
  EXPECT_GT(v2, v1);
  EXPECT_EQ(registry_.version(), v2);
}

TEST_F(KeyRegistryTest, ReplaceWithTenThousandKeys) {
  std::vector<std::string> secrets;
  for (int i = 0; i < 10000; ++i) secrets.push_back(Secret(i));
  absl::Time start = absl::Now();
  ReplaceResult r = registry_.Replace(MakeKeys(secrets));
  EXPECT_EQ(r.new_count, 10000u);
  EXPECT_THAT(r.added, SizeIs(10000));
  EXPECT_EQ(registry_.size(), 10000u);

  v1::Snapshot snapshot = registry_.BuildSnapshot();
  ASSERT_THAT(snapshot.keys(), SizeIs(10000));
  std::map<uint64_t, int> position;
  for (int i = 0; i < snapshot.keys_size(); ++i) {
    EXPECT_EQ(snapshot.keys(i).index(), static_cast<uint32_t>(i));
    position[snapshot.keys(i).id()] = i;
  }
  EXPECT_THAT(position, SizeIs(10000)) << "distinct ids";

  // One lap of the round robin hands out every key exactly once.
  v1::LeaseResponse lease = registry_.Lease(10000);
  std::set<uint64_t> leased(lease.key_ids().begin(), lease.key_ids().end());
  EXPECT_EQ(leased.size(), 10000u);

  // The same keys in reverse order: nothing added or removed, every id kept.
  std::vector<std::string> reversed(secrets.rbegin(), secrets.rend());
  ReplaceResult again = registry_.Replace(MakeKeys(reversed));
  EXPECT_THAT(again.added, IsEmpty());
  EXPECT_THAT(again.removed, IsEmpty());
  v1::Snapshot after = registry_.BuildSnapshot();
  ASSERT_THAT(after.keys(), SizeIs(10000));
  for (int i = 0; i < after.keys_size(); ++i) {
    EXPECT_TRUE(after.keys(i).secret() == reversed[i]) << "file order at " << i;
    ASSERT_EQ(position.count(after.keys(i).id()), 1u) << "id kept at " << i;
  }
  absl::StatusOr<uint64_t> last = registry_.Resolve("9999");
  // "9999" has fewer than 6 characters: an index.
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, after.keys(9999).id());
  EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "10,000 keys must be cheap";
}

// ---------------------------------------------------------------------------------------------
// Lease

TEST_F(KeyRegistryTest, LeaseIsOneRoundRobinAcrossCalls) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t c = IdOf(registry_, Secret(3));
  v1::LeaseResponse first = registry_.Lease(7);
  EXPECT_THAT(Ids(first), ElementsAre(a, b, c, a, b, c, a));
  EXPECT_EQ(first.snapshot_version(), registry_.version());
  EXPECT_THAT(Ids(registry_.Lease(2)), ElementsAre(b, c));
  EXPECT_THAT(Ids(registry_.Lease(1)), ElementsAre(a));
  EXPECT_THAT(Ids(registry_.Lease(0)), IsEmpty());
}

TEST_F(KeyRegistryTest, LeaseIsEven) {
  std::vector<std::string> secrets;
  for (int i = 0; i < 7; ++i) secrets.push_back(Secret(i));
  registry_.Replace(MakeKeys(secrets));
  std::map<uint64_t, int> count;
  // Uneven batch sizes must not bias the sequence.
  for (uint32_t batch : {1u, 3u, 5u, 64u, 2u, 13u, 100u}) {
    for (uint64_t id : Ids(registry_.Lease(batch))) ++count[id];
  }
  // 188 assignments over 7 keys: 26 or 27 each.
  int total = 0;
  for (const auto& [id, n] : count) {
    EXPECT_GE(n, 188 / 7);
    EXPECT_LE(n, 188 / 7 + 1);
    total += n;
  }
  EXPECT_EQ(total, 188);
  EXPECT_THAT(count, SizeIs(7));
}

TEST_F(KeyRegistryTest, LeaseCoversOnlyActiveKeys) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t c = IdOf(registry_, Secret(3));
  ASSERT_TRUE(
      registry_.SetState(b, v1::KEY_STATE_COOLING, "429", clock_.Now() + absl::Seconds(30)));
  std::vector<uint64_t> ids = Ids(registry_.Lease(6));
  EXPECT_THAT(ids, SizeIs(6));
  EXPECT_EQ(std::count(ids.begin(), ids.end(), a), 3);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), c), 3);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), b), 0);

  // Back to ACTIVE: eligible again.
  ASSERT_TRUE(registry_.SetState(b, v1::KEY_STATE_ACTIVE, "", absl::InfinitePast()));
  ids = Ids(registry_.Lease(3));
  EXPECT_THAT(ids, UnorderedElementsAre(a, b, c));
}

TEST_F(KeyRegistryTest, LeaseIsEmptyWhenNoKeyIsActive) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  ASSERT_TRUE(registry_.SetState(IdOf(registry_, Secret(1)), v1::KEY_STATE_INVALID, "401",
                                 absl::InfinitePast()));
  ASSERT_TRUE(registry_.SetState(IdOf(registry_, Secret(2)), v1::KEY_STATE_DEPLETED, "403",
                                 absl::InfinitePast()));
  v1::LeaseResponse lease = registry_.Lease(10);
  EXPECT_THAT(lease.key_ids(), IsEmpty());
  EXPECT_EQ(lease.snapshot_version(), registry_.version());
}

TEST_F(KeyRegistryTest, LeasedTotalCountsAssignments) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  registry_.Lease(5);
  registry_.Lease(7);
  v1::GetStatsResponse stats;
  registry_.FillStats(&stats);
  EXPECT_EQ(stats.leased_total(), 12u);
  EXPECT_EQ(stats.total_keys(), 2u);
  EXPECT_EQ(stats.active_keys(), 2u);
  EXPECT_EQ(stats.snapshot_version(), registry_.version());
}

TEST_F(KeyRegistryTest, ConcurrentLeasesStayEven) {
  std::vector<std::string> secrets;
  for (int i = 0; i < 5; ++i) secrets.push_back(Secret(i));
  registry_.Replace(MakeKeys(secrets));
  std::vector<std::map<uint64_t, int>> counts(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([this, t, &counts] {
      for (int i = 0; i < 500; ++i) {
        for (uint64_t id : Ids(registry_.Lease(5))) ++counts[t][id];
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::map<uint64_t, int> total;
  for (const auto& m : counts) {
    for (const auto& [id, n] : m) total[id] += n;
  }
  ASSERT_THAT(total, SizeIs(5));
  for (const auto& [id, n] : total) EXPECT_EQ(n, 2000) << "id " << id;
}

// ---------------------------------------------------------------------------------------------
// ApplyReport (usage)

TEST_F(KeyRegistryTest, ApplyReportSumsUsageAndIgnoresUnknownIds) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const absl::Time t1 = clock_.Now() + absl::Seconds(10);
  const absl::Time t0 = clock_.Now() + absl::Seconds(5);

  v1::ReportRequest r1;
  *r1.add_usage() = Usage(a, 2, 10, 20, t1);
  *r1.add_usage() = Usage(9999, 100, 100, 100, t1);  // unknown: ignored
  registry_.ApplyReport(r1);
  v1::ReportRequest r2;  // another replica, with an older last_used
  *r2.add_usage() = Usage(a, 3, 1, 2, t0);
  *r2.add_usage() = Usage(b, 1, 0, 0);
  registry_.ApplyReport(r2);

  std::vector<v1::KeyStatus> list = registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED);
  const v1::KeyStatus* ka = StatusOf(list, a);
  const v1::KeyStatus* kb = StatusOf(list, b);
  ASSERT_TRUE(ka && kb);
  EXPECT_EQ(ka->request_count(), 5u);
  EXPECT_EQ(ka->prompt_tokens(), 11u);
  EXPECT_EQ(ka->completion_tokens(), 22u);
  EXPECT_EQ(FromProtoTime(ka->last_used()), t1) << "last_used is the latest, not the last";
  EXPECT_EQ(kb->request_count(), 1u);
  EXPECT_FALSE(kb->has_last_used());

  v1::GetStatsResponse stats;
  registry_.FillStats(&stats);
  EXPECT_EQ(stats.total_requests(), 6u) << "the unknown id's 100 requests are not counted";
}

TEST_F(KeyRegistryTest, ApplyReportIgnoresRetiredKeys) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t retired = IdOf(registry_, Secret(2));
  registry_.Replace(MakeKeys({Secret(1)}));
  v1::ReportRequest r;
  *r.add_usage() = Usage(retired, 7, 7, 7);
  registry_.ApplyReport(r);
  v1::GetStatsResponse stats;
  registry_.FillStats(&stats);
  EXPECT_EQ(stats.total_requests(), 0u);
}

// ---------------------------------------------------------------------------------------------
// SetState

TEST_F(KeyRegistryTest, SetStateUnknownIdIsFalseAndChangesNothing) {
  registry_.Replace(MakeKeys({Secret(1)}));
  uint64_t v = registry_.version();
  EXPECT_FALSE(registry_.SetState(424242, v1::KEY_STATE_DISABLED, "x", absl::InfinitePast()));
  EXPECT_EQ(registry_.version(), v);
}

TEST_F(KeyRegistryTest, SetStateBumpsVersionOnlyWhenSomethingChanged) {
  registry_.Replace(MakeKeys({Secret(1)}));
  const uint64_t id = IdOf(registry_, Secret(1));
  uint64_t v = registry_.version();
  clock_.Advance(absl::Seconds(3));
  const absl::Time until = clock_.Now() + absl::Seconds(60);
  ASSERT_TRUE(registry_.SetState(id, v1::KEY_STATE_COOLING, "rate limited", until));
  EXPECT_EQ(registry_.version(), v + 1);

  std::vector<v1::KeyStatus> list = registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED);
  ASSERT_THAT(list, SizeIs(1));
  EXPECT_EQ(list[0].state(), v1::KEY_STATE_COOLING);
  EXPECT_EQ(list[0].state_reason(), "rate limited");
  EXPECT_EQ(FromProtoTime(list[0].state_since()), clock_.Now());
  EXPECT_EQ(FromProtoTime(list[0].state_until()), until);

  // The same state, reason and end again: no new version.
  EXPECT_TRUE(registry_.SetState(id, v1::KEY_STATE_COOLING, "rate limited", until));
  EXPECT_EQ(registry_.version(), v + 1);
  // A longer cooldown is a change.
  EXPECT_TRUE(
      registry_.SetState(id, v1::KEY_STATE_COOLING, "rate limited", until + absl::Seconds(30)));
  EXPECT_EQ(registry_.version(), v + 2);
}

// ---------------------------------------------------------------------------------------------
// BuildSnapshot / BuildUpdate / WaitForChange

TEST_F(KeyRegistryTest, SnapshotHoldsEverythingADataplaneNeeds) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}, {{Secret(2), "acct"}}));
  const uint64_t id2 = IdOf(registry_, Secret(2));
  const absl::Time until = clock_.Now() + absl::Seconds(9);
  ASSERT_TRUE(registry_.SetState(id2, v1::KEY_STATE_COOLING, "429", until));
  v1::Snapshot s = registry_.BuildSnapshot();
  EXPECT_EQ(s.version(), registry_.version());
  EXPECT_FALSE(s.epoch().empty());
  ASSERT_THAT(s.keys(), SizeIs(2));
  EXPECT_TRUE(s.keys(0).secret() == Secret(1));
  EXPECT_EQ(s.keys(0).fingerprint(), KeyFingerprint(Secret(1)));
  EXPECT_EQ(s.keys(0).account(), KeyFingerprint(Secret(1)));
  EXPECT_EQ(s.keys(0).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(s.keys(0).index(), 0u);
  EXPECT_FALSE(s.keys(0).has_state_until());
  EXPECT_TRUE(s.keys(1).secret() == Secret(2));
  EXPECT_EQ(s.keys(1).id(), id2);
  EXPECT_EQ(s.keys(1).account(), "acct");
  EXPECT_EQ(s.keys(1).state(), v1::KEY_STATE_COOLING);
  EXPECT_EQ(s.keys(1).index(), 1u);
  EXPECT_EQ(FromProtoTime(s.keys(1).state_until()), until);
}

TEST_F(KeyRegistryTest, EpochIsStablePerRegistryAndDiffersBetweenRegistries) {
  FakeClock other_clock;
  KeyRegistry other(&other_clock);
  EXPECT_EQ(registry_.BuildSnapshot().epoch(), registry_.BuildSnapshot().epoch());
  EXPECT_NE(registry_.BuildSnapshot().epoch(), other.BuildSnapshot().epoch());
}

TEST_F(KeyRegistryTest, BuildUpdateIsFalseWhenCurrent) {
  registry_.Replace(MakeKeys({Secret(1)}));
  v1::WatchResponse out;
  out.mutable_sent_at()->set_seconds(77);  // must stay untouched
  EXPECT_FALSE(registry_.BuildUpdate(registry_.version(), &out));
  EXPECT_FALSE(out.has_snapshot());
  EXPECT_FALSE(out.has_delta());
  EXPECT_EQ(out.sent_at().seconds(), 77);
}

TEST_F(KeyRegistryTest, BuildUpdateSendsADeltaForStateChanges) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t known = registry_.version();
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t c = IdOf(registry_, Secret(3));
  ASSERT_TRUE(registry_.SetState(a, v1::KEY_STATE_COOLING, "429", clock_.Now() + absl::Seconds(5)));
  ASSERT_TRUE(registry_.SetState(c, v1::KEY_STATE_DISABLED, "op", absl::InfinitePast()));
  ASSERT_TRUE(registry_.SetState(a, v1::KEY_STATE_ACTIVE, "", absl::InfinitePast()));

  v1::WatchResponse out;
  ASSERT_TRUE(registry_.BuildUpdate(known, &out));
  ASSERT_TRUE(out.has_delta()) << "state changes only: a delta, not a snapshot";
  const v1::SnapshotDelta& d = out.delta();
  EXPECT_EQ(d.from_version(), known);
  EXPECT_EQ(d.version(), registry_.version());
  EXPECT_THAT(d.removed_ids(), IsEmpty());
  ASSERT_THAT(d.upserted(), SizeIs(2)) << "a key changed twice appears once";
  std::map<uint64_t, v1::UpstreamKey> by_id;
  for (const v1::UpstreamKey& k : d.upserted()) by_id[k.id()] = k;
  ASSERT_EQ(by_id.count(a), 1u);
  ASSERT_EQ(by_id.count(c), 1u);
  EXPECT_EQ(by_id[a].state(), v1::KEY_STATE_ACTIVE) << "the latest state";
  EXPECT_TRUE(by_id[a].secret() == Secret(1)) << "whole records";
  EXPECT_EQ(by_id[c].state(), v1::KEY_STATE_DISABLED);

  // From the middle of the history: only what changed since.
  v1::WatchResponse later;
  ASSERT_TRUE(registry_.BuildUpdate(registry_.version() - 1, &later));
  ASSERT_TRUE(later.has_delta());
  ASSERT_THAT(later.delta().upserted(), SizeIs(1));
  EXPECT_EQ(later.delta().upserted(0).id(), a);
}

TEST_F(KeyRegistryTest, BuildUpdateSendsASnapshotAcrossAReplace) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t known = registry_.version();
  ASSERT_TRUE(registry_.SetState(IdOf(registry_, Secret(1)), v1::KEY_STATE_DISABLED, "op",
                                 absl::InfinitePast()));
  registry_.Replace(MakeKeys({Secret(1), Secret(3)}));
  ASSERT_TRUE(registry_.SetState(IdOf(registry_, Secret(3)), v1::KEY_STATE_DISABLED, "op",
                                 absl::InfinitePast()));

  v1::WatchResponse out;
  ASSERT_TRUE(registry_.BuildUpdate(known, &out));
  ASSERT_TRUE(out.has_snapshot());
  EXPECT_EQ(out.snapshot().version(), registry_.version());
  ASSERT_THAT(out.snapshot().keys(), SizeIs(2));
  EXPECT_EQ(out.snapshot().keys(1).state(), v1::KEY_STATE_DISABLED);
}

TEST_F(KeyRegistryTest, BuildUpdateSendsASnapshotForUnknownVersions) {
  registry_.Replace(MakeKeys({Secret(1)}));
  v1::WatchResponse from_zero;
  ASSERT_TRUE(registry_.BuildUpdate(0, &from_zero));
  EXPECT_TRUE(from_zero.has_snapshot());
  // A version from the future (another epoch): the full state.
  v1::WatchResponse from_future;
  ASSERT_TRUE(registry_.BuildUpdate(registry_.version() + 1000, &from_future));
  EXPECT_TRUE(from_future.has_snapshot());
}

TEST_F(KeyRegistryTest, BuildUpdateSendsASnapshotWhenHistoryIsNoLongerRetained) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t after_replace = registry_.version();
  const uint64_t id = IdOf(registry_, Secret(1));
  // Far more state changes than any sensible history keeps (the registry keeps 4096).
  const int kChanges = 5000;
  for (int i = 0; i < kChanges; ++i) {
    ASSERT_TRUE(registry_.SetState(id, i % 2 == 0 ? v1::KEY_STATE_DISABLED : v1::KEY_STATE_ACTIVE,
                                   "", absl::InfinitePast()));
  }
  ASSERT_EQ(registry_.version(), after_replace + kChanges);
  v1::WatchResponse old;
  ASSERT_TRUE(registry_.BuildUpdate(after_replace + 1, &old));
  EXPECT_TRUE(old.has_snapshot()) << "history since then is gone: a snapshot";
  // A recent version is still served as a delta.
  v1::WatchResponse recent;
  ASSERT_TRUE(registry_.BuildUpdate(registry_.version() - 10, &recent));
  ASSERT_TRUE(recent.has_delta());
  EXPECT_EQ(recent.delta().from_version(), registry_.version() - 10);
}

TEST_F(KeyRegistryTest, WaitForChangeTimesOutWithoutAChange) {
  registry_.Replace(MakeKeys({Secret(1)}));
  absl::Time start = absl::Now();
  registry_.WaitForChange(registry_.version(), absl::Milliseconds(100));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(95));
}

TEST_F(KeyRegistryTest, WaitForChangeReturnsAtOnceWhenAlreadyBehind) {
  registry_.Replace(MakeKeys({Secret(1)}));
  absl::Time start = absl::Now();
  registry_.WaitForChange(registry_.version() - 1, absl::Seconds(10));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST_F(KeyRegistryTest, WaitForChangeWakesOnAChange) {
  registry_.Replace(MakeKeys({Secret(1)}));
  const uint64_t known = registry_.version();
  const uint64_t id = IdOf(registry_, Secret(1));
  std::atomic<bool> returned{false};
  absl::Duration waited;
  std::thread waiter([&] {
    absl::Time start = absl::Now();
    registry_.WaitForChange(known, absl::Seconds(10));
    waited = absl::Now() - start;
    returned = true;
  });
  EXPECT_FALSE(returned.load()) << "must not return before the change";
  ASSERT_TRUE(registry_.SetState(id, v1::KEY_STATE_DISABLED, "op", absl::InfinitePast()));
  waiter.join();
  EXPECT_LT(waited, absl::Seconds(5)) << "woken by the change, not the timeout";
}

// ---------------------------------------------------------------------------------------------
// Operator views

TEST_F(KeyRegistryTest, ListKeysAndStatsNeverContainSecrets) {
  // Short keys too: their masks show less, but must never show all of it.
  std::vector<std::string> secrets = {Secret(1), Secret(2), "sk-16bytes-abcde", "12345678",
                                      "short"};
  registry_.Replace(MakeKeys(secrets, {{Secret(2), "team-a"}}));
  ASSERT_TRUE(registry_.SetState(IdOf(registry_, Secret(1)), v1::KEY_STATE_COOLING, "429 body",
                                 clock_.Now() + absl::Seconds(1)));
  v1::ReportRequest r;
  *r.add_usage() = Usage(IdOf(registry_, "12345678"), 1, 2, 3, clock_.Now());
  registry_.ApplyReport(r);

  std::vector<v1::KeyStatus> list = registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED);
  ASSERT_THAT(list, SizeIs(secrets.size()));
  for (const v1::KeyStatus& k : list) ExpectNoSecrets(k, secrets);
  for (size_t i = 0; i < list.size(); ++i) {
    EXPECT_EQ(list[i].fingerprint(), KeyFingerprint(secrets[i]));
    EXPECT_EQ(list[i].masked(), MaskKey(secrets[i]));
    EXPECT_EQ(list[i].index(), i);
  }
  v1::GetStatsResponse stats;
  registry_.FillStats(&stats);
  ASSERT_THAT(stats.keys(), SizeIs(secrets.size()));
  ExpectNoSecrets(stats, secrets);
}

TEST_F(KeyRegistryTest, ListKeysFiltersByState) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t b = IdOf(registry_, Secret(2));
  ASSERT_TRUE(registry_.SetState(b, v1::KEY_STATE_DISABLED, "op", absl::InfinitePast()));
  std::vector<v1::KeyStatus> disabled = registry_.ListKeys(v1::KEY_STATE_DISABLED);
  ASSERT_THAT(disabled, SizeIs(1));
  EXPECT_EQ(disabled[0].id(), b);
  EXPECT_THAT(registry_.ListKeys(v1::KEY_STATE_ACTIVE), SizeIs(2));
  EXPECT_THAT(registry_.ListKeys(v1::KEY_STATE_INVALID), IsEmpty());
  EXPECT_THAT(registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED), SizeIs(3));
}

// ---------------------------------------------------------------------------------------------
// Resolve

TEST_F(KeyRegistryTest, ResolveByIndexFingerprintAndId) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t c = IdOf(registry_, Secret(3));
  EXPECT_EQ(registry_.Resolve("0").value(), a);
  EXPECT_EQ(registry_.Resolve("2").value(), c);
  const std::string fp = KeyFingerprint(Secret(3));
  EXPECT_EQ(registry_.Resolve(fp).value(), c);
  EXPECT_EQ(registry_.Resolve(fp.substr(0, 6)).value(), c);
  EXPECT_EQ(registry_.Resolve(absl::AsciiStrToUpper(fp.substr(0, 8))).value(), c);
  EXPECT_EQ(registry_.Resolve(absl::StrCat("id:", c)).value(), c);
}

TEST_F(KeyRegistryTest, ResolveNotFound) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t retired = IdOf(registry_, Secret(2));
  registry_.Replace(MakeKeys({Secret(1)}));
  for (const std::string& ref :
       {std::string("1"), std::string("99"), absl::StrCat("id:", retired), std::string("id:0"),
        std::string("id:abc"), std::string("id:"), KeyFingerprint(Secret(2)),
        KeyFingerprint(Secret(1)) + "0", std::string("zzzzzzzz")}) {
    absl::StatusOr<uint64_t> r = registry_.Resolve(ref);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << ref;
  }
}

TEST_F(KeyRegistryTest, ResolveRejectsTooShortReferences) {
  registry_.Replace(MakeKeys({Secret(1)}));
  const std::string fp = KeyFingerprint(Secret(1));
  for (const std::string& ref : {fp.substr(0, 5), std::string(""), std::string("-1")}) {
    // A 5-digit all-decimal prefix would be an index; make sure this one is not all digits.
    if (!ref.empty() && std::all_of(ref.begin(), ref.end(), absl::ascii_isdigit)) continue;
    EXPECT_EQ(registry_.Resolve(ref).status().code(), absl::StatusCode::kInvalidArgument)
        << "'" << ref << "'";
  }
}

// Two keys whose fingerprints share their first 6 hex digits, found by a search that is
// deterministic (SHA-256 is) and short (24 bits: a collision is expected within ~5000 tries).
TEST_F(KeyRegistryTest, ResolveAmbiguousPrefixIsInvalidArgument) {
  std::map<std::string, std::string> by_prefix;
  std::string first, second;
  for (int i = 0; i < 1000000 && second.empty(); ++i) {
    std::string s = absl::StrCat("sk-collide-", i);
    std::string prefix = KeyFingerprint(s).substr(0, 6);
    auto [it, inserted] = by_prefix.emplace(prefix, s);
    if (!inserted) {
      first = it->second;
      second = s;
    }
  }
  ASSERT_FALSE(second.empty());
  registry_.Replace(MakeKeys({Secret(1), first, second}));
  const std::string prefix = KeyFingerprint(first).substr(0, 6);
  absl::StatusOr<uint64_t> r = registry_.Resolve(prefix);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  // The full fingerprints still tell them apart (unless they share 12 digits: they do not).
  ASSERT_NE(KeyFingerprint(first), KeyFingerprint(second));
  EXPECT_EQ(registry_.Resolve(KeyFingerprint(first)).value(), IdOf(registry_, first));
  EXPECT_EQ(registry_.Resolve(KeyFingerprint(second)).value(), IdOf(registry_, second));
}

TEST_F(KeyRegistryTest, ResolveAllDigitFingerprintPrefixOfSixIsAFingerprintNotAnIndex) {
  std::string digits_key;
  for (int i = 0; i < 100000 && digits_key.empty(); ++i) {
    std::string s = absl::StrCat("sk-digits-", i);
    std::string p = KeyFingerprint(s).substr(0, 6);
    if (std::all_of(p.begin(), p.end(), absl::ascii_isdigit)) digits_key = s;
  }
  ASSERT_FALSE(digits_key.empty());
  registry_.Replace(MakeKeys({Secret(1), digits_key}));
  EXPECT_EQ(registry_.Resolve(KeyFingerprint(digits_key).substr(0, 6)).value(),
            IdOf(registry_, digits_key));
}

// ---------------------------------------------------------------------------------------------
// Key health: outcomes, operator actions, Tick, explanations, persistence

constexpr char kTpm429[] = "Request was rejected due to rate limiting. Details: TPM limit reached.";

v1::KeyOutcome Outcome(uint64_t id, v1::OutcomeKind kind, int status, const std::string& model,
                       const std::string& message) {
  v1::KeyOutcome o;
  o.set_key_id(id);
  o.set_kind(kind);
  o.set_http_status(status);
  o.set_model(model);
  o.set_message(message);
  return o;
}

v1::KeyOutcome RateLimitedOutcome(uint64_t id, const std::string& model, absl::Time observed,
                                  absl::optional<absl::Duration> retry_after = absl::nullopt,
                                  const std::string& message = kTpm429) {
  v1::KeyOutcome o = Outcome(id, v1::OUTCOME_KIND_RATE_LIMITED, 429, model, message);
  *o.mutable_observed_at() = ToProtoTime(observed);
  if (retry_after.has_value()) *o.mutable_retry_after() = ToProtoDuration(*retry_after);
  return o;
}

v1::KeyOutcome ProbeSuccess(uint64_t id, const std::string& model, bool probe = true) {
  v1::KeyOutcome o = Outcome(id, v1::OUTCOME_KIND_SUCCESS, 200, model, "");
  o.set_probe(probe);
  return o;
}

v1::ReportRequest Report(const std::string& replica, std::vector<v1::KeyOutcome> outcomes) {
  v1::ReportRequest r;
  r.set_replica_id(replica);
  for (v1::KeyOutcome& o : outcomes) *r.add_outcomes() = std::move(o);
  return r;
}

v1::KeyStatus StatusById(const KeyRegistry& registry, uint64_t id) {
  for (const v1::KeyStatus& k : registry.ListKeys(v1::KEY_STATE_UNSPECIFIED)) {
    if (k.id() == id) return k;
  }
  ADD_FAILURE() << "no key with id " << id;
  return v1::KeyStatus();
}

v1::KeyStatus StatusByFingerprint(const KeyRegistry& registry, const std::string& fingerprint) {
  for (const v1::KeyStatus& k : registry.ListKeys(v1::KEY_STATE_UNSPECIFIED)) {
    if (k.fingerprint() == fingerprint) return k;
  }
  ADD_FAILURE() << "no key with fingerprint " << fingerprint;
  return v1::KeyStatus();
}

std::vector<std::string> Models(const google::protobuf::RepeatedPtrField<std::string>& models) {
  return std::vector<std::string>(models.begin(), models.end());
}

// The delta since `known`; fails the test when the registry answers with a snapshot.
v1::SnapshotDelta DeltaSince(const KeyRegistry& registry, uint64_t known) {
  v1::WatchResponse out;
  EXPECT_TRUE(registry.BuildUpdate(known, &out));
  EXPECT_TRUE(out.has_delta()) << "expected a delta from version " << known;
  return out.delta();
}

TEST_F(KeyRegistryTest, UnauthorizedMakesTheKeyInvalidAndRecordsWhy) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t known = registry_.version();
  const uint64_t generation = registry_.state_generation();
  clock_.Advance(absl::Seconds(7));

  std::vector<KeyRegistry::StateChange> changes = registry_.ApplyReport(
      Report("dp-1", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "m", "Invalid token")}));
  ASSERT_THAT(changes, SizeIs(1));
  EXPECT_EQ(changes[0].fingerprint, KeyFingerprint(Secret(1)));
  EXPECT_EQ(changes[0].from, v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(changes[0].to, v1::KEY_STATE_INVALID);
  EXPECT_THAT(changes[0].reason, ::testing::HasSubstr("401"));
  EXPECT_EQ(changes[0].actor, "dataplane:dp-1");

  v1::KeyStatus s = StatusById(registry_, a);
  EXPECT_EQ(s.state(), v1::KEY_STATE_INVALID);
  EXPECT_EQ(s.state_status(), 401);
  EXPECT_EQ(s.state_message(), "Invalid token");
  EXPECT_EQ(s.state_actor(), "dataplane:dp-1");
  EXPECT_THAT(s.state_reason(), ::testing::HasSubstr("401"));
  EXPECT_EQ(FromProtoTime(s.state_since()), clock_.Now());
  EXPECT_FALSE(s.has_state_until()) << "invalid until an operator acts";

  EXPECT_GT(registry_.state_generation(), generation);
  v1::SnapshotDelta d = DeltaSince(registry_, known);
  ASSERT_THAT(d.upserted(), SizeIs(1));
  EXPECT_EQ(d.upserted(0).id(), a);
  EXPECT_EQ(d.upserted(0).state(), v1::KEY_STATE_INVALID);
  EXPECT_FALSE(d.blocks_changed());
  EXPECT_THAT(Ids(registry_.Lease(4)), ElementsAre(b, b, b, b));

  // The same 401 again (another replica): no change, no new version.
  const uint64_t v = registry_.version();
  const uint64_t g = registry_.state_generation();
  EXPECT_THAT(registry_.ApplyReport(Report(
                  "dp-2", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "m", "Invalid token")})),
              IsEmpty());
  EXPECT_EQ(registry_.version(), v);
  EXPECT_EQ(registry_.state_generation(), g);
}

TEST_F(KeyRegistryTest, ForbiddenWithABalanceMessageDepletesTheKey) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t c = IdOf(registry_, Secret(3));
  std::vector<KeyRegistry::StateChange> changes = registry_.ApplyReport(Report(
      "dp-1", {Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403, "Qwen/Qwen2.5-7B-Instruct",
                       "Sorry, your account balance is insufficient"),
               Outcome(b, v1::OUTCOME_KIND_FORBIDDEN, 403, "m",
                       "\xE8\xB4\xA6\xE6\x88\xB7\xE4\xBD\x99\xE9\xA2\x9D\xE4\xB8\x8D\xE8\xB6\xB3"),
               // No model named: the key itself is refused.
               Outcome(c, v1::OUTCOME_KIND_FORBIDDEN, 403, "", "Forbidden")}));
  ASSERT_THAT(changes, SizeIs(3));
  for (const KeyRegistry::StateChange& change : changes) {
    EXPECT_EQ(change.to, v1::KEY_STATE_DEPLETED) << change.fingerprint;
  }
  v1::KeyStatus s = StatusById(registry_, a);
  EXPECT_EQ(s.state(), v1::KEY_STATE_DEPLETED);
  EXPECT_EQ(s.state_status(), 403);
  EXPECT_EQ(s.state_message(), "Sorry, your account balance is insufficient");
  EXPECT_THAT(s.forbidden_models(), IsEmpty()) << "a balance problem is not about the model";
  EXPECT_EQ(StatusById(registry_, b).state(), v1::KEY_STATE_DEPLETED) << "Chinese message";
  EXPECT_EQ(StatusById(registry_, c).state(), v1::KEY_STATE_DEPLETED);
  EXPECT_THAT(registry_.Lease(3).key_ids(), IsEmpty());
}

TEST_F(KeyRegistryTest, ForbiddenForAModelForbidsOnlyThatModel) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t known = registry_.version();
  const uint64_t generation = registry_.state_generation();
  std::vector<KeyRegistry::StateChange> changes = registry_.ApplyReport(
      Report("dp-1", {Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403, "deepseek-ai/DeepSeek-R1",
                              "This model requires real-name verification")}));
  EXPECT_THAT(changes, IsEmpty()) << "the key's state did not change";
  v1::KeyStatus s = StatusById(registry_, a);
  EXPECT_EQ(s.state(), v1::KEY_STATE_ACTIVE);
  EXPECT_THAT(Models(s.forbidden_models()), ElementsAre("deepseek-ai/DeepSeek-R1"));
  // The state did not change, so the state fields keep describing it; the refusal shows in
  // forbidden_models.
  EXPECT_EQ(s.state_status(), 0);
  EXPECT_EQ(s.state_message(), "");
  EXPECT_GT(registry_.state_generation(), generation);
  // Dataplanes learn it from a delta; the key keeps its turn in the lease.
  v1::SnapshotDelta d = DeltaSince(registry_, known);
  ASSERT_THAT(d.upserted(), SizeIs(1));
  EXPECT_EQ(d.upserted(0).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_THAT(Models(d.upserted(0).forbidden_models()), ElementsAre("deepseek-ai/DeepSeek-R1"));
  EXPECT_THAT(Ids(registry_.Lease(4)), ElementsAre(a, b, a, b));

  // The same model again changes nothing; a second model is added.
  const uint64_t v = registry_.version();
  registry_.ApplyReport(Report("dp-2", {Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403,
                                                "deepseek-ai/DeepSeek-R1", "real-name")}));
  EXPECT_EQ(registry_.version(), v);
  registry_.ApplyReport(
      Report("dp-2", {Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403, "other/model", "real-name")}));
  EXPECT_THAT(Models(StatusById(registry_, a).forbidden_models()),
              ElementsAre("deepseek-ai/DeepSeek-R1", "other/model"));
  EXPECT_EQ(registry_.BuildSnapshot().keys(0).forbidden_models_size(), 2);
}

TEST_F(KeyRegistryTest, DisabledKeysAreNotTurnedInvalidOrDepletedByReports) {
  registry_.Replace(MakeKeys({Secret(1)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  ASSERT_TRUE(
      registry_.ApplyAction(a, v1::KEY_ACTION_DISABLE, absl::ZeroDuration(), "maintenance", "alice")
          .ok());
  const uint64_t v = registry_.version();
  EXPECT_THAT(
      registry_.ApplyReport(Report(
          "dp-1", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "m", "Invalid token"),
                   Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403, "m", "insufficient balance")})),
      IsEmpty());
  v1::KeyStatus s = StatusById(registry_, a);
  EXPECT_EQ(s.state(), v1::KEY_STATE_DISABLED);
  EXPECT_EQ(s.state_reason(), "maintenance");
  EXPECT_EQ(s.state_actor(), "alice");
  EXPECT_EQ(registry_.version(), v);
}

TEST_F(KeyRegistryTest, OtherOutcomesAndRetiredKeysChangeNothing) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t retired = IdOf(registry_, Secret(2));
  registry_.Replace(MakeKeys({Secret(1)}));
  const uint64_t v = registry_.version();
  registry_.ApplyReport(
      Report("dp-1", {Outcome(a, v1::OUTCOME_KIND_UPSTREAM_ERROR, 503, "m", "overloaded"),
                      Outcome(a, v1::OUTCOME_KIND_TRANSPORT_ERROR, 0, "m", "connect refused"),
                      Outcome(a, v1::OUTCOME_KIND_SUCCESS, 200, "m", ""),
                      Outcome(retired, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "m", "Invalid token"),
                      RateLimitedOutcome(retired, "m", clock_.Now())}));
  EXPECT_EQ(registry_.version(), v);
  EXPECT_EQ(StatusById(registry_, a).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_THAT(registry_.Blocks(), IsEmpty());
}

TEST_F(KeyRegistryTest, RateLimitBlocksTheAccountModelScopeInSnapshotAndDelta) {
  registry_.Replace(
      MakeKeys({Secret(1), Secret(2), Secret(3)}, {{Secret(1), "team-a"}, {Secret(2), "team-a"}}));
  const uint64_t a1 = IdOf(registry_, Secret(1));
  const uint64_t a2 = IdOf(registry_, Secret(2));
  const uint64_t known = registry_.version();
  const uint64_t generation = registry_.state_generation();
  // 2026-01-01T00:00:00Z: a TPM limit ends at the next minute boundary plus up to 3 s jitter.
  std::vector<KeyRegistry::StateChange> changes =
      registry_.ApplyReport(Report("dp-1", {RateLimitedOutcome(a1, "m", clock_.Now())}));
  EXPECT_THAT(changes, IsEmpty()) << "a scope block is not a key state change";
  EXPECT_GT(registry_.state_generation(), generation);

  v1::Snapshot snapshot = registry_.BuildSnapshot();
  ASSERT_THAT(snapshot.blocks(), SizeIs(1));
  const v1::ScopeBlock& b = snapshot.blocks(0);
  EXPECT_EQ(b.account(), "team-a");
  EXPECT_EQ(b.model(), "m");
  EXPECT_EQ(b.phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(b.limit(), "TPM");
  EXPECT_EQ(b.reason(), kTpm429);
  EXPECT_EQ(b.strikes(), 1u);
  const absl::Time until = FromProtoTime(b.until());
  EXPECT_GE(until, clock_.Now() + absl::Minutes(1));
  EXPECT_LE(until, clock_.Now() + absl::Minutes(1) + absl::Seconds(3));
  for (const v1::UpstreamKey& k : snapshot.keys()) {
    EXPECT_EQ(k.state(), v1::KEY_STATE_ACTIVE) << "keys stay active: the dataplane skips the scope";
  }

  v1::SnapshotDelta d = DeltaSince(registry_, known);
  EXPECT_TRUE(d.blocks_changed());
  EXPECT_THAT(d.upserted(), IsEmpty());
  ASSERT_THAT(d.blocks(), SizeIs(1));
  EXPECT_EQ(d.blocks(0).account(), "team-a");
  EXPECT_EQ(FromProtoTime(d.blocks(0).until()), until);

  // An echo from another replica changes nothing.
  const uint64_t v = registry_.version();
  registry_.ApplyReport(
      Report("dp-2", {RateLimitedOutcome(a2, "m", clock_.Now() + absl::Milliseconds(20))}));
  EXPECT_EQ(registry_.version(), v);
  ASSERT_THAT(registry_.Blocks(), SizeIs(1));
  EXPECT_EQ(registry_.Blocks()[0].strikes(), 1u);
}

TEST_F(KeyRegistryTest, TickTurnsTheBlockHalfOpenAndAProbeSuccessLiftsIt) {
  registry_.Replace(
      MakeKeys({Secret(1), Secret(2)}, {{Secret(1), "team-a"}, {Secret(2), "team-a"}}));
  const uint64_t a1 = IdOf(registry_, Secret(1));
  const uint64_t a2 = IdOf(registry_, Secret(2));
  registry_.ApplyReport(
      Report("dp-1", {RateLimitedOutcome(a1, "m", clock_.Now(), absl::Seconds(30))}));
  ASSERT_THAT(registry_.Blocks(), SizeIs(1));
  EXPECT_EQ(FromProtoTime(registry_.Blocks()[0].until()), clock_.Now() + absl::Seconds(30));

  clock_.Advance(absl::Seconds(29));
  uint64_t v = registry_.version();
  registry_.Tick({"dp-1", "dp-2"});
  EXPECT_EQ(registry_.version(), v) << "still cooling";

  clock_.Advance(absl::Seconds(1));
  const uint64_t before_open = registry_.version();
  registry_.Tick({"dp-1", "dp-2"});
  ASSERT_GT(registry_.version(), before_open);
  ASSERT_THAT(registry_.Blocks(), SizeIs(1));
  v1::ScopeBlock open = registry_.Blocks()[0];
  EXPECT_EQ(open.phase(), v1::BLOCK_PHASE_HALF_OPEN);
  EXPECT_TRUE(open.probe_replica() == "dp-1" || open.probe_replica() == "dp-2");
  v1::SnapshotDelta d = DeltaSince(registry_, before_open);
  EXPECT_TRUE(d.blocks_changed());
  ASSERT_THAT(d.blocks(), SizeIs(1));
  EXPECT_EQ(d.blocks(0).phase(), v1::BLOCK_PHASE_HALF_OPEN);
  EXPECT_EQ(d.blocks(0).probe_replica(), open.probe_replica());

  // A plain success (not the probe) does not lift it.
  v = registry_.version();
  registry_.ApplyReport(Report(open.probe_replica(), {ProbeSuccess(a2, "m", /*probe=*/false)}));
  EXPECT_EQ(registry_.version(), v);
  ASSERT_THAT(registry_.Blocks(), SizeIs(1));

  // The probe succeeded (on another key of the account): the scope reopens everywhere.
  const uint64_t before_lift = registry_.version();
  EXPECT_THAT(registry_.ApplyReport(Report(open.probe_replica(), {ProbeSuccess(a2, "m")})),
              IsEmpty());
  EXPECT_THAT(registry_.Blocks(), IsEmpty());
  EXPECT_THAT(registry_.BuildSnapshot().blocks(), IsEmpty());
  v1::SnapshotDelta lifted = DeltaSince(registry_, before_lift);
  EXPECT_TRUE(lifted.blocks_changed()) << "an empty block list must still be sent";
  EXPECT_THAT(lifted.blocks(), IsEmpty());
}

TEST_F(KeyRegistryTest, RateLimitOfTheProbeExtendsTheBlockWithAnotherStrike) {
  registry_.Replace(MakeKeys({Secret(1)}, {{Secret(1), "team-a"}}));
  const uint64_t a = IdOf(registry_, Secret(1));
  registry_.ApplyReport(Report(
      "dp-1", {RateLimitedOutcome(a, "m", clock_.Now(), absl::nullopt, "Too many requests")}));
  clock_.Advance(absl::Minutes(2));
  registry_.Tick({"dp-1"});
  ASSERT_EQ(registry_.Blocks()[0].phase(), v1::BLOCK_PHASE_HALF_OPEN);
  registry_.ApplyReport(Report(
      "dp-1", {RateLimitedOutcome(a, "m", clock_.Now(), absl::nullopt, "Too many requests")}));
  v1::ScopeBlock b = registry_.Blocks()[0];
  EXPECT_EQ(b.phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(b.strikes(), 2u);
  // Default 60 s (+ up to 3 s jitter), doubled.
  EXPECT_GE(FromProtoTime(b.until()), clock_.Now() + absl::Seconds(120));
  EXPECT_LE(FromProtoTime(b.until()), clock_.Now() + absl::Seconds(126));
}

TEST_F(KeyRegistryTest, RateLimitsOfMostAccountsMakeAPoolWideBlock) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4)}));
  std::vector<v1::KeyOutcome> outcomes;
  for (int i = 1; i <= 3; ++i) {
    outcomes.push_back(RateLimitedOutcome(IdOf(registry_, Secret(i)), "m", clock_.Now()));
  }
  registry_.ApplyReport(Report("dp-1", outcomes));
  bool pool_wide = false;
  for (const v1::ScopeBlock& b : registry_.Blocks()) {
    if (b.account() == "*" && b.model() == "m") pool_wide = true;
  }
  EXPECT_TRUE(pool_wide) << "3 of 4 accounts within the window";
  // The fourth key's explanation mentions it, though its own account was never limited.
  absl::StatusOr<v1::GetKeyResponse> x = registry_.Explain(IdOf(registry_, Secret(4)));
  ASSERT_TRUE(x.ok());
  ASSERT_THAT(x->blocks(), SizeIs(1));
  EXPECT_THAT(x->explanation(), ::testing::HasSubstr("pool-wide"));
}

TEST_F(KeyRegistryTest, LeaseSkipsInvalidDisabledAndCoolingKeys) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t c = IdOf(registry_, Secret(3));
  const uint64_t d = IdOf(registry_, Secret(4));
  registry_.ApplyReport(
      Report("dp-1", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "", "Invalid token")}));
  ASSERT_TRUE(
      registry_.ApplyAction(b, v1::KEY_ACTION_DISABLE, absl::ZeroDuration(), "", "op").ok());
  ASSERT_TRUE(registry_.ApplyAction(c, v1::KEY_ACTION_COOLDOWN, absl::Minutes(5), "", "op").ok());
  EXPECT_THAT(Ids(registry_.Lease(5)), ElementsAre(d, d, d, d, d));
  v1::GetStatsResponse stats;
  registry_.FillStats(&stats);
  EXPECT_EQ(stats.active_keys(), 1u);
}

TEST_F(KeyRegistryTest, ApplyActionDisableAndEnable) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t known = registry_.version();
  const uint64_t generation = registry_.state_generation();
  clock_.Advance(absl::Seconds(3));

  absl::StatusOr<v1::KeyStatus> disabled =
      registry_.ApplyAction(a, v1::KEY_ACTION_DISABLE, absl::ZeroDuration(), "leaked", "alice");
  ASSERT_TRUE(disabled.ok()) << disabled.status();
  EXPECT_EQ(disabled->id(), a);
  EXPECT_EQ(disabled->state(), v1::KEY_STATE_DISABLED);
  EXPECT_EQ(disabled->state_reason(), "leaked");
  EXPECT_EQ(disabled->state_actor(), "alice");
  EXPECT_EQ(FromProtoTime(disabled->state_since()), clock_.Now());
  EXPECT_GT(registry_.state_generation(), generation);
  EXPECT_THAT(Ids(registry_.Lease(2)), ElementsAre(b, b));
  v1::SnapshotDelta d = DeltaSince(registry_, known);
  ASSERT_THAT(d.upserted(), SizeIs(1));
  EXPECT_EQ(d.upserted(0).state(), v1::KEY_STATE_DISABLED);

  absl::StatusOr<v1::KeyStatus> enabled =
      registry_.ApplyAction(a, v1::KEY_ACTION_ENABLE, absl::ZeroDuration(), "", "bob");
  ASSERT_TRUE(enabled.ok()) << enabled.status();
  EXPECT_EQ(enabled->state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(enabled->state_reason(), "operator") << "the default reason";
  EXPECT_EQ(enabled->state_actor(), "bob");
  EXPECT_THAT(Ids(registry_.Lease(2)), UnorderedElementsAre(a, b));
}

TEST_F(KeyRegistryTest, ApplyActionRejectsUnknownKeysActionsAndDurations) {
  registry_.Replace(MakeKeys({Secret(1)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t v = registry_.version();
  EXPECT_EQ(registry_.ApplyAction(4242, v1::KEY_ACTION_DISABLE, absl::ZeroDuration(), "", "op")
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(registry_.ApplyAction(a, v1::KEY_ACTION_UNSPECIFIED, absl::ZeroDuration(), "", "op")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  for (absl::Duration bad : {absl::ZeroDuration(), absl::Milliseconds(999), absl::Seconds(-5),
                             absl::Hours(24 * 7) + absl::Seconds(1), absl::InfiniteDuration()}) {
    EXPECT_EQ(registry_.ApplyAction(a, v1::KEY_ACTION_COOLDOWN, bad, "", "op").status().code(),
              absl::StatusCode::kInvalidArgument)
        << absl::FormatDuration(bad);
  }
  EXPECT_EQ(registry_.version(), v) << "a rejected action changes nothing";
  EXPECT_EQ(StatusById(registry_, a).state(), v1::KEY_STATE_ACTIVE);
  // The bounds themselves are fine.
  EXPECT_TRUE(registry_.ApplyAction(a, v1::KEY_ACTION_COOLDOWN, absl::Seconds(1), "", "op").ok());
  EXPECT_TRUE(
      registry_.ApplyAction(a, v1::KEY_ACTION_COOLDOWN, absl::Hours(24 * 7), "", "op").ok());
}

TEST_F(KeyRegistryTest, CooldownActionEndsOnTickAfterTheClockPassesIt) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  absl::StatusOr<v1::KeyStatus> cooling =
      registry_.ApplyAction(a, v1::KEY_ACTION_COOLDOWN, absl::Seconds(30), "noisy", "alice");
  ASSERT_TRUE(cooling.ok()) << cooling.status();
  EXPECT_EQ(cooling->state(), v1::KEY_STATE_COOLING);
  EXPECT_EQ(FromProtoTime(cooling->state_until()), clock_.Now() + absl::Seconds(30));
  EXPECT_EQ(FromProtoTime(registry_.BuildSnapshot().keys(0).state_until()),
            clock_.Now() + absl::Seconds(30));
  EXPECT_THAT(Ids(registry_.Lease(2)), ElementsAre(b, b));

  clock_.Advance(absl::Seconds(29));
  uint64_t v = registry_.version();
  registry_.Tick({});
  EXPECT_EQ(StatusById(registry_, a).state(), v1::KEY_STATE_COOLING);
  EXPECT_EQ(registry_.version(), v);

  clock_.Advance(absl::Seconds(1));
  const uint64_t generation = registry_.state_generation();
  registry_.Tick({});
  v1::KeyStatus s = StatusById(registry_, a);
  EXPECT_EQ(s.state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(s.state_reason(), "cooldown ended");
  EXPECT_FALSE(s.has_state_until());
  EXPECT_GT(registry_.state_generation(), generation);
  v1::SnapshotDelta d = DeltaSince(registry_, v);
  ASSERT_THAT(d.upserted(), SizeIs(1));
  EXPECT_EQ(d.upserted(0).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_THAT(Ids(registry_.Lease(2)), UnorderedElementsAre(a, b));
}

TEST_F(KeyRegistryTest, EnableClearsForbiddenModelsAndTheAccountsBlocks) {
  registry_.Replace(
      MakeKeys({Secret(1), Secret(2)}, {{Secret(1), "team-a"}, {Secret(2), "team-b"}}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  registry_.ApplyReport(Report(
      "dp-1",
      {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "", "Invalid token"),
       Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403, "m1", "real-name verification"),
       RateLimitedOutcome(a, "m2", clock_.Now()), RateLimitedOutcome(b, "m2", clock_.Now())}));
  ASSERT_EQ(StatusById(registry_, a).state(), v1::KEY_STATE_INVALID);
  ASSERT_THAT(registry_.Blocks(), SizeIs(2));
  const uint64_t known = registry_.version();

  absl::StatusOr<v1::KeyStatus> enabled =
      registry_.ApplyAction(a, v1::KEY_ACTION_ENABLE, absl::ZeroDuration(), "fixed", "alice");
  ASSERT_TRUE(enabled.ok()) << enabled.status();
  EXPECT_EQ(enabled->state(), v1::KEY_STATE_ACTIVE);
  EXPECT_THAT(enabled->forbidden_models(), IsEmpty());
  std::vector<v1::ScopeBlock> blocks = registry_.Blocks();
  ASSERT_THAT(blocks, SizeIs(1)) << "team-b's block is not the operator's business here";
  EXPECT_EQ(blocks[0].account(), "team-b");

  v1::SnapshotDelta d = DeltaSince(registry_, known);
  EXPECT_TRUE(d.blocks_changed());
  ASSERT_THAT(d.blocks(), SizeIs(1));
  ASSERT_THAT(d.upserted(), SizeIs(1));
  EXPECT_EQ(d.upserted(0).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_THAT(d.upserted(0).forbidden_models(), IsEmpty());
}

TEST_F(KeyRegistryTest, ReloadRetriesInvalidAndDepletedKeysButKeepsDisabledAndCooling) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4), Secret(5)}));
  const uint64_t invalid = IdOf(registry_, Secret(1));
  const uint64_t depleted = IdOf(registry_, Secret(2));
  const uint64_t disabled = IdOf(registry_, Secret(3));
  const uint64_t forbidden = IdOf(registry_, Secret(4));
  const uint64_t cooling = IdOf(registry_, Secret(5));
  registry_.ApplyReport(
      Report("dp-1",
             {Outcome(invalid, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "", "Invalid token"),
              Outcome(depleted, v1::OUTCOME_KIND_FORBIDDEN, 403, "m", "insufficient balance"),
              Outcome(forbidden, v1::OUTCOME_KIND_FORBIDDEN, 403, "m", "real-name verification")}));
  ASSERT_TRUE(
      registry_.ApplyAction(disabled, v1::KEY_ACTION_DISABLE, absl::ZeroDuration(), "", "op").ok());
  ASSERT_TRUE(
      registry_.ApplyAction(cooling, v1::KEY_ACTION_COOLDOWN, absl::Hours(1), "", "op").ok());

  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4), Secret(5)}));
  v1::KeyStatus s1 = StatusById(registry_, invalid);
  EXPECT_EQ(s1.state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(s1.state_reason(), "reloaded");
  EXPECT_EQ(s1.state_actor(), "reload");
  EXPECT_EQ(s1.state_message(), "") << "the old upstream message no longer applies";
  EXPECT_EQ(StatusById(registry_, depleted).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(StatusById(registry_, disabled).state(), v1::KEY_STATE_DISABLED);
  EXPECT_EQ(StatusById(registry_, cooling).state(), v1::KEY_STATE_COOLING);
  EXPECT_THAT(StatusById(registry_, forbidden).forbidden_models(), IsEmpty());
  EXPECT_THAT(Ids(registry_.Lease(3)), ElementsAre(invalid, depleted, forbidden));
}

TEST_F(KeyRegistryTest, ExplainSaysWhyAKeyIsOrIsNotUsed) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4)},
                             {{Secret(1), "team-a"}, {Secret(4), "team-a"}}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t c = IdOf(registry_, Secret(3));
  const uint64_t d = IdOf(registry_, Secret(4));
  EXPECT_EQ(registry_.Explain(4242).status().code(), absl::StatusCode::kNotFound);

  absl::StatusOr<v1::GetKeyResponse> fine = registry_.Explain(b);
  ASSERT_TRUE(fine.ok());
  EXPECT_THAT(fine->explanation(), ::testing::HasSubstr("Active"));
  EXPECT_EQ(fine->key().id(), b);
  EXPECT_THAT(fine->blocks(), IsEmpty());

  registry_.ApplyReport(Report(
      "dp-1", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "", "Invalid API key given"),
               Outcome(a, v1::OUTCOME_KIND_FORBIDDEN, 403, "vision/model", "real-name required"),
               RateLimitedOutcome(d, "chat/model", clock_.Now())}));
  absl::StatusOr<v1::GetKeyResponse> invalid = registry_.Explain(a);
  ASSERT_TRUE(invalid.ok());
  const std::string& text = invalid->explanation();
  EXPECT_THAT(text, ::testing::HasSubstr("Invalid"));
  EXPECT_THAT(text, ::testing::HasSubstr("401"));
  EXPECT_THAT(text, ::testing::HasSubstr("Invalid API key given")) << "the upstream message";
  EXPECT_THAT(text, ::testing::HasSubstr("vision/model"));
  EXPECT_THAT(text, ::testing::HasSubstr("chat/model")) << "its account's block";
  EXPECT_THAT(text, ::testing::HasSubstr("TPM"));
  EXPECT_THAT(text, ::testing::HasSubstr("cooling until"));
  ASSERT_THAT(invalid->blocks(), SizeIs(1));
  EXPECT_EQ(invalid->blocks(0).account(), "team-a");
  EXPECT_EQ(invalid->key().state(), v1::KEY_STATE_INVALID);
  EXPECT_THAT(registry_.Explain(b)->blocks(), IsEmpty()) << "another account's block";

  // Half-open: names the probe replica.
  clock_.Advance(absl::Minutes(2));
  registry_.Tick({"dp-7"});
  EXPECT_THAT(registry_.Explain(d)->explanation(),
              ::testing::HasSubstr("half-open, probe by dp-7"));

  ASSERT_TRUE(
      registry_.ApplyAction(b, v1::KEY_ACTION_DISABLE, absl::ZeroDuration(), "leaked", "alice")
          .ok());
  std::string disabled = registry_.Explain(b)->explanation();
  EXPECT_THAT(disabled, ::testing::HasSubstr("Disabled"));
  EXPECT_THAT(disabled, ::testing::HasSubstr("alice"));
  EXPECT_THAT(disabled, ::testing::HasSubstr("leaked"));

  ASSERT_TRUE(
      registry_.ApplyAction(c, v1::KEY_ACTION_COOLDOWN, absl::Seconds(90), "noisy", "bob").ok());
  std::string cooling = registry_.Explain(c)->explanation();
  EXPECT_THAT(cooling, ::testing::HasSubstr("Cooling until"));
  EXPECT_THAT(cooling, ::testing::HasSubstr("1m30s left"));
  EXPECT_THAT(cooling, ::testing::HasSubstr("noisy"));

  registry_.ApplyReport(
      Report("dp-1", {Outcome(c, v1::OUTCOME_KIND_FORBIDDEN, 403, "", "Insufficient balance")}));
  std::string depleted = registry_.Explain(c)->explanation();
  EXPECT_THAT(depleted, ::testing::HasSubstr("Depleted"));
  EXPECT_THAT(depleted, ::testing::HasSubstr("Insufficient balance"));
}

TEST_F(KeyRegistryTest, ExportAndImportStateRestoreStatesCountersAndBlocksByFingerprint) {
  registry_.Replace(
      MakeKeys({Secret(1), Secret(2), Secret(3), Secret(4)}, {{Secret(4), "team-d"}}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  const uint64_t c = IdOf(registry_, Secret(3));
  const uint64_t d = IdOf(registry_, Secret(4));
  v1::ReportRequest usage =
      Report("dp-1", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "", "Invalid token"),
                      Outcome(b, v1::OUTCOME_KIND_FORBIDDEN, 403, "m1", "real-name verification"),
                      RateLimitedOutcome(d, "m2", clock_.Now(), absl::Minutes(10))});
  *usage.add_usage() = Usage(b, 12, 340, 560, clock_.Now());
  registry_.ApplyReport(usage);
  ASSERT_TRUE(
      registry_.ApplyAction(c, v1::KEY_ACTION_COOLDOWN, absl::Minutes(5), "noisy", "alice").ok());
  const nlohmann::json saved = nlohmann::json::parse(registry_.ExportState().dump());
  const std::vector<v1::KeyStatus> before = registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED);
  const std::vector<v1::ScopeBlock> blocks_before = registry_.Blocks();
  ASSERT_THAT(blocks_before, SizeIs(1));

  // A restarted controlplane: the same keys in another order plus a new one, new ids.
  clock_.Advance(absl::Seconds(20));
  KeyRegistry restored(&clock_);
  restored.Replace(
      MakeKeys({Secret(9), Secret(4), Secret(3), Secret(2), Secret(1)}, {{Secret(4), "team-d"}}));
  const uint64_t known = restored.version();
  restored.ImportState(saved);
  for (const v1::KeyStatus& old : before) {
    v1::KeyStatus now = StatusByFingerprint(restored, old.fingerprint());
    EXPECT_EQ(now.state(), old.state()) << old.fingerprint();
    EXPECT_EQ(now.state_reason(), old.state_reason()) << old.fingerprint();
    EXPECT_EQ(FromProtoTime(now.state_since()), FromProtoTime(old.state_since()));
    EXPECT_EQ(now.has_state_until(), old.has_state_until());
    EXPECT_EQ(FromProtoTime(now.state_until()), FromProtoTime(old.state_until()));
    EXPECT_EQ(now.state_status(), old.state_status());
    EXPECT_EQ(now.state_message(), old.state_message());
    EXPECT_EQ(now.state_actor(), old.state_actor());
    EXPECT_EQ(Models(now.forbidden_models()), Models(old.forbidden_models()));
    EXPECT_EQ(now.request_count(), old.request_count());
    EXPECT_EQ(now.prompt_tokens(), old.prompt_tokens());
    EXPECT_EQ(now.completion_tokens(), old.completion_tokens());
    EXPECT_EQ(now.has_last_used(), old.has_last_used());
    EXPECT_EQ(FromProtoTime(now.last_used()), FromProtoTime(old.last_used()));
  }
  v1::KeyStatus fresh = StatusByFingerprint(restored, KeyFingerprint(Secret(9)));
  EXPECT_EQ(fresh.state(), v1::KEY_STATE_ACTIVE) << "a key not in the state file starts active";
  EXPECT_EQ(fresh.request_count(), 0u);

  std::vector<v1::ScopeBlock> blocks_after = restored.Blocks();
  ASSERT_THAT(blocks_after, SizeIs(1));
  EXPECT_EQ(blocks_after[0].account(), "team-d");
  EXPECT_EQ(blocks_after[0].model(), "m2");
  EXPECT_EQ(blocks_after[0].phase(), v1::BLOCK_PHASE_COOLING);
  EXPECT_EQ(FromProtoTime(blocks_after[0].until()), FromProtoTime(blocks_before[0].until()));
  EXPECT_EQ(blocks_after[0].strikes(), blocks_before[0].strikes());
  EXPECT_EQ(blocks_after[0].limit(), blocks_before[0].limit());

  // Dataplanes get it all as a snapshot, and the lease follows the restored states.
  v1::WatchResponse update;
  ASSERT_TRUE(restored.BuildUpdate(known, &update));
  EXPECT_TRUE(update.has_snapshot());
  EXPECT_THAT(update.snapshot().blocks(), SizeIs(1));
  const uint64_t b2 = IdOf(restored, Secret(2));
  const uint64_t d2 = IdOf(restored, Secret(4));
  const uint64_t n2 = IdOf(restored, Secret(9));
  EXPECT_THAT(Ids(restored.Lease(3)), ElementsAre(n2, d2, b2));

  // The restored cooldown still ends on time.
  clock_.Advance(absl::Minutes(5));
  restored.Tick({});
  EXPECT_EQ(StatusByFingerprint(restored, KeyFingerprint(Secret(3))).state(), v1::KEY_STATE_ACTIVE);
}

TEST_F(KeyRegistryTest, ImportStateIgnoresUnknownFingerprintsAndMalformedInput) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}));
  const std::string fp1 = KeyFingerprint(Secret(1));
  nlohmann::json state = nlohmann::json::parse(R"({"version": 1, "blocks": "not an array",
      "keys": {"0123456789ab": {"state": "KEY_STATE_DISABLED", "request_count": 99}}})");
  state["keys"][fp1] = {{"state", "KEY_STATE_NO_SUCH_STATE"}, {"request_count", 5}};
  state["keys"][KeyFingerprint(Secret(2))] = "not an object";
  registry_.ImportState(state);
  EXPECT_EQ(registry_.size(), 2u);
  for (const v1::KeyStatus& k : registry_.ListKeys(v1::KEY_STATE_UNSPECIFIED)) {
    EXPECT_EQ(k.state(), v1::KEY_STATE_ACTIVE) << k.fingerprint();
  }
  EXPECT_EQ(StatusByFingerprint(registry_, fp1).request_count(), 5u);
  EXPECT_THAT(registry_.Blocks(), IsEmpty());

  for (const char* text : {"null", "[]", "\"garbage\"", "42", "{}", "{\"keys\": 5}",
                           "{\"keys\": [], \"blocks\": {}}"}) {
    registry_.ImportState(nlohmann::json::parse(text));
    EXPECT_EQ(registry_.size(), 2u) << text;
    EXPECT_EQ(StatusByFingerprint(registry_, fp1).state(), v1::KEY_STATE_ACTIVE) << text;
    EXPECT_EQ(StatusByFingerprint(registry_, fp1).request_count(), 5u) << text;
  }
}

// controlplane_server.cc calls ImportState on whatever JSON the state file holds, without a
// try/catch, and says "a damaged state file must not keep the pool down". A key entry with a
// field of the wrong JSON type makes nlohmann::json::value() throw type_error instead of the
// entry (or field) being ignored: the controlplane would die at start-up on that file.
TEST_F(KeyRegistryTest, ImportStateSurvivesWronglyTypedFields) {
  registry_.Replace(MakeKeys({Secret(1)}));
  const std::string fp = KeyFingerprint(Secret(1));
  for (const char* entry : {R"({"state": "KEY_STATE_INVALID", "status": "401"})", R"({"state": 3})",
                            R"({"state": "KEY_STATE_ACTIVE", "request_count": "many"})",
                            R"({"state": "KEY_STATE_ACTIVE", "reason": null})"}) {
    nlohmann::json state = nlohmann::json::object();
    state["keys"][fp] = nlohmann::json::parse(entry);
    EXPECT_NO_THROW(registry_.ImportState(state)) << entry;
  }
  nlohmann::json bad_block = nlohmann::json::parse(
      R"({"blocks": [{"account": "a", "model": "m", "until_unix_ms": "later"}]})");
  EXPECT_NO_THROW(registry_.ImportState(bad_block));
}

TEST_F(KeyRegistryTest, StateGenerationBumpsOnStateChangesOnly) {
  registry_.Replace(MakeKeys({Secret(1), Secret(2)}, {{Secret(2), "team-b"}}));
  const uint64_t a = IdOf(registry_, Secret(1));
  const uint64_t b = IdOf(registry_, Secret(2));
  uint64_t g = registry_.state_generation();

  v1::ReportRequest usage_only;
  *usage_only.add_usage() = Usage(a, 1, 1, 1, clock_.Now());
  registry_.ApplyReport(usage_only);
  EXPECT_EQ(registry_.state_generation(), g) << "counters alone are saved with the next change";
  registry_.Tick({"dp-1"});
  EXPECT_EQ(registry_.state_generation(), g) << "an idle Tick";

  registry_.ApplyReport(
      Report("dp-1", {Outcome(a, v1::OUTCOME_KIND_UNAUTHORIZED, 401, "", "Invalid token")}));
  EXPECT_GT(registry_.state_generation(), g);
  g = registry_.state_generation();

  registry_.ApplyReport(
      Report("dp-1", {RateLimitedOutcome(b, "m", clock_.Now(), absl::Seconds(10))}));
  EXPECT_GT(registry_.state_generation(), g);
  g = registry_.state_generation();

  clock_.Advance(absl::Seconds(10));
  registry_.Tick({"dp-1"});  // the block turns half-open
  EXPECT_GT(registry_.state_generation(), g);
  g = registry_.state_generation();

  ASSERT_TRUE(registry_.ApplyAction(a, v1::KEY_ACTION_ENABLE, absl::ZeroDuration(), "", "op").ok());
  EXPECT_GT(registry_.state_generation(), g);
  g = registry_.state_generation();

  ASSERT_TRUE(registry_.SetState(a, v1::KEY_STATE_DISABLED, "x", absl::InfinitePast()));
  EXPECT_GT(registry_.state_generation(), g);
}

}  // namespace
}  // namespace sflb
