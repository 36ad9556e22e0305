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
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
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
  absl::Time state_until = absl::InfinitePast();
  std::vector<std::string> forbidden_models;
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

// What a request needs from the pool.
struct PickRequest {
  // The request's model ("" when it names none): scopes and forbidden models depend on it.
  std::string model;
  // Keys this request already tried: never again.
  std::vector<uint64_t> exclude;
  // Accounts this request already saw fail: only if nothing else is left.
  std::vector<std::string> avoid_accounts;
};

struct PickResult {
  std::shared_ptr<const PoolKey> key;  // null on failure
  PickFailure failure = PickFailure::kNone;
  bool from_lease = false;
  // This request is the half-open probe of its scope: report its outcome with probe=true and
  // call ProbeDone() when it is known.
  bool probe = false;
  // On kNoneEligible: some keys are only rate limited; the earliest time one reopens.
  bool rate_limited = false;
  absl::Time retry_at = absl::InfinitePast();
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

  // Picks the key for the next upstream attempt. See the class comment and PickRequest.
  PickResult Pick(const PickRequest& request);
  PickResult Pick() { return Pick(PickRequest()); }
  // Like Pick, but consumes nothing and starts no probe: tells whether a request for the model
  // could be served now, and if not whether the pool is rate limited and until when.
  PickResult Peek(const PickRequest& request);

  // This replica saw a 429 on (account, model): keep requests off the scope until `until`
  // without waiting for the controlplane. While connected, the controlplane's blocks take over
  // after a short overlap; while disconnected the local block holds for its whole length.
  void AddLocalBlock(const std::string& account, const std::string& model, absl::Time until);
  // The probe of (account, model) finished (either way).
  void ProbeDone(const std::string& account, const std::string& model);
  // Whether the controlplane stream is up (set by ControlplaneLink).
  void SetConnected(bool connected);
  // Name of this replica, to recognise probe assignments.
  void SetReplicaId(std::string replica_id);

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
  using Scope = std::pair<std::string, std::string>;  // (account, model)
  struct Block {
    v1::BlockPhase phase = v1::BLOCK_PHASE_COOLING;
    absl::Time until;
    std::string probe_replica;
  };
  struct KeySetView {
    uint64_t version = 0;
    std::string epoch;
    std::vector<std::shared_ptr<const PoolKey>> keys;  // file order
    absl::flat_hash_map<uint64_t, std::shared_ptr<const PoolKey>> by_id;
    std::vector<std::shared_ptr<const PoolKey>> eligible;  // state ACTIVE
    absl::flat_hash_map<Scope, Block> blocks;
  };
  struct LocalBlock {
    absl::Time until;
    absl::Time created;
  };
  enum class Verdict { kUse, kProbe, kBlocked, kUnusable };
  // Whether `key` may serve `model` now; fills *until for kBlocked and, for kProbe, every
  // half-open scope the request would probe into *probe_scopes.
  Verdict Judge(const PoolKey& key, const std::string& model, absl::Time now, absl::Time* until,
                std::vector<Scope>* probe_scopes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Verdict JudgeBlock(const Scope& scope, absl::Time now, absl::Time* until)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  PickResult PickLocked(const PickRequest& request, bool consume)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void CopyBlocks(const google::protobuf::RepeatedPtrField<v1::ScopeBlock>& blocks,
                         KeySetView* view);
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
  absl::flat_hash_map<Scope, LocalBlock> local_blocks_ ABSL_GUARDED_BY(mu_);
  // Probes in flight on this replica, with their start (a lost probe is forgotten after 60 s).
  absl::flat_hash_map<Scope, absl::Time> probing_ ABSL_GUARDED_BY(mu_);
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  std::string replica_id_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_KEY_POOL_H_
