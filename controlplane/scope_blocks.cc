#include "controlplane/scope_blocks.h"

#include <algorithm>
#include <set>

#include "common/time_format.h"

namespace sflb {
namespace {

constexpr char kAll[] = "*";

}  // namespace

ScopeBlocks::ScopeBlocks(ScopeBlockOptions options) : options_(options) {}

void ScopeBlocks::Cool(Block* block, absl::optional<absl::Duration> retry_after,
                       const std::string& message, absl::Time now, double jitter01) {
  block->strikes += 1;
  CooldownDecision decision = ComputeCooldown(retry_after, message, now,
                                              static_cast<int>(block->strikes), jitter01,
                                              options_.cooldown);
  block->phase = v1::BLOCK_PHASE_COOLING;
  block->until = std::max(block->until, now + decision.duration);
  block->limit = decision.limit;
  block->reason = message.substr(0, 512);
  ++cooldowns_started_[decision.limit];
  block->probe_replica.clear();
}

bool ScopeBlocks::OnRateLimited(const std::string& account, const std::string& model,
                                absl::optional<absl::Duration> retry_after,
                                const std::string& message, absl::Time observed_at,
                                absl::Time now, size_t total_accounts, double jitter01) {
  Scope scope{account, model};
  auto it = blocks_.find(scope);
  if (it != blocks_.end() && it->second.phase == v1::BLOCK_PHASE_HALF_OPEN &&
      observed_at < it->second.half_open_since) {
    return false;  // a late report from the cooling period, not the probe's answer
  }
  if (it != blocks_.end() && it->second.phase == v1::BLOCK_PHASE_COOLING &&
      observed_at < it->second.until) {
    // Another replica's echo of the same event (or a request already in flight): the scope is
    // cooling already. Only a longer Retry-After moves the end.
    if (retry_after.has_value() && observed_at + *retry_after > it->second.until) {
      it->second.until = observed_at + *retry_after;
      return true;
    }
    return false;
  }
  // A report from before the controlplane restarted (or delayed) may describe a cooldown that
  // has already ended: only act on it if it would still be in force.
  if (it == blocks_.end()) {
    CooldownDecision decision =
        ComputeCooldown(retry_after, message, observed_at, 1, jitter01, options_.cooldown);
    if (observed_at + decision.duration <= now) return false;
  }
  Block& block = blocks_[scope];
  Cool(&block, retry_after, message, now, jitter01);

  // Correlation: distinct accounts with a 429 for this model within the window.
  recent_.push_back({observed_at, account, model});
  while (!recent_.empty() && recent_.front().when < now - options_.correlation_window) {
    recent_.pop_front();
  }
  std::set<std::string> accounts;
  for (const Event& e : recent_) {
    if (e.model == model) accounts.insert(e.account);
  }
  size_t needed = std::max<size_t>(
      static_cast<size_t>(options_.correlation_min_accounts),
      static_cast<size_t>(std::ceil(options_.correlation_fraction * total_accounts)));
  if (total_accounts >= static_cast<size_t>(options_.correlation_min_accounts) &&
      accounts.size() >= needed) {
    Scope pool{kAll, model};
    auto p = blocks_.find(pool);
    if (p == blocks_.end() || p->second.phase != v1::BLOCK_PHASE_COOLING) {
      Block& pool_block = blocks_[pool];
      // As long as the 429 that tipped it over said (its Retry-After or limit).
      Cool(&pool_block, retry_after, message, now, jitter01);
      pool_block.limit = "pool-wide";
      pool_block.reason = "most accounts were rate limited at once (IP- or platform-level limit)";
    }
  }
  return true;
}

bool ScopeBlocks::OnProbeSuccess(const std::string& account, const std::string& model,
                                 absl::Time now) {
  bool changed = false;
  for (const Scope& scope : {Scope{account, model}, Scope{kAll, model}}) {
    auto it = blocks_.find(scope);
    if (it != blocks_.end() && it->second.phase == v1::BLOCK_PHASE_HALF_OPEN) {
      blocks_.erase(it);
      changed = true;
    }
  }
  return changed;
}

bool ScopeBlocks::Tick(absl::Time now, const std::vector<std::string>& replicas) {
  bool changed = false;
  for (auto& [scope, block] : blocks_) {
    bool stale_probe = block.phase == v1::BLOCK_PHASE_HALF_OPEN &&
                       now - block.probe_since >= options_.probe_timeout;
    bool expired = block.phase == v1::BLOCK_PHASE_COOLING && now >= block.until;
    if (!expired && !stale_probe) continue;
    if (expired) block.half_open_since = now;
    block.phase = v1::BLOCK_PHASE_HALF_OPEN;
    block.probe_since = now;
    std::string next = replicas.empty() ? "" : replicas[next_probe_replica_++ % replicas.size()];
    if (replicas.size() > 1 && next == block.probe_replica) {
      next = replicas[next_probe_replica_++ % replicas.size()];
    }
    if (next != block.probe_replica || expired) changed = true;
    block.probe_replica = next;
  }
  return changed;
}

bool ScopeBlocks::ClearAccount(const std::string& account) {
  bool changed = false;
  for (auto it = blocks_.begin(); it != blocks_.end();) {
    if (it->first.first == account) {
      it = blocks_.erase(it);
      changed = true;
    } else {
      ++it;
    }
  }
  return changed;
}

v1::ScopeBlock ScopeBlocks::ToProto(const Scope& scope, const Block& block) {
  v1::ScopeBlock out;
  out.set_account(scope.first);
  out.set_model(scope.second);
  out.set_phase(block.phase);
  *out.mutable_until() = ToProtoTime(block.until);
  out.set_probe_replica(block.probe_replica);
  out.set_strikes(block.strikes);
  out.set_limit(block.limit);
  out.set_reason(block.reason);
  return out;
}

std::vector<v1::ScopeBlock> ScopeBlocks::BlocksFor(const std::string& account) const {
  std::vector<v1::ScopeBlock> out;
  for (const auto& [scope, block] : blocks_) {
    if (scope.first == account || scope.first == kAll) out.push_back(ToProto(scope, block));
  }
  return out;
}

std::vector<v1::ScopeBlock> ScopeBlocks::All() const {
  std::vector<v1::ScopeBlock> out;
  for (const auto& [scope, block] : blocks_) out.push_back(ToProto(scope, block));
  return out;
}

absl::optional<absl::Time> ScopeBlocks::NextDeadline() const {
  absl::optional<absl::Time> next;
  for (const auto& [scope, block] : blocks_) {
    if (block.phase != v1::BLOCK_PHASE_COOLING) continue;
    if (!next.has_value() || block.until < *next) next = block.until;
  }
  return next;
}

nlohmann::json ScopeBlocks::ToJson() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& [scope, block] : blocks_) {
    out.push_back({{"account", scope.first},
                   {"model", scope.second},
                   {"until_unix_ms", absl::ToUnixMillis(block.until)},
                   {"strikes", block.strikes},
                   {"limit", block.limit},
                   {"reason", block.reason}});
  }
  return out;
}

void ScopeBlocks::Restore(const nlohmann::json& blocks, absl::Time now) {
  if (!blocks.is_array()) return;
  for (const nlohmann::json& b : blocks) {
    if (!b.is_object() || !b.contains("account") || !b.contains("model") ||
        !b["account"].is_string() || !b["model"].is_string()) {
      continue;
    }
    Block block;
    try {
      block.until = absl::FromUnixMillis(b.value("until_unix_ms", int64_t{0}));
      block.strikes = b.value("strikes", 1u);
      block.limit = b.value("limit", "");
      block.reason = b.value("reason", "");
    } catch (const nlohmann::json::exception&) {
      continue;  // a wrongly typed field: skip the entry, keep the rest
    }
    // A block whose cooldown ended while the controlplane was down comes back half-open: the
    // next Tick names a probe replica.
    block.phase = v1::BLOCK_PHASE_COOLING;
    if (block.until < now) block.until = now;
    blocks_[{b["account"].get<std::string>(), b["model"].get<std::string>()}] = block;
  }
}

}  // namespace sflb
