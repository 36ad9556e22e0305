// Tests of controlplane/key_registry: the key set, its round robin, states, counters, version
// history and operator views.
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
#include "common/key_format.h"
#include "common/time_format.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "gtest/gtest.h"
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

}  // namespace
}  // namespace sflb
