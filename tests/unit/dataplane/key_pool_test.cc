// Tests of dataplane/key_pool: snapshot/delta handling, lease consumption, the local
// round-robin fallback, the lease-refill signal and key health (forbidden models, scope
// blocks, half-open probes, local blocks, avoid_accounts, Peek).
#include "dataplane/key_pool.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/time_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

using ::testing::ElementsAre;
using ::testing::SizeIs;

struct K {
  uint64_t id;
  v1::KeyState state = v1::KEY_STATE_ACTIVE;
};

v1::UpstreamKey MakeKey(uint64_t id, v1::KeyState state, uint32_t index) {
  v1::UpstreamKey k;
  k.set_id(id);
  k.set_secret(absl::StrCat("sk-pooltest-secret-", id));
  k.set_fingerprint(absl::StrCat("fp", id));
  k.set_account(absl::StrCat("acct", id));
  k.set_state(state);
  k.set_index(index);
  return k;
}

v1::Snapshot MakeSnapshot(uint64_t version, const std::string& epoch, std::vector<K> keys) {
  v1::Snapshot s;
  s.set_version(version);
  s.set_epoch(epoch);
  uint32_t index = 0;
  for (const K& k : keys) *s.add_keys() = MakeKey(k.id, k.state, index++);
  return s;
}

v1::LeaseResponse MakeLease(std::vector<uint64_t> ids) {
  v1::LeaseResponse lease;
  for (uint64_t id : ids) lease.add_key_ids(id);
  return lease;
}

// A pick that excludes `ids` (keys the request already tried).
PickResult PickExcluding(KeyPool& pool, std::vector<uint64_t> ids) {
  PickRequest request;
  request.exclude = std::move(ids);
  return pool.Pick(request);
}

// Picks `n` times and returns the ids (0 for a failed pick).
std::vector<uint64_t> PickIds(KeyPool& pool, int n, const std::vector<uint64_t>& exclude = {}) {
  std::vector<uint64_t> out;
  for (int i = 0; i < n; ++i) {
    PickResult r = PickExcluding(pool, exclude);
    out.push_back(r.key ? r.key->id : 0);
  }
  return out;
}

KeyPool::Options SmallBatches() {
  KeyPool::Options o;
  o.min_lease = 8;
  o.max_lease = 8;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Failures

TEST(KeyPoolTest, PickBeforeSnapshotIsNoSnapshot) {
  KeyPool pool;
  pool.AddLease(MakeLease({1, 2}));
  PickResult r = pool.Pick();
  EXPECT_EQ(r.key, nullptr);
  EXPECT_EQ(r.failure, PickFailure::kNoSnapshot);
  EXPECT_FALSE(pool.has_snapshot());
  EXPECT_EQ(pool.version(), 0u);
  EXPECT_EQ(pool.key_count(), 0u);
}

TEST(KeyPoolTest, EmptyKeySetIsNoKeys) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(3, "e1", {}));
  PickResult r = pool.Pick();
  EXPECT_EQ(r.key, nullptr);
  EXPECT_EQ(r.failure, PickFailure::kNoKeys);
  EXPECT_TRUE(pool.has_snapshot());
  EXPECT_EQ(pool.version(), 3u);
}

TEST(KeyPoolTest, NoActiveKeyIsNoneEligible) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1",
                                  {{1, v1::KEY_STATE_COOLING},
                                   {2, v1::KEY_STATE_INVALID},
                                   {3, v1::KEY_STATE_DEPLETED},
                                   {4, v1::KEY_STATE_DISABLED}}));
  pool.AddLease(MakeLease({1, 2, 3, 4}));
  PickResult r = pool.Pick();
  EXPECT_EQ(r.key, nullptr);
  EXPECT_EQ(r.failure, PickFailure::kNoneEligible);
  EXPECT_EQ(pool.eligible_count(), 0u);
  EXPECT_EQ(pool.key_count(), 4u);
}

// ---------------------------------------------------------------------------------------------
// Lease consumption

TEST(KeyPoolTest, FollowsTheLeaseOrderExactly) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}, {3}, {4}, {5}}));
  pool.AddLease(MakeLease({3, 1, 2, 2, 5}));
  pool.AddLease(MakeLease({4, 3}));
  EXPECT_EQ(pool.leased_remaining(), 7u);
  std::vector<uint64_t> got;
  for (int i = 0; i < 7; ++i) {
    PickResult r = pool.Pick();
    ASSERT_NE(r.key, nullptr);
    EXPECT_TRUE(r.from_lease) << i;
    EXPECT_EQ(r.failure, PickFailure::kNone);
    got.push_back(r.key->id);
  }
  EXPECT_THAT(got, ElementsAre(3, 1, 2, 2, 5, 4, 3));
  EXPECT_EQ(pool.leased_remaining(), 0u);
  PickResult fallback = pool.Pick();
  ASSERT_NE(fallback.key, nullptr);
  EXPECT_FALSE(fallback.from_lease);
}

TEST(KeyPoolTest, PickedKeyCarriesTheSnapshotRecord) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{7}, {9}}));
  pool.AddLease(MakeLease({9}));
  PickResult r = pool.Pick();
  ASSERT_NE(r.key, nullptr);
  EXPECT_EQ(r.key->id, 9u);
  EXPECT_TRUE(r.key->secret == "sk-pooltest-secret-9");
  EXPECT_EQ(r.key->fingerprint, "fp9");
  EXPECT_EQ(r.key->account, "acct9");
  EXPECT_EQ(r.key->state, v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(r.key->index, 1u);
}

TEST(KeyPoolTest, LeasedIdsOfRemovedOrInactiveKeysAreSkipped) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2, v1::KEY_STATE_COOLING}, {3}}));
  pool.AddLease(MakeLease({99, 2, 3, 2, 1, 42}));
  PickResult a = pool.Pick();
  ASSERT_NE(a.key, nullptr);
  EXPECT_EQ(a.key->id, 3u);
  EXPECT_TRUE(a.from_lease);
  PickResult b = pool.Pick();
  ASSERT_NE(b.key, nullptr);
  EXPECT_EQ(b.key->id, 1u);
  EXPECT_TRUE(b.from_lease);
  // Only the unknown 42 was left: skipped, then the fallback.
  PickResult c = pool.Pick();
  ASSERT_NE(c.key, nullptr);
  EXPECT_FALSE(c.from_lease);
  EXPECT_NE(c.key->id, 2u);
  EXPECT_EQ(pool.leased_remaining(), 0u);
}

TEST(KeyPoolTest, LeaseEntriesOfKeysRemovedByALaterDeltaAreSkipped) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}, {3}}));
  pool.AddLease(MakeLease({2, 3, 1}));
  v1::SnapshotDelta d;
  d.set_from_version(1);
  d.set_version(2);
  d.add_removed_ids(2);
  *d.add_upserted() = MakeKey(3, v1::KEY_STATE_DISABLED, 2);
  ASSERT_TRUE(pool.ApplyDelta(d));
  PickResult r = pool.Pick();
  ASSERT_NE(r.key, nullptr);
  EXPECT_EQ(r.key->id, 1u);
  EXPECT_TRUE(r.from_lease);
}

TEST(KeyPoolTest, ExcludeIsHonouredForLeaseAndFallback) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}, {3}}));
  pool.AddLease(MakeLease({1, 2}));
  PickResult r = PickExcluding(pool, {1});
  ASSERT_NE(r.key, nullptr);
  EXPECT_EQ(r.key->id, 2u);
  EXPECT_TRUE(r.from_lease);

  // Fallback: only 3 is allowed, every time.
  for (uint64_t id : PickIds(pool, 10, {1, 2})) EXPECT_EQ(id, 3u);

  PickResult none = PickExcluding(pool, {1, 2, 3});
  EXPECT_EQ(none.key, nullptr);
  EXPECT_EQ(none.failure, PickFailure::kNoneEligible);
}

TEST(KeyPoolTest, ClearLeaseDropsAssignments) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}}));
  pool.AddLease(MakeLease({2, 2, 2}));
  pool.ClearLease();
  EXPECT_EQ(pool.leased_remaining(), 0u);
  EXPECT_FALSE(pool.Pick().from_lease);
}

// ---------------------------------------------------------------------------------------------
// Local fallback

TEST(KeyPoolTest, FallbackRoundRobinCoversEligibleKeysEvenly) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(
      1, "e1",
      {{10}, {11, v1::KEY_STATE_DISABLED}, {12}, {13}, {14, v1::KEY_STATE_COOLING}, {15}, {16}}));
  EXPECT_EQ(pool.eligible_count(), 5u);
  std::map<uint64_t, int> count;
  for (uint64_t id : PickIds(pool, 5000)) ++count[id];
  EXPECT_THAT(count, SizeIs(5));
  for (uint64_t id : {10u, 12u, 13u, 15u, 16u}) EXPECT_EQ(count[id], 1000) << id;
  EXPECT_EQ(count.count(11), 0u);
  EXPECT_EQ(count.count(14), 0u);
  EXPECT_EQ(count.count(0), 0u) << "no failed pick";
}

TEST(KeyPoolTest, FallbackConsecutivePicksAreDistinctWithinALap) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}, {3}, {4}}));
  std::vector<uint64_t> ids = PickIds(pool, 4);
  std::sort(ids.begin(), ids.end());
  EXPECT_THAT(ids, ElementsAre(1, 2, 3, 4));
}

// ---------------------------------------------------------------------------------------------
// Snapshots and deltas

TEST(KeyPoolTest, DeltaWithWrongFromVersionChangesNothing) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(5, "e1", {{1}, {2}}));
  v1::SnapshotDelta d;
  d.set_from_version(4);
  d.set_version(6);
  d.add_removed_ids(1);
  *d.add_upserted() = MakeKey(2, v1::KEY_STATE_DISABLED, 1);
  EXPECT_FALSE(pool.ApplyDelta(d));
  EXPECT_EQ(pool.version(), 5u);
  EXPECT_EQ(pool.key_count(), 2u);
  EXPECT_EQ(pool.eligible_count(), 2u);
  auto keys = pool.keys();
  ASSERT_THAT(*keys, SizeIs(2));
  EXPECT_EQ((*keys)[1]->state, v1::KEY_STATE_ACTIVE);

  d.set_from_version(6);  // ahead of us: also wrong
  EXPECT_FALSE(pool.ApplyDelta(d));
  EXPECT_EQ(pool.version(), 5u);
}

TEST(KeyPoolTest, DeltaBeforeAnySnapshotIsRejected) {
  KeyPool pool;
  v1::SnapshotDelta d;
  d.set_from_version(0);
  d.set_version(1);
  *d.add_upserted() = MakeKey(1, v1::KEY_STATE_ACTIVE, 0);
  EXPECT_FALSE(pool.ApplyDelta(d));
  EXPECT_FALSE(pool.has_snapshot());
}

TEST(KeyPoolTest, DeltaUpdatesRemovesAndAddsKeys) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(5, "e1", {{1}, {2}, {3}}));
  v1::SnapshotDelta d;
  d.set_from_version(5);
  d.set_version(8);
  d.add_removed_ids(1);
  *d.add_upserted() = MakeKey(3, v1::KEY_STATE_COOLING, 2);
  *d.add_upserted() = MakeKey(4, v1::KEY_STATE_ACTIVE, 3);
  ASSERT_TRUE(pool.ApplyDelta(d));
  EXPECT_EQ(pool.version(), 8u);
  EXPECT_EQ(pool.epoch(), "e1");
  auto keys = pool.keys();
  ASSERT_THAT(*keys, SizeIs(3));
  EXPECT_EQ((*keys)[0]->id, 2u);
  EXPECT_EQ((*keys)[1]->id, 3u);
  EXPECT_EQ((*keys)[1]->state, v1::KEY_STATE_COOLING);
  EXPECT_EQ((*keys)[2]->id, 4u);
  EXPECT_EQ(pool.eligible_count(), 2u);
  std::map<uint64_t, int> count;
  for (uint64_t id : PickIds(pool, 100)) ++count[id];
  EXPECT_EQ(count[2], 50);
  EXPECT_EQ(count[4], 50);
}

TEST(KeyPoolTest, SnapshotOfANewEpochClearsTheLease) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(5, "e1", {{1}, {2}}));
  pool.AddLease(MakeLease({1, 2, 1}));
  // Same epoch, newer version: the lease stays.
  pool.ApplySnapshot(MakeSnapshot(6, "e1", {{1}, {2}}));
  EXPECT_EQ(pool.leased_remaining(), 3u);
  // A restarted controlplane: versions start over and the lease is void.
  pool.ApplySnapshot(MakeSnapshot(2, "e2", {{1}, {2}}));
  EXPECT_EQ(pool.leased_remaining(), 0u);
  EXPECT_EQ(pool.epoch(), "e2");
  EXPECT_EQ(pool.version(), 2u);
  EXPECT_FALSE(pool.Pick().from_lease);
}

TEST(KeyPoolTest, KeysHeldByARequestOutliveAReload) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}}));
  PickResult r = pool.Pick();
  ASSERT_NE(r.key, nullptr);
  auto old_keys = pool.keys();
  pool.ApplySnapshot(MakeSnapshot(2, "e1", {{2}}));
  EXPECT_EQ(r.key->id, 1u);
  EXPECT_TRUE(r.key->secret == "sk-pooltest-secret-1");
  ASSERT_THAT(*old_keys, SizeIs(1));
  EXPECT_EQ((*old_keys)[0]->id, 1u);
  ASSERT_THAT(*pool.keys(), SizeIs(1));
  EXPECT_EQ((*pool.keys())[0]->id, 2u);
  EXPECT_EQ(pool.Pick().key->id, 2u);
}

// ---------------------------------------------------------------------------------------------
// WaitForLeaseNeed

TEST(KeyPoolTest, WaitForLeaseNeedReturnsABatchWhenEmpty) {
  KeyPool pool(SmallBatches());
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}}));
  absl::Time start = absl::Now();
  EXPECT_EQ(pool.WaitForLeaseNeed(absl::Seconds(10)), 8u);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(KeyPoolTest, WaitForLeaseNeedTimesOutWhenFull) {
  KeyPool pool(SmallBatches());
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}}));
  pool.AddLease(MakeLease({1, 2, 1, 2, 1, 2, 1, 2}));
  absl::Time start = absl::Now();
  EXPECT_EQ(pool.WaitForLeaseNeed(absl::Milliseconds(100)), 0u);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(95));
}

TEST(KeyPoolTest, WaitForLeaseNeedTimesOutWithoutSnapshotOrEligibleKey) {
  KeyPool pool(SmallBatches());
  EXPECT_EQ(pool.WaitForLeaseNeed(absl::Milliseconds(30)), 0u) << "no snapshot yet";
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1, v1::KEY_STATE_DISABLED}}));
  EXPECT_EQ(pool.WaitForLeaseNeed(absl::Milliseconds(30)), 0u) << "nothing to lease";
}

TEST(KeyPoolTest, WaitForLeaseNeedWakesWhenPicksDrainTheLease) {
  KeyPool pool(SmallBatches());
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}}));
  pool.AddLease(MakeLease({1, 2, 1, 2, 1, 2, 1, 2}));
  std::atomic<uint32_t> result{12345};
  absl::Duration waited;
  std::thread waiter([&] {
    absl::Time start = absl::Now();
    result = pool.WaitForLeaseNeed(absl::Seconds(10));
    waited = absl::Now() - start;
  });
  // 8 -> 3 remaining: below half of the batch of 8.
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(pool.Pick().from_lease);
  waiter.join();
  EXPECT_EQ(result.load(), 8u);
  EXPECT_LT(waited, absl::Seconds(5)) << "woken by the picks, not the timeout";
}

// ---------------------------------------------------------------------------------------------
// Concurrency

TEST(KeyPoolTest, ConcurrentPicksHandOutEveryLeasedIdExactlyOnce) {
  KeyPool pool;
  std::vector<K> keys;
  for (uint64_t id = 1; id <= 8; ++id) keys.push_back({id});
  pool.ApplySnapshot(MakeSnapshot(1, "e1", keys));

  constexpr int kBatches = 200;
  constexpr int kBatchSize = 50;
  std::map<uint64_t, int> leased;
  std::vector<v1::LeaseResponse> batches;
  for (int b = 0; b < kBatches; ++b) {
    std::vector<uint64_t> ids;
    for (int i = 0; i < kBatchSize; ++i) {
      uint64_t id = 1 + static_cast<uint64_t>((b * 31 + i * i * 7 + i) % 8);
      ids.push_back(id);
      ++leased[id];
    }
    batches.push_back(MakeLease(ids));
  }

  std::atomic<bool> all_added{false};
  constexpr int kThreads = 8;
  std::vector<std::map<uint64_t, int>> from_lease(kThreads);
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> pickers;
  for (int t = 0; t < kThreads; ++t) {
    pickers.emplace_back([&, t] {
      const absl::Time deadline = absl::Now() + absl::Seconds(20);
      for (;;) {
        // Read "done" before picking: once it is set and the lease is empty, nothing more
        // can arrive.
        bool done = all_added.load();
        PickResult r = pool.Pick();
        if (r.key == nullptr) {
          ++failures[t];
        } else if (r.from_lease) {
          ++from_lease[t][r.key->id];
        }
        if (done && pool.leased_remaining() == 0) break;
        if (absl::Now() > deadline) break;
      }
    });
  }
  std::thread adder([&] {
    for (const v1::LeaseResponse& b : batches) pool.AddLease(b);
    all_added = true;
  });
  adder.join();
  for (std::thread& t : pickers) t.join();

  std::map<uint64_t, int> total;
  int handed_out = 0;
  for (const auto& m : from_lease) {
    for (const auto& [id, n] : m) {
      total[id] += n;
      handed_out += n;
    }
  }
  EXPECT_EQ(handed_out, kBatches * kBatchSize);
  EXPECT_EQ(total, leased) << "every leased id is handed out exactly once";
  for (int f : failures) EXPECT_EQ(f, 0);
  EXPECT_EQ(pool.leased_remaining(), 0u);
}

TEST(KeyPoolTest, ConcurrentPicksDuringSnapshotsAndDeltasAreSafe) {
  KeyPool pool;
  pool.ApplySnapshot(MakeSnapshot(1, "e1", {{1}, {2}, {3}}));
  std::atomic<bool> stop{false};
  std::atomic<int> picked{0};
  std::vector<std::thread> pickers;
  for (int t = 0; t < 4; ++t) {
    pickers.emplace_back([&] {
      while (!stop.load()) {
        PickResult r = PickExcluding(pool, {2});
        if (r.key != nullptr) {
          EXPECT_NE(r.key->id, 2u);
          ++picked;
        }
      }
    });
  }
  uint64_t version = 1;
  // At least 300 updates, and on until the pickers (which a busy machine may start late) have
  // picked plenty while updates were going on.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  for (int i = 0; i < 300 || (picked.load() < 2000 && absl::Now() < deadline); ++i) {
    v1::SnapshotDelta d;
    d.set_from_version(version);
    d.set_version(version + 1);
    *d.add_upserted() = MakeKey(3, i % 2 == 0 ? v1::KEY_STATE_COOLING : v1::KEY_STATE_ACTIVE, 2);
    if (!pool.ApplyDelta(d)) {
      ADD_FAILURE() << "delta " << version << " rejected";
      break;
    }
    ++version;
    if (i % 50 == 0) {
      pool.ApplySnapshot(MakeSnapshot(++version, "e1", {{1}, {2}, {3}}));
      pool.AddLease(MakeLease({1, 2, 3, 1, 2, 3}));
    }
  }
  stop = true;
  for (std::thread& t : pickers) t.join();
  EXPECT_GE(picked.load(), 2000);
  EXPECT_EQ(pool.version(), version);
}

// ---------------------------------------------------------------------------------------------
// Key health: forbidden models, scope blocks, half-open probes, local blocks
//
// KeyPool reads absl::Now() itself (no clock seam), so these tests use block ends well in the
// future or in the past relative to the real clock and never wait for one to pass. The end of
// a local block's 5 s overlap while connected is therefore not tested here (it would take a
// real 5 s wait).

// A time `d` from the real now, rounded to whole milliseconds so that it survives the
// protobuf Timestamp round trip exactly.
absl::Time In(absl::Duration d) {
  return absl::FromUnixMillis(absl::ToUnixMillis(absl::Now() + d));
}

struct HK {
  uint64_t id;
  std::string account;
  std::vector<std::string> forbidden_models = {};
  v1::KeyState state = v1::KEY_STATE_ACTIVE;
  absl::Time state_until = absl::InfinitePast();
};

v1::ScopeBlock MakeBlock(const std::string& account, const std::string& model, v1::BlockPhase phase,
                         absl::Time until, const std::string& probe_replica = "") {
  v1::ScopeBlock b;
  b.set_account(account);
  b.set_model(model);
  b.set_phase(phase);
  *b.mutable_until() = ToProtoTime(until);
  b.set_probe_replica(probe_replica);
  b.set_strikes(1);
  return b;
}

v1::Snapshot HealthSnapshot(uint64_t version, const std::vector<HK>& keys,
                            const std::vector<v1::ScopeBlock>& blocks = {}) {
  v1::Snapshot s;
  s.set_version(version);
  s.set_epoch("e1");
  uint32_t index = 0;
  for (const HK& k : keys) {
    v1::UpstreamKey* key = s.add_keys();
    *key = MakeKey(k.id, k.state, index++);
    key->set_account(k.account);
    for (const std::string& m : k.forbidden_models) key->add_forbidden_models(m);
    if (k.state_until != absl::InfinitePast())
      *key->mutable_state_until() = ToProtoTime(k.state_until);
  }
  for (const v1::ScopeBlock& b : blocks) *s.add_blocks() = b;
  return s;
}

PickRequest ForModel(const std::string& model, std::vector<uint64_t> exclude = {},
                     std::vector<std::string> avoid_accounts = {}) {
  PickRequest r;
  r.model = model;
  r.exclude = std::move(exclude);
  r.avoid_accounts = std::move(avoid_accounts);
  return r;
}

// The ids `n` picks for `request` return (0 for a failed pick).
std::set<uint64_t> PickedIds(KeyPool& pool, const PickRequest& request, int n) {
  std::set<uint64_t> out;
  for (int i = 0; i < n; ++i) {
    PickResult r = pool.Pick(request);
    out.insert(r.key ? r.key->id : 0);
  }
  return out;
}

TEST(KeyPoolHealthTest, ForbiddenModelIsSkippedOnlyForThatModel) {
  KeyPool pool;
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A", {"vision/m1"}}, {2, "B"}}));
  EXPECT_EQ(PickedIds(pool, ForModel("vision/m1"), 10), (std::set<uint64_t>{2}));
  EXPECT_EQ(PickedIds(pool, ForModel("chat/m2"), 10), (std::set<uint64_t>{1, 2}));
  EXPECT_EQ(PickedIds(pool, ForModel(""), 10), (std::set<uint64_t>{1, 2}));
  // A leased entry for the forbidden key is passed over for that request.
  pool.AddLease(MakeLease({1, 2}));
  PickResult r = pool.Pick(ForModel("vision/m1"));
  ASSERT_NE(r.key, nullptr);
  EXPECT_EQ(r.key->id, 2u);
  EXPECT_TRUE(r.from_lease);

  // Nothing else: no key, and not because of a rate limit.
  PickResult none = pool.Pick(ForModel("vision/m1", {2}));
  EXPECT_EQ(none.key, nullptr);
  EXPECT_EQ(none.failure, PickFailure::kNoneEligible);
  EXPECT_FALSE(none.rate_limited);
}

TEST(KeyPoolHealthTest, CoolingBlockExcludesEveryKeyOfTheAccountForThatModelOnly) {
  KeyPool pool;
  const absl::Time until = In(absl::Seconds(60));
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A"}, {2, "A"}, {3, "B"}},
                                    {MakeBlock("A", "m", v1::BLOCK_PHASE_COOLING, until)}));
  EXPECT_EQ(PickedIds(pool, ForModel("m"), 12), (std::set<uint64_t>{3}));
  EXPECT_EQ(PickedIds(pool, ForModel("other"), 12), (std::set<uint64_t>{1, 2, 3}));
  // Leased entries of the blocked account are dropped for this request.
  pool.AddLease(MakeLease({1, 2, 3}));
  PickResult leased = pool.Pick(ForModel("m"));
  ASSERT_NE(leased.key, nullptr);
  EXPECT_EQ(leased.key->id, 3u);
  EXPECT_TRUE(leased.from_lease);
  EXPECT_EQ(pool.leased_remaining(), 0u);

  PickResult none = pool.Pick(ForModel("m", {3}));
  EXPECT_EQ(none.key, nullptr);
  EXPECT_EQ(none.failure, PickFailure::kNoneEligible);
  EXPECT_TRUE(none.rate_limited);
  EXPECT_EQ(none.retry_at, until);
}

TEST(KeyPoolHealthTest, AccountBlockForEveryModelExcludesTheAccount) {
  KeyPool pool;
  pool.ApplySnapshot(
      HealthSnapshot(1, {{1, "A"}, {2, "B"}},
                     {MakeBlock("A", "*", v1::BLOCK_PHASE_COOLING, In(absl::Minutes(1)))}));
  EXPECT_EQ(PickedIds(pool, ForModel("m"), 6), (std::set<uint64_t>{2}));
  EXPECT_EQ(PickedIds(pool, ForModel("other"), 6), (std::set<uint64_t>{2}));
}

TEST(KeyPoolHealthTest, PoolWideBlockExcludesEveryKeyForTheModelAndReportsRateLimited) {
  KeyPool pool;
  const absl::Time until = In(absl::Seconds(45));
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A"}, {2, "B"}, {3, "C"}},
                                    {MakeBlock("*", "m", v1::BLOCK_PHASE_COOLING, until)}));
  pool.AddLease(MakeLease({1, 2}));
  PickResult r = pool.Pick(ForModel("m"));
  EXPECT_EQ(r.key, nullptr);
  EXPECT_EQ(r.failure, PickFailure::kNoneEligible);
  EXPECT_TRUE(r.rate_limited);
  EXPECT_EQ(r.retry_at, until);
  EXPECT_EQ(PickedIds(pool, ForModel("other"), 9), (std::set<uint64_t>{1, 2, 3}));
}

TEST(KeyPoolHealthTest, RetryAtIsTheEarliestReopeningAmongBlockedKeys) {
  KeyPool pool;
  const absl::Time soon = In(absl::Seconds(30));
  pool.ApplySnapshot(
      HealthSnapshot(1, {{1, "A"}, {2, "B"}, {3, "C"}, {4, "D", {"m"}}},
                     {MakeBlock("A", "m", v1::BLOCK_PHASE_COOLING, In(absl::Seconds(90))),
                      MakeBlock("B", "m", v1::BLOCK_PHASE_COOLING, soon),
                      MakeBlock("C", "m", v1::BLOCK_PHASE_COOLING, In(absl::Seconds(60)))}));
  PickResult r = pool.Pick(ForModel("m"));
  EXPECT_EQ(r.key, nullptr);
  EXPECT_TRUE(r.rate_limited) << "key 4 is unusable for m, the others are rate limited";
  EXPECT_EQ(r.retry_at, soon);
}

TEST(KeyPoolHealthTest, DeltaReplacesBlocksOnlyWhenTheyChanged) {
  KeyPool pool;
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}}, {MakeBlock("A", "m", v1::BLOCK_PHASE_COOLING, In(absl::Minutes(1)))}));
  v1::SnapshotDelta keys_only;
  keys_only.set_from_version(1);
  keys_only.set_version(2);
  ASSERT_TRUE(pool.ApplyDelta(keys_only));
  EXPECT_TRUE(pool.Pick(ForModel("m")).rate_limited) << "blocks unchanged";
  v1::SnapshotDelta lifted;
  lifted.set_from_version(2);
  lifted.set_version(3);
  lifted.set_blocks_changed(true);  // and no blocks: all lifted
  ASSERT_TRUE(pool.ApplyDelta(lifted));
  PickResult r = pool.Pick(ForModel("m"));
  ASSERT_NE(r.key, nullptr);
  EXPECT_EQ(r.key->id, 1u);
  v1::SnapshotDelta blocked;
  blocked.set_from_version(3);
  blocked.set_version(4);
  blocked.set_blocks_changed(true);
  *blocked.add_blocks() = MakeBlock("A", "m", v1::BLOCK_PHASE_COOLING, In(absl::Minutes(1)));
  ASSERT_TRUE(pool.ApplyDelta(blocked));
  EXPECT_EQ(pool.Pick(ForModel("m")).key, nullptr);
}

TEST(KeyPoolHealthTest, HalfOpenScopeIsNeverPickedByAReplicaThatIsNotTheProbe) {
  KeyPool pool;
  pool.SetReplicaId("dp-1");
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "A"}, {3, "B"}},
      {MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-2")}));
  EXPECT_EQ(PickedIds(pool, ForModel("m"), 10), (std::set<uint64_t>{3}));
  const absl::Time before = absl::Now();
  PickResult r = pool.Pick(ForModel("m", {3}));
  const absl::Time after = absl::Now();
  EXPECT_EQ(r.key, nullptr);
  EXPECT_FALSE(r.probe);
  EXPECT_TRUE(r.rate_limited);
  EXPECT_GE(r.retry_at, before + absl::Seconds(1));
  EXPECT_LE(r.retry_at, after + absl::Seconds(1));
}

TEST(KeyPoolHealthTest, HalfOpenScopeWithoutANamedProbeIsClosedToEveryone) {
  KeyPool pool;  // no replica id set: "" must not match an empty probe_replica
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}}, {MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)))}));
  EXPECT_EQ(pool.Pick(ForModel("m")).key, nullptr);
}

TEST(KeyPoolHealthTest, EndedCoolingAwaitsTheControlplanesProbeAssignment) {
  // The cooldown is over but the controlplane has not named a probe yet: nobody stampedes.
  KeyPool pool;
  pool.SetReplicaId("dp-1");
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "A"}},
      {MakeBlock("A", "m", v1::BLOCK_PHASE_COOLING, In(-absl::Seconds(2)), "dp-1")}));
  PickResult r = pool.Pick(ForModel("m"));
  EXPECT_EQ(r.key, nullptr);
  EXPECT_TRUE(r.rate_limited);
  EXPECT_GT(r.retry_at, absl::Now());
}

TEST(KeyPoolHealthTest, TheProbeReplicaGetsExactlyOneProbeUntilProbeDone) {
  KeyPool pool;
  pool.SetReplicaId("dp-2");
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "A"}, {3, "B"}},
      {MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-2")}));
  PickResult probe = pool.Pick(ForModel("m", {3}));
  ASSERT_NE(probe.key, nullptr);
  EXPECT_EQ(probe.key->account, "A");
  EXPECT_TRUE(probe.probe);

  // While the probe is out, the scope stays closed, also on this replica.
  for (int i = 0; i < 5; ++i) {
    PickResult again = pool.Pick(ForModel("m", {3}));
    EXPECT_EQ(again.key, nullptr) << i;
    EXPECT_TRUE(again.rate_limited);
  }
  for (int i = 0; i < 5; ++i) {
    PickResult other = pool.Pick(ForModel("m"));
    ASSERT_NE(other.key, nullptr);
    EXPECT_EQ(other.key->id, 3u) << "other accounts carry the model meanwhile";
    EXPECT_FALSE(other.probe);
  }
  PickResult other_model = pool.Pick(ForModel("other", {3}));
  ASSERT_NE(other_model.key, nullptr);
  EXPECT_FALSE(other_model.probe) << "the block is for model m only";

  // The probe finished (the controlplane has not answered yet): one more probe may go.
  pool.ProbeDone("A", "m");
  PickResult next = pool.Pick(ForModel("m", {3}));
  ASSERT_NE(next.key, nullptr);
  EXPECT_TRUE(next.probe);
  EXPECT_EQ(pool.Pick(ForModel("m", {3})).key, nullptr);
}

TEST(KeyPoolHealthTest, AProbeMayComeFromTheLease) {
  KeyPool pool;
  pool.SetReplicaId("dp-2");
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "B"}},
      {MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-2")}));
  pool.AddLease(MakeLease({1, 1, 2}));
  PickResult probe = pool.Pick(ForModel("m"));
  ASSERT_NE(probe.key, nullptr);
  EXPECT_EQ(probe.key->id, 1u);
  EXPECT_TRUE(probe.from_lease);
  EXPECT_TRUE(probe.probe);
  PickResult next = pool.Pick(ForModel("m"));
  ASSERT_NE(next.key, nullptr);
  EXPECT_EQ(next.key->id, 2u) << "the second leased 1 is dropped: its probe is out";
  EXPECT_FALSE(next.probe);
}

TEST(KeyPoolHealthTest, PoolWideHalfOpenBlockGetsOneProbeOnAnyAccount) {
  KeyPool pool;
  pool.SetReplicaId("dp-1");
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "B"}},
      {MakeBlock("*", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-1")}));
  PickResult probe = pool.Pick(ForModel("m"));
  ASSERT_NE(probe.key, nullptr);
  EXPECT_TRUE(probe.probe);
  EXPECT_EQ(pool.Pick(ForModel("m")).key, nullptr) << "no account while the pool probe is out";
  pool.ProbeDone(probe.key->account, "m");
  EXPECT_TRUE(pool.Pick(ForModel("m")).probe);
}

TEST(KeyPoolHealthTest, PeekConsumesNoLeaseAndStartsNoProbe) {
  KeyPool pool;
  pool.SetReplicaId("dp-1");
  pool.ApplySnapshot(
      HealthSnapshot(1, {{1, "A"}, {2, "B"}, {3, "C"}},
                     {MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-1"),
                      MakeBlock("B", "m", v1::BLOCK_PHASE_COOLING, In(absl::Seconds(20)))}));
  pool.AddLease(MakeLease({3, 2, 1}));
  for (int i = 0; i < 3; ++i) {
    PickResult peek = pool.Peek(ForModel("other"));
    ASSERT_NE(peek.key, nullptr);
    EXPECT_FALSE(peek.from_lease);
  }
  EXPECT_EQ(pool.leased_remaining(), 3u);
  // Peek does not move the local round robin either.
  pool.ClearLease();
  uint64_t first = pool.Peek(ForModel("other")).key->id;
  EXPECT_EQ(pool.Peek(ForModel("other")).key->id, first);
  EXPECT_EQ(pool.Pick(ForModel("other")).key->id, first)
      << "the pick after peeks is the peeked key";

  // The would-be probe: Peek says it is possible, any number of times; the Pick still gets it.
  PickResult peek = pool.Peek(ForModel("m", {3}));
  ASSERT_NE(peek.key, nullptr);
  EXPECT_EQ(peek.key->id, 1u);
  EXPECT_TRUE(peek.probe);
  EXPECT_TRUE(pool.Peek(ForModel("m", {3})).probe);
  PickResult probe = pool.Pick(ForModel("m", {3}));
  ASSERT_NE(probe.key, nullptr);
  EXPECT_TRUE(probe.probe);
  // Now a Peek sees the scope closed, rate limited until B reopens at the latest... or sooner.
  PickResult closed = pool.Peek(ForModel("m", {3}));
  EXPECT_EQ(closed.key, nullptr);
  EXPECT_TRUE(closed.rate_limited);
  EXPECT_LE(closed.retry_at, In(absl::Seconds(20)));
}

TEST(KeyPoolHealthTest, AvoidAccountsIsHonouredWhenOtherAccountsExist) {
  KeyPool pool;
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A"}, {2, "A"}, {3, "B"}, {4, "C"}}));
  EXPECT_EQ(PickedIds(pool, ForModel("m", {}, {"A"}), 12), (std::set<uint64_t>{3, 4}));
  EXPECT_EQ(PickedIds(pool, ForModel("m", {}, {"A", "C"}), 12), (std::set<uint64_t>{3}));
  // A leased entry of an avoided account is passed over.
  pool.AddLease(MakeLease({1, 3}));
  PickResult r = pool.Pick(ForModel("m", {}, {"A"}));
  ASSERT_NE(r.key, nullptr);
  EXPECT_EQ(r.key->id, 3u);
  EXPECT_TRUE(r.from_lease);
}

TEST(KeyPoolHealthTest, AvoidAccountsIsIgnoredWhenNothingElseIsLeft) {
  KeyPool pool;
  pool.ApplySnapshot(
      HealthSnapshot(1, {{1, "A"}, {2, "A"}, {3, "B"}},
                     {MakeBlock("B", "m", v1::BLOCK_PHASE_COOLING, In(absl::Minutes(1)))}));
  // B is blocked for m, so A (which this request saw fail) is all there is.
  EXPECT_EQ(PickedIds(pool, ForModel("m", {}, {"A"}), 6), (std::set<uint64_t>{1, 2}));
  EXPECT_EQ(PickedIds(pool, ForModel("m", {1}, {"A"}), 3), (std::set<uint64_t>{2}));
  // Exclusions are never ignored.
  EXPECT_EQ(pool.Pick(ForModel("m", {1, 2}, {"A"})).key, nullptr);
}

TEST(KeyPoolHealthTest, LocalBlockExcludesTheScopeWhileDisconnected) {
  KeyPool pool;
  pool.SetConnected(false);
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A"}, {2, "A"}, {3, "B"}}));
  const absl::Time until = In(absl::Minutes(2));
  pool.AddLocalBlock("A", "m", until);
  EXPECT_EQ(PickedIds(pool, ForModel("m"), 10), (std::set<uint64_t>{3}));
  EXPECT_EQ(PickedIds(pool, ForModel("other"), 12), (std::set<uint64_t>{1, 2, 3}));
  PickResult none = pool.Pick(ForModel("m", {3}));
  EXPECT_EQ(none.key, nullptr);
  EXPECT_TRUE(none.rate_limited);
  EXPECT_EQ(none.retry_at, until);
  // A shorter later block does not shorten it.
  pool.AddLocalBlock("A", "m", In(absl::Seconds(1)));
  EXPECT_EQ(pool.Pick(ForModel("m", {3})).retry_at, until);
}

TEST(KeyPoolHealthTest, LocalBlockExcludesTheScopeRightAwayWhileConnected) {
  KeyPool pool;
  pool.SetConnected(true);
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A"}, {2, "B"}}));
  pool.AddLocalBlock("A", "m", In(absl::Minutes(2)));
  EXPECT_EQ(PickedIds(pool, ForModel("m"), 10), (std::set<uint64_t>{2}));
  PickResult none = pool.Pick(ForModel("m", {2}));
  EXPECT_EQ(none.key, nullptr);
  EXPECT_TRUE(none.rate_limited);
  EXPECT_GT(none.retry_at, absl::Now());
}

TEST(KeyPoolHealthTest, LocalBlockInThePastHasNoEffect) {
  KeyPool pool;
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A"}}));
  for (bool connected : {false, true}) {
    pool.SetConnected(connected);
    pool.AddLocalBlock("A", "m", In(-absl::Seconds(1)));
    PickResult r = pool.Pick(ForModel("m"));
    ASSERT_NE(r.key, nullptr) << "connected=" << connected;
    EXPECT_EQ(r.key->id, 1u);
  }
}

// proxy.cc, after a probe's 429: ProbeDone(account, model), then AddLocalBlock(account, model,
// now + cooldown). Until the controlplane's new COOLING block arrives, the snapshot still says
// HALF_OPEN with this replica as the probe, and JudgeBlock (key_pool.cc:145-164) returns before
// it looks at local blocks: the very next request sends another probe into the limit.
TEST(KeyPoolHealthTest, LocalBlockAfterAFailedProbeHoldsWhileTheSnapshotSaysHalfOpen) {
  KeyPool pool;
  pool.SetReplicaId("dp-1");
  pool.SetConnected(true);
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "A"}},
      {MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-1")}));
  PickResult probe = pool.Pick(ForModel("m"));
  ASSERT_NE(probe.key, nullptr);
  ASSERT_TRUE(probe.probe);
  // The probe got a 429.
  pool.ProbeDone("A", "m");
  pool.AddLocalBlock("A", "m", In(absl::Minutes(2)));
  PickResult next = pool.Pick(ForModel("m"));
  EXPECT_TRUE(next.key == nullptr)
      << "picked key " << next.key->id << " (probe=" << next.probe << ") despite the local block";
  EXPECT_TRUE(next.rate_limited);
}

// A key whose request passes two half-open scopes named for this replica (its account's and
// the pool-wide one) is the probe of both, but Judge keeps only the last scope it saw
// (key_pool.cc:186-194) and PickLocked marks only that one as in flight (key_pool.cc:238). The
// pool-wide scope stays open and the next request sends a second probe through it on another
// account, although the contract is one probe per half-open scope.
TEST(KeyPoolHealthTest, AProbeThroughTwoHalfOpenScopesHoldsBoth) {
  KeyPool pool;
  pool.SetReplicaId("dp-1");
  pool.ApplySnapshot(HealthSnapshot(
      1, {{1, "A"}, {2, "B"}},
      {MakeBlock("*", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-1"),
       MakeBlock("A", "m", v1::BLOCK_PHASE_HALF_OPEN, In(-absl::Seconds(1)), "dp-1")}));
  PickResult probe = pool.Pick(ForModel("m", {2}));
  ASSERT_NE(probe.key, nullptr);
  ASSERT_EQ(probe.key->id, 1u);
  ASSERT_TRUE(probe.probe);
  PickResult second = pool.Pick(ForModel("m"));
  EXPECT_TRUE(second.key == nullptr) << "a second probe through (*, m) on key " << second.key->id;
}

// KeyState COOLING is documented as "rate limited on every model until state_until", and Judge
// treats such a key as blocked until then. But the local round robin only walks `eligible`
// (ACTIVE keys, key_pool.cc:256), so a COOLING key is only judged when a stale lease entry
// happens to name it. With every key cooling (e.g. `sflbctl keys cooldown` on all of them) Pick
// says kNoneEligible with rate_limited=false, and the proxy answers 503 without Retry-After
// instead of 429 with one.
TEST(KeyPoolHealthTest, KeysCoolingUntilATimeMakeThePoolRateLimited) {
  KeyPool pool;
  const absl::Time soon = In(absl::Seconds(30));
  pool.ApplySnapshot(HealthSnapshot(1, {{1, "A", {}, v1::KEY_STATE_COOLING, In(absl::Seconds(90))},
                                        {2, "B", {}, v1::KEY_STATE_COOLING, soon}}));
  PickResult r = pool.Pick(ForModel("m"));
  EXPECT_EQ(r.key, nullptr);
  EXPECT_EQ(r.failure, PickFailure::kNoneEligible);
  EXPECT_TRUE(r.rate_limited);
  EXPECT_EQ(r.retry_at, soon);
  PickResult peek = pool.Peek(ForModel("m"));
  EXPECT_TRUE(peek.rate_limited);
  EXPECT_EQ(peek.retry_at, soon);
}

}  // namespace
}  // namespace sflb
