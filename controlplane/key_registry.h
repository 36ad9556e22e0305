// KeyRegistry: the one owner of the upstream key set, its round-robin sequence, per-key state
// and counters, and the version history that Watch streams are built from.
//
// Thread-safe: every method may be called from any gRPC handler thread. One mutex guards all
// state; no method does I/O while holding it.
#ifndef SFLB_CONTROLPLANE_KEY_REGISTRY_H_
#define SFLB_CONTROLPLANE_KEY_REGISTRY_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/keys_file.h"
#include "common/mutex.h"
#include "controlplane/scope_blocks.h"
#include "nlohmann/json.hpp"
#include "sflb/v1/admin_service.pb.h"
#include "sflb/v1/key_service.pb.h"
#include "sflb/v1/keys.pb.h"

namespace sflb {

// What a Replace() changed.
struct ReplaceResult {
  uint32_t previous_count = 0;
  uint32_t new_count = 0;
  std::vector<std::string> added;    // fingerprints
  std::vector<std::string> removed;  // fingerprints
  uint64_t version = 0;
};

class KeyRegistry {
 public:
  // `clock` must outlive the registry.
  explicit KeyRegistry(Clock* clock, ScopeBlockOptions block_options = ScopeBlockOptions());
  KeyRegistry(const KeyRegistry&) = delete;
  KeyRegistry& operator=(const KeyRegistry&) = delete;

  // Makes `keys` the key set, atomically. A key whose secret was already present keeps its id,
  // state and counters (its account is updated from the new spec); new keys start ACTIVE;
  // removed keys are retired (dataplanes drop them on the next snapshot, requests already using
  // them finish). Always bumps the version when anything changed.
  ReplaceResult Replace(const KeySet& keys);

  // Cuts up to `count` assignments from the global round-robin sequence over ACTIVE keys.
  // Returns fewer (possibly none) only when no key is active.
  v1::LeaseResponse Lease(uint32_t count);

  // Applies a replica's report: usage counters, then outcomes in order (401 -> INVALID,
  // 403 -> DEPLETED or a forbidden model, 429 -> a scope block, probe success -> block lifted).
  // Ids of retired keys are ignored. Returns the key state changes it caused, for the audit.
  struct StateChange {
    std::string fingerprint;
    v1::KeyState from = v1::KEY_STATE_UNSPECIFIED;
    v1::KeyState to = v1::KEY_STATE_UNSPECIFIED;
    std::string reason;
    std::string actor;
  };
  std::vector<StateChange> ApplyReport(const v1::ReportRequest& report);

  // Sets a key's state (operator or health logic). Returns false for an unknown id. Bumps the
  // version and records a delta when the state changed.
  bool SetState(uint64_t id, v1::KeyState state, std::string reason, absl::Time until,
                std::string actor = "");

  // Operator action on a key. NOT_FOUND for an unknown id; INVALID_ARGUMENT for a bad action
  // or duration. Returns the key's new status.
  absl::StatusOr<v1::KeyStatus> ApplyAction(uint64_t id, v1::KeyAction action,
                                            absl::Duration duration, const std::string& reason,
                                            const std::string& actor);
  // A key with its blocks and an explanation of why it is (not) used.
  absl::StatusOr<v1::GetKeyResponse> Explain(uint64_t id) const;

  // Time-driven transitions: key cooldowns that ended, block phases (see ScopeBlocks). Call
  // every ~100 ms with the replicas that currently watch. Returns the key state changes.
  std::vector<StateChange> Tick(const std::vector<std::string>& replicas);

  // Balance integration. Every key with what a balance check needs (the secret included: for
  // the controlplane's own upstream calls only).
  struct BalanceKey {
    uint64_t id = 0;
    uint32_t index = 0;
    std::string secret;
    std::string fingerprint;
    bool active = false;
  };
  std::vector<BalanceKey> BalanceKeys() const;
  // Keys whose account keys.txt did not name take the upstream account id (data.id) as their
  // rate-limit scope. Returns true when any account changed.
  bool AssignAccounts(const std::vector<std::pair<uint64_t, std::string>>& account_ids);

  // Persistent state (per-key state and counters by fingerprint, blocks) as JSON, and its
  // restoration after the key set was loaded. Keys not in the key set are ignored.
  nlohmann::json ExportState() const;
  void ImportState(const nlohmann::json& state);
  // Bumps on every change worth persisting (states, blocks); counters are saved with them.
  uint64_t state_generation() const;

  // The whole key set, for a new Watch stream.
  v1::Snapshot BuildSnapshot() const;

  // Fills `out` with what a watcher holding `known_version` needs next: a delta when the
  // history since then is retained and holds no reload, else a full snapshot. Returns false
  // (leaving `out` untouched) when `known_version` is current.
  bool BuildUpdate(uint64_t known_version, v1::WatchResponse* out) const;

  // Waits until the version differs from `known_version`, or `timeout` passes.
  void WaitForChange(uint64_t known_version, absl::Duration timeout) const;

  uint64_t version() const;
  size_t size() const;

  // Operator views. Never include secrets.
  std::vector<v1::KeyStatus> ListKeys(v1::KeyState filter) const;
  // Fills the pool-wide fields of `out` (keys, totals, version, leased_total).
  void FillStats(v1::GetStatsResponse* out) const;
  // Current blocks.
  std::vector<v1::ScopeBlock> Blocks() const;
  // Counts for metrics: keys by state, blocks by phase, cooldowns started by limit.
  struct Counts {
    std::map<v1::KeyState, size_t> keys_by_state;
    std::map<v1::BlockPhase, size_t> blocks_by_phase;
    std::map<std::string, uint64_t> cooldowns_started;
  };
  Counts GetCounts() const;
  uint64_t leased_total() const;
  // Registry id -> account, for per-account figures.
  std::map<uint64_t, std::string> AccountsById() const;

  // Resolves an operator's key reference: an index ("3"), a fingerprint (or unique prefix of 6+
  // hex digits) or a registry id ("id:17"). NOT_FOUND or INVALID_ARGUMENT (ambiguous) otherwise.
  absl::StatusOr<uint64_t> Resolve(const std::string& reference) const;

 private:
  struct Entry {
    uint64_t id = 0;
    std::string secret;
    std::string fingerprint;
    std::string masked;
    std::string account;
    uint32_t index = 0;
    v1::KeyState state = v1::KEY_STATE_ACTIVE;
    std::string state_reason;
    absl::Time state_since;
    absl::Time state_until = absl::InfinitePast();
    uint64_t request_count = 0;
    absl::Time last_used = absl::InfinitePast();
    uint64_t prompt_tokens = 0;
    uint64_t completion_tokens = 0;
    absl::Time added_at;
    std::vector<std::string> forbidden_models;
    int state_status = 0;
    std::string state_message;
    std::string state_actor;
    // keys.txt named the account (else it comes from the balance check or the fingerprint).
    bool account_explicit = false;
  };
  // One version step. `full` marks a reload: watchers behind it get a snapshot.
  struct Change {
    uint64_t version = 0;
    bool full = false;
    std::vector<uint64_t> upserted;
    bool blocks = false;
  };

  void BumpVersion(Change change) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RebuildActive() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets state fields of `e`; returns false if nothing changed.
  bool Transition(Entry* e, v1::KeyState state, std::string reason, absl::Time until,
                  int status, std::string message, std::string actor,
                  std::vector<StateChange>* changes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  size_t AccountCount() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void FillUpstreamKey(const Entry& e, v1::UpstreamKey* out);
  static void FillStatus(const Entry& e, v1::KeyStatus* out);

  Clock* const clock_;
  const std::string epoch_;
  mutable Mutex mu_;
  mutable CondVar changed_;
  // The key set in file order.
  std::vector<std::unique_ptr<Entry>> keys_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Entry*> by_id_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, Entry*> by_secret_ ABSL_GUARDED_BY(mu_);
  // Ids of ACTIVE keys in file order: the round-robin ring.
  std::vector<uint64_t> active_ ABSL_GUARDED_BY(mu_);
  uint64_t rr_cursor_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t leased_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 1;
  // Recent version steps, oldest first, at most kMaxChanges.
  std::deque<Change> changes_ ABSL_GUARDED_BY(mu_);
  ScopeBlocks blocks_ ABSL_GUARDED_BY(mu_);
  uint64_t state_generation_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_KEY_REGISTRY_H_
