// KeyPool: the dataplane's view of the key set and its share of the global round-robin.
//
// It holds the latest snapshot from the controlplane (immutable, swapped whole) and a queue
// of leased assignments cut from the controlplane's one round-robin sequence. Pick() takes the
// next leased key that is still eligible; when the lease queue is empty (start-up, controlplane
// unreachable) it falls back to a local round robin over the snapshot so that no request ever
// waits for the controlplane.
//
// Thread-safe. Pick() is on the request hot path: one short critical section, no allocation
// beyond a shared_ptr copy, no I/O.
#ifndef SFLB_DATAPLANE_KEY_POOL_H_
#define SFLB_DATAPLANE_KEY_POOL_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "sflb/v1/key_service.pb.h"
#include "sflb/v1/keys.pb.h"

namespace sflb {

// One upstream key as the dataplane holds it. Immutable once published; requests keep their
// shared_ptr until they finish, so a key removed by a reload stays valid for them.
struct PoolKey {
  uint64_t id = 0;
  std::string secret;
  std::string fingerprint;
  std::string account;
  v1::KeyState state = v1::KEY_STATE_UNSPECIFIED;
  uint32_t index = 0;
};

// Why Pick() found nothing.
enum class PickFailure {
  kNone,
  // No snapshot has arrived yet.
  kNoSnapshot,
  // The key set is empty.
  kNoKeys,
  // Keys exist but none is eligible (all cooling, invalid, disabled...), or all were excluded.
  kNoneEligible,
};

struct PickResult {
  std::shared_ptr<const PoolKey> key;  // null on failure
  PickFailure failure = PickFailure::kNone;
  bool from_lease = false;
};

class KeyPool {
 public:
  struct Options {
    // Lease batch bounds; the batch adapts to about `lease_horizon` of traffic within them.
    uint32_t min_lease = 64;
    uint32_t max_lease = 4096;
    absl::Duration lease_horizon = absl::Seconds(2);
  };
  KeyPool();
  explicit KeyPool(Options options);

  // Replaces the key set. Lease entries for keys that left are skipped later.
  void ApplySnapshot(const v1::Snapshot& snapshot);
  // Applies a delta. Returns false and changes nothing when the delta does not start at the
  // held version (the caller must resynchronise with a new Watch).
  bool ApplyDelta(const v1::SnapshotDelta& delta);

  // Appends leased assignments.
  void AddLease(const v1::LeaseResponse& lease);
  // Drops all leased assignments (e.g. after a controlplane restart: a new epoch).
  void ClearLease();

  // Picks the key for the next upstream attempt, skipping `exclude` (keys this request already
  // tried). See the class comment.
  PickResult Pick(const std::vector<uint64_t>& exclude = {});

  // Waits up to `timeout` until the lease queue has fallen below its refill mark. Returns the
  // batch size to request then, or 0 on timeout / when no refill is needed.
  uint32_t WaitForLeaseNeed(absl::Duration timeout);

  bool has_snapshot() const;
  uint64_t version() const;
  std::string epoch() const;
  size_t key_count() const;
  size_t eligible_count() const;
  size_t leased_remaining() const;

  // The current key set (shared, immutable) for read-only views such as /stats.
  std::shared_ptr<const std::vector<std::shared_ptr<const PoolKey>>> keys() const;

 private:
  struct KeySetView {
    uint64_t version = 0;
    std::string epoch;
    std::vector<std::shared_ptr<const PoolKey>> keys;  // file order
    absl::flat_hash_map<uint64_t, std::shared_ptr<const PoolKey>> by_id;
    std::vector<std::shared_ptr<const PoolKey>> eligible;
  };
  static std::shared_ptr<const PoolKey> MakeKey(const v1::UpstreamKey& key);
  static void Index(KeySetView* view);
  uint32_t BatchSize() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable Mutex mu_;
  CondVar lease_need_;
  std::shared_ptr<const KeySetView> view_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const std::vector<std::shared_ptr<const PoolKey>>> keys_ ABSL_GUARDED_BY(mu_);
  std::deque<uint64_t> lease_ ABSL_GUARDED_BY(mu_);
  uint64_t local_cursor_ ABSL_GUARDED_BY(mu_) = 0;
  // Picks counted per second window, for the adaptive batch size.
  uint64_t picks_in_window_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time window_start_ ABSL_GUARDED_BY(mu_);
  double picks_per_second_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_KEY_POOL_H_
