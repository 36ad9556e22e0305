// ScopeBlocks: the rate-limit blocks of (account, model) scopes, their cooldowns, half-open
// probes and the pool-wide block for correlated 429s.
//
// Lifecycle of a block: a 429 on (account, model) starts COOLING for a CooldownPolicy
// duration; when it ends the block turns HALF_OPEN and exactly one replica is named to send
// one probe request; the probe's success removes the block, another 429 extends it with one
// more strike (exponential backoff). If the named replica sends no probe within
// `probe_timeout` (it may have no traffic for that model), another replica is named.
// When 429s hit most accounts within `correlation_window`, a pool-wide block ("*", model) is
// set instead of blocking accounts one by one (an IP- or platform-level limit).
//
// Not thread-safe: owned by KeyRegistry and used under its lock.
#ifndef SFLB_CONTROLPLANE_SCOPE_BLOCKS_H_
#define SFLB_CONTROLPLANE_SCOPE_BLOCKS_H_

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "common/cooldown_policy.h"
#include "nlohmann/json.hpp"
#include "sflb/v1/keys.pb.h"

namespace sflb {

struct ScopeBlockOptions {
  CooldownOptions cooldown;
  // How long a named replica has to send its probe before another one is named.
  absl::Duration probe_timeout = absl::Seconds(10);
  // Correlated-failure detection: 429s from at least `correlation_fraction` of the accounts
  // (and at least `correlation_min_accounts`) within the window make a pool-wide block.
  absl::Duration correlation_window = absl::Seconds(10);
  double correlation_fraction = 0.6;
  int correlation_min_accounts = 3;
};

class ScopeBlocks {
 public:
  explicit ScopeBlocks(ScopeBlockOptions options);

  // A 429 for `model` on `account`, seen at `observed_at`. `total_accounts` is the number of
  // accounts in the key set (for correlation). Returns true when the block list changed.
  bool OnRateLimited(const std::string& account, const std::string& model,
                     absl::optional<absl::Duration> retry_after, const std::string& message,
                     absl::Time observed_at, absl::Time now, size_t total_accounts,
                     double jitter01);
  // A successful probe on (account, model) by `replica`. Returns true when a block was lifted.
  bool OnProbeSuccess(const std::string& account, const std::string& model, absl::Time now);
  // Advances phases: cooling blocks past their end turn half-open with a probe replica chosen
  // from `replicas` (round robin); stale probe assignments move on. Returns true on change.
  bool Tick(absl::Time now, const std::vector<std::string>& replicas);
  // Lifts every block of `account` (operator enable). Returns true on change.
  bool ClearAccount(const std::string& account);

  // Blocks that apply to `account` (its own and pool-wide ones).
  std::vector<v1::ScopeBlock> BlocksFor(const std::string& account) const;
  // Every block.
  std::vector<v1::ScopeBlock> All() const;
  // The earliest end of a cooling phase, if any block is cooling.
  absl::optional<absl::Time> NextDeadline() const;

  // Cooldowns started (or extended by a new strike) since start, by limit ("TPM", ...).
  const std::map<std::string, uint64_t>& cooldowns_started() const { return cooldowns_started_; }

  // State file form: a JSON array; Restore ignores malformed entries.
  nlohmann::json ToJson() const;
  void Restore(const nlohmann::json& blocks, absl::Time now);

 private:
  struct Block {
    v1::BlockPhase phase = v1::BLOCK_PHASE_COOLING;
    absl::Time until;
    std::string probe_replica;
    absl::Time probe_since;
    // When the block last turned half-open: a 429 observed before it belongs to the cooling
    // period (an echo), not to the probe.
    absl::Time half_open_since = absl::InfinitePast();
    uint32_t strikes = 0;
    std::string limit;
    std::string reason;
  };
  using Scope = std::pair<std::string, std::string>;  // (account, model)

  void Cool(Block* block, absl::optional<absl::Duration> retry_after, const std::string& message,
            absl::Time now, double jitter01);
  static v1::ScopeBlock ToProto(const Scope& scope, const Block& block);

  const ScopeBlockOptions options_;
  std::map<Scope, Block> blocks_;
  // Recent 429s for correlation: (time, account, model).
  struct Event {
    absl::Time when;
    std::string account;
    std::string model;
  };
  std::deque<Event> recent_;
  size_t next_probe_replica_ = 0;
  std::map<std::string, uint64_t> cooldowns_started_;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_SCOPE_BLOCKS_H_
