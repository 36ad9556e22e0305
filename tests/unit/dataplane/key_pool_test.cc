// Tests of dataplane/key_pool: snapshot/delta handling, lease consumption, the local
// round-robin fallback and the lease-refill signal.
#include "dataplane/key_pool.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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

}  // namespace
}  // namespace sflb
