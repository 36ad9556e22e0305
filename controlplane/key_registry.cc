#include "controlplane/key_registry.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/key_format.h"
#include "common/time_format.h"

namespace sflb {
namespace {

constexpr size_t kMaxChanges = 4096;

std::string NewEpoch() {
  absl::BitGen gen;
  return absl::StrCat(absl::ToUnixMillis(absl::Now()), "-",
                      absl::Uniform<uint32_t>(gen, 0, 0xffffffffu));
}

}  // namespace

KeyRegistry::KeyRegistry(Clock* clock, ScopeBlockOptions block_options)
    : clock_(clock), epoch_(NewEpoch()), blocks_(block_options) {}

namespace {

bool MentionsBalance(absl::string_view message) {
  std::string lower = absl::AsciiStrToLower(message);
  return absl::StrContains(lower, "balance") || absl::StrContains(lower, "insufficient") ||
         absl::StrContains(lower, "credit") || absl::StrContains(message, "\xE4\xBD\x99\xE9\xA2\x9D");  // 余额
}

double Jitter() {
  thread_local absl::BitGen gen;
  return absl::Uniform(gen, 0.0, 1.0);
}

}  // namespace

size_t KeyRegistry::AccountCount() const {
  absl::flat_hash_set<absl::string_view> accounts;
  for (const auto& e : keys_) accounts.insert(e->account);
  return accounts.size();
}

bool KeyRegistry::Transition(Entry* e, v1::KeyState state, std::string reason, absl::Time until,
                             int status, std::string message, std::string actor,
                             std::vector<StateChange>* changes) {
  if (e->state == state && e->state_until == until && e->state_reason == reason) return false;
  if (changes != nullptr && e->state != state) {
    changes->push_back({e->fingerprint, e->state, state, reason, actor});
  }
  e->state = state;
  e->state_reason = std::move(reason);
  e->state_since = clock_->Now();
  e->state_until = until;
  e->state_status = status;
  e->state_message = std::move(message);
  e->state_actor = std::move(actor);
  ++state_generation_;
  return true;
}

void KeyRegistry::BumpVersion(Change change) {
  change.version = ++version_;
  changes_.push_back(std::move(change));
  while (changes_.size() > kMaxChanges) changes_.pop_front();
  changed_.SignalAll();
}

void KeyRegistry::RebuildActive() {
  active_.clear();
  for (const auto& e : keys_) {
    if (e->state == v1::KEY_STATE_ACTIVE) active_.push_back(e->id);
  }
}

ReplaceResult KeyRegistry::Replace(const KeySet& keys) {
  MutexLock lock(&mu_);
  absl::Time now = clock_->Now();
  ReplaceResult result;
  result.previous_count = static_cast<uint32_t>(keys_.size());

  // Take the current records apart by secret so that keys which stay keep their record.
  absl::flat_hash_map<std::string, std::unique_ptr<Entry>> old_by_secret;
  old_by_secret.reserve(keys_.size());
  for (auto& e : keys_) old_by_secret.emplace(e->secret, std::move(e));

  std::vector<std::unique_ptr<Entry>> next;
  next.reserve(keys.keys.size());
  for (const KeySpec& spec : keys.keys) {
    std::unique_ptr<Entry> entry;
    auto it = old_by_secret.find(spec.secret);
    if (it != old_by_secret.end()) {
      entry = std::move(it->second);
      old_by_secret.erase(it);
    } else {
      entry = std::make_unique<Entry>();
      entry->id = next_id_++;
      entry->secret = spec.secret;
      entry->fingerprint = KeyFingerprint(spec.secret);
      entry->masked = MaskKey(spec.secret);
      entry->state_since = now;
      entry->added_at = now;
      result.added.push_back(entry->fingerprint);
    }
    if (!spec.account.empty()) {
      entry->account = spec.account;
    } else if (entry->account_explicit || entry->account.empty()) {
      entry->account = entry->fingerprint;  // keeps an account learned from a balance check
    }
    entry->account_explicit = !spec.account.empty();
    entry->index = static_cast<uint32_t>(next.size());
    // A reload is the operator's "try these keys again": invalid and depleted keys and refused
    // models get another chance; disabled keys and cooldowns stay.
    if (entry->state == v1::KEY_STATE_INVALID || entry->state == v1::KEY_STATE_DEPLETED) {
      Transition(entry.get(), v1::KEY_STATE_ACTIVE, "reloaded", absl::InfinitePast(), 0, "",
                 "reload", nullptr);
    }
    entry->forbidden_models.clear();
    next.push_back(std::move(entry));
  }
  std::vector<const Entry*> retired;
  for (const auto& [secret, e] : old_by_secret) retired.push_back(e.get());
  std::sort(retired.begin(), retired.end(),
            [](const Entry* a, const Entry* b) { return a->index < b->index; });
  for (const Entry* e : retired) result.removed.push_back(e->fingerprint);
  keys_ = std::move(next);
  by_id_.clear();
  by_secret_.clear();
  for (const auto& e : keys_) {
    by_id_[e->id] = e.get();
    by_secret_[e->secret] = e.get();
  }
  RebuildActive();
  result.new_count = static_cast<uint32_t>(keys_.size());
  // Accounts or order may change without adds/removes: always publish a full snapshot.
  BumpVersion(Change{0, true, {}, false});
  result.version = version_;
  return result;
}

v1::LeaseResponse KeyRegistry::Lease(uint32_t count) {
  v1::LeaseResponse out;
  MutexLock lock(&mu_);
  out.set_snapshot_version(version_);
  if (active_.empty()) return out;
  out.mutable_key_ids()->Reserve(static_cast<int>(count));
  const uint64_t n = active_.size();
  for (uint32_t i = 0; i < count; ++i) {
    out.add_key_ids(active_[rr_cursor_ % n]);
    ++rr_cursor_;
  }
  // Keep the cursor small so a changed ring size continues from a sensible place.
  rr_cursor_ %= n;
  leased_total_ += count;
  return out;
}

std::vector<KeyRegistry::StateChange> KeyRegistry::ApplyReport(const v1::ReportRequest& report) {
  std::vector<StateChange> changes;
  MutexLock lock(&mu_);
  for (const v1::KeyUsage& usage : report.usage()) {
    auto it = by_id_.find(usage.key_id());
    if (it == by_id_.end()) continue;
    Entry* e = it->second;
    e->request_count += usage.requests();
    e->prompt_tokens += usage.prompt_tokens();
    e->completion_tokens += usage.completion_tokens();
    if (usage.has_last_used()) e->last_used = std::max(e->last_used, FromProtoTime(usage.last_used()));
  }
  absl::Time now = clock_->Now();
  std::string actor = absl::StrCat("dataplane:", report.replica_id());
  Change change;
  for (const v1::KeyOutcome& outcome : report.outcomes()) {
    auto it = by_id_.find(outcome.key_id());
    if (it == by_id_.end()) continue;
    Entry* e = it->second;
    absl::Time observed = outcome.has_observed_at() ? FromProtoTime(outcome.observed_at()) : now;
    std::string message = outcome.message().substr(0, 512);
    switch (outcome.kind()) {
      case v1::OUTCOME_KIND_UNAUTHORIZED:
        if (e->state != v1::KEY_STATE_DISABLED &&
            Transition(e, v1::KEY_STATE_INVALID, "upstream rejected the key (401)",
                       absl::InfinitePast(), outcome.http_status(), message, actor, &changes)) {
          change.upserted.push_back(e->id);
        }
        break;
      case v1::OUTCOME_KIND_FORBIDDEN:
        if (MentionsBalance(message) || outcome.model().empty()) {
          if (e->state != v1::KEY_STATE_DISABLED &&
              Transition(e, v1::KEY_STATE_DEPLETED, "insufficient balance (403)",
                         absl::InfinitePast(), outcome.http_status(), message, actor, &changes)) {
            change.upserted.push_back(e->id);
          }
        } else if (std::find(e->forbidden_models.begin(), e->forbidden_models.end(),
                             outcome.model()) == e->forbidden_models.end()) {
          // The key's state does not change (other models still work), so its state fields
          // keep describing the state; the refusal shows in forbidden_models.
          e->forbidden_models.push_back(outcome.model());
          ++state_generation_;
          change.upserted.push_back(e->id);
        }
        break;
      case v1::OUTCOME_KIND_RATE_LIMITED: {
        absl::optional<absl::Duration> retry_after;
        if (outcome.has_retry_after()) retry_after = FromProtoDuration(outcome.retry_after());
        if (blocks_.OnRateLimited(e->account, outcome.model(), retry_after, message, observed, now,
                                  AccountCount(), Jitter())) {
          change.blocks = true;
        }
        break;
      }
      case v1::OUTCOME_KIND_SUCCESS:
        if (outcome.probe() && blocks_.OnProbeSuccess(e->account, outcome.model(), now)) {
          change.blocks = true;
        }
        break;
      default:
        break;  // 5xx and transport errors are the upstream's trouble, not the key's
    }
  }
  if (!change.upserted.empty() || change.blocks) {
    if (!change.upserted.empty()) RebuildActive();
    ++state_generation_;
    BumpVersion(std::move(change));
  }
  return changes;
}

bool KeyRegistry::SetState(uint64_t id, v1::KeyState state, std::string reason,
                           absl::Time until, std::string actor) {
  MutexLock lock(&mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return false;
  Entry* e = it->second;
  if (!Transition(e, state, std::move(reason), until, 0, "", std::move(actor), nullptr)) {
    return true;
  }
  RebuildActive();
  BumpVersion(Change{0, false, {id}, false});
  return true;
}

absl::StatusOr<v1::KeyStatus> KeyRegistry::ApplyAction(uint64_t id, v1::KeyAction action,
                                                       absl::Duration duration,
                                                       const std::string& reason,
                                                       const std::string& actor) {
  MutexLock lock(&mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return absl::NotFoundError(absl::StrCat("no key with id ", id));
  Entry* e = it->second;
  absl::Time now = clock_->Now();
  std::string why = reason.empty() ? std::string("operator") : reason;
  Change change{0, false, {id}, false};
  switch (action) {
    case v1::KEY_ACTION_DISABLE:
      Transition(e, v1::KEY_STATE_DISABLED, why, absl::InfinitePast(), 0, "", actor, nullptr);
      break;
    case v1::KEY_ACTION_ENABLE:
      Transition(e, v1::KEY_STATE_ACTIVE, why, absl::InfinitePast(), 0, "", actor, nullptr);
      e->forbidden_models.clear();
      if (blocks_.ClearAccount(e->account)) change.blocks = true;
      break;
    case v1::KEY_ACTION_COOLDOWN:
      if (duration < absl::Seconds(1) || duration > absl::Hours(24 * 7)) {
        return absl::InvalidArgumentError("cooldown duration must be between 1s and 7 days");
      }
      Transition(e, v1::KEY_STATE_COOLING, why, now + duration, 0, "", actor, nullptr);
      break;
    default:
      return absl::InvalidArgumentError("unknown key action");
  }
  ++state_generation_;
  RebuildActive();
  BumpVersion(std::move(change));
  v1::KeyStatus status;
  FillStatus(*e, &status);
  return status;
}

absl::StatusOr<v1::GetKeyResponse> KeyRegistry::Explain(uint64_t id) const {
  MutexLock lock(&mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return absl::NotFoundError(absl::StrCat("no key with id ", id));
  const Entry& e = *it->second;
  v1::GetKeyResponse out;
  FillStatus(e, out.mutable_key());
  for (v1::ScopeBlock& b : blocks_.BlocksFor(e.account)) *out.add_blocks() = std::move(b);
  std::string text;
  absl::Time now = clock_->Now();
  switch (e.state) {
    case v1::KEY_STATE_ACTIVE:
      text = "Active: the key takes its turn in the round robin.";
      break;
    case v1::KEY_STATE_COOLING:
      text = absl::StrCat("Cooling until ", FormatIso8601(e.state_until), " (",
                          absl::FormatDuration(absl::Trunc(e.state_until - now, absl::Seconds(1))),
                          " left): ", e.state_reason, ".");
      break;
    case v1::KEY_STATE_INVALID:
      text = absl::StrCat("Invalid: ", e.state_reason,
                          ". It stays out until the keys are reloaded or it is enabled.");
      break;
    case v1::KEY_STATE_DEPLETED:
      text = absl::StrCat("Depleted: ", e.state_reason,
                          ". Top up the account, then enable the key or reload.");
      break;
    case v1::KEY_STATE_DISABLED:
      text = absl::StrCat("Disabled by an operator (", e.state_actor.empty() ? "unknown" : e.state_actor,
                          "): ", e.state_reason, ".");
      break;
    default:
      text = "Unknown state.";
  }
  if (!e.state_message.empty()) absl::StrAppend(&text, " Upstream said: \"", e.state_message, "\".");
  if (!e.forbidden_models.empty()) {
    absl::StrAppend(&text, " Models refused to its account (403): ",
                    absl::StrJoin(e.forbidden_models, ", "), ".");
  }
  for (const v1::ScopeBlock& b : out.blocks()) {
    absl::StrAppend(&text, " Rate limited ", b.account() == "*" ? "pool-wide" : "on its account",
                    " for model ", b.model().empty() ? "(none)" : b.model(), " (", b.limit(), "): ",
                    b.phase() == v1::BLOCK_PHASE_COOLING
                        ? absl::StrCat("cooling until ", FormatIso8601(FromProtoTime(b.until())))
                        : absl::StrCat("half-open, probe by ", b.probe_replica()),
                    ".");
  }
  out.set_explanation(text);
  return out;
}

std::vector<KeyRegistry::StateChange> KeyRegistry::Tick(const std::vector<std::string>& replicas) {
  std::vector<StateChange> changes;
  MutexLock lock(&mu_);
  absl::Time now = clock_->Now();
  Change change;
  for (const auto& e : keys_) {
    if (e->state == v1::KEY_STATE_COOLING && e->state_until != absl::InfinitePast() &&
        now >= e->state_until) {
      Transition(e.get(), v1::KEY_STATE_ACTIVE, "cooldown ended", absl::InfinitePast(), 0, "",
                 "controlplane", &changes);
      change.upserted.push_back(e->id);
    }
  }
  if (blocks_.Tick(now, replicas)) change.blocks = true;
  if (!change.upserted.empty() || change.blocks) {
    if (!change.upserted.empty()) RebuildActive();
    ++state_generation_;
    BumpVersion(std::move(change));
  }
  return changes;
}

std::vector<KeyRegistry::BalanceKey> KeyRegistry::BalanceKeys() const {
  std::vector<BalanceKey> out;
  MutexLock lock(&mu_);
  out.reserve(keys_.size());
  for (const auto& e : keys_) {
    out.push_back({e->id, e->index, e->secret, e->fingerprint, e->state == v1::KEY_STATE_ACTIVE});
  }
  return out;
}

bool KeyRegistry::AssignAccounts(
    const std::vector<std::pair<uint64_t, std::string>>& account_ids) {
  MutexLock lock(&mu_);
  Change change;
  for (const auto& [id, account_id] : account_ids) {
    auto it = by_id_.find(id);
    if (it == by_id_.end() || it->second->account_explicit || account_id.empty()) continue;
    std::string account = absl::StrCat("acct:", account_id);
    if (it->second->account == account) continue;
    it->second->account = account;
    change.upserted.push_back(id);
  }
  if (change.upserted.empty()) return false;
  ++state_generation_;
  BumpVersion(std::move(change));
  return true;
}

nlohmann::json KeyRegistry::ExportState() const {
  MutexLock lock(&mu_);
  nlohmann::json keys = nlohmann::json::object();
  for (const auto& e : keys_) {
    keys[e->fingerprint] = {{"state", v1::KeyState_Name(e->state)},
                            {"reason", e->state_reason},
                            {"since_unix_ms", absl::ToUnixMillis(e->state_since)},
                            {"until_unix_ms", e->state_until == absl::InfinitePast()
                                                  ? int64_t{0}
                                                  : absl::ToUnixMillis(e->state_until)},
                            {"status", e->state_status},
                            {"message", e->state_message},
                            {"actor", e->state_actor},
                            {"forbidden_models", e->forbidden_models},
                            {"request_count", e->request_count},
                            {"last_used_unix_ms", e->last_used == absl::InfinitePast()
                                                      ? int64_t{0}
                                                      : absl::ToUnixMillis(e->last_used)},
                            {"prompt_tokens", e->prompt_tokens},
                            {"completion_tokens", e->completion_tokens},
                            {"learned_account", e->account_explicit ? std::string() : e->account}};
  }
  return {{"version", 1}, {"keys", keys}, {"blocks", blocks_.ToJson()}};
}

void KeyRegistry::ImportState(const nlohmann::json& state) {
  if (!state.is_object()) return;
  MutexLock lock(&mu_);
  absl::Time now = clock_->Now();
  auto keys = state.find("keys");
  if (keys != state.end() && keys->is_object()) {
    for (const auto& e : keys_) {
      auto it = keys->find(e->fingerprint);
      if (it == keys->end() || !it->is_object()) continue;
      const nlohmann::json& k = *it;
      // A wrongly typed field (hand-edited or older file) skips that key, never the start-up.
      try {
      v1::KeyState st = v1::KEY_STATE_ACTIVE;
      if (!v1::KeyState_Parse(k.value("state", std::string("KEY_STATE_ACTIVE")), &st) ||
          st == v1::KEY_STATE_UNSPECIFIED) {
        st = v1::KEY_STATE_ACTIVE;
      }
      int64_t until_ms = k.value("until_unix_ms", int64_t{0});
      e->state = st;
      e->state_reason = k.value("reason", "");
      e->state_since = absl::FromUnixMillis(k.value("since_unix_ms", int64_t{0}));
      e->state_until = until_ms == 0 ? absl::InfinitePast() : absl::FromUnixMillis(until_ms);
      e->state_status = k.value("status", 0);
      e->state_message = k.value("message", "");
      e->state_actor = k.value("actor", "");
      e->forbidden_models.clear();
      if (k.contains("forbidden_models") && k["forbidden_models"].is_array()) {
        for (const auto& m : k["forbidden_models"]) {
          if (m.is_string()) e->forbidden_models.push_back(m.get<std::string>());
        }
      }
      e->request_count = k.value("request_count", uint64_t{0});
      int64_t last_ms = k.value("last_used_unix_ms", int64_t{0});
      e->last_used = last_ms == 0 ? absl::InfinitePast() : absl::FromUnixMillis(last_ms);
      e->prompt_tokens = k.value("prompt_tokens", uint64_t{0});
      e->completion_tokens = k.value("completion_tokens", uint64_t{0});
      std::string learned = k.value("learned_account", "");
      if (!e->account_explicit && absl::StartsWith(learned, "acct:")) e->account = learned;
      } catch (const nlohmann::json::exception&) {
        e->state = v1::KEY_STATE_ACTIVE;
        e->state_until = absl::InfinitePast();
      }
    }
  }
  auto blocks = state.find("blocks");
  if (blocks != state.end()) blocks_.Restore(*blocks, now);
  RebuildActive();
  BumpVersion(Change{0, true, {}, true});
}

uint64_t KeyRegistry::state_generation() const {
  MutexLock lock(&mu_);
  return state_generation_;
}

KeyRegistry::Counts KeyRegistry::GetCounts() const {
  Counts out;
  MutexLock lock(&mu_);
  for (const auto& e : keys_) ++out.keys_by_state[e->state];
  for (const v1::ScopeBlock& b : blocks_.All()) ++out.blocks_by_phase[b.phase()];
  out.cooldowns_started = blocks_.cooldowns_started();
  return out;
}

uint64_t KeyRegistry::leased_total() const {
  MutexLock lock(&mu_);
  return leased_total_;
}

std::map<uint64_t, std::string> KeyRegistry::AccountsById() const {
  std::map<uint64_t, std::string> out;
  MutexLock lock(&mu_);
  for (const auto& e : keys_) out[e->id] = e->account;
  return out;
}

std::vector<v1::ScopeBlock> KeyRegistry::Blocks() const {
  MutexLock lock(&mu_);
  return blocks_.All();
}

void KeyRegistry::FillUpstreamKey(const Entry& e, v1::UpstreamKey* out) {
  out->set_id(e.id);
  out->set_secret(e.secret);
  out->set_fingerprint(e.fingerprint);
  out->set_account(e.account);
  out->set_state(e.state);
  out->set_index(e.index);
  if (e.state_until != absl::InfinitePast()) *out->mutable_state_until() = ToProtoTime(e.state_until);
  for (const std::string& m : e.forbidden_models) out->add_forbidden_models(m);
}

void KeyRegistry::FillStatus(const Entry& e, v1::KeyStatus* out) {
  out->set_index(e.index);
  out->set_id(e.id);
  out->set_masked(e.masked);
  out->set_fingerprint(e.fingerprint);
  out->set_account(e.account);
  out->set_state(e.state);
  out->set_state_reason(e.state_reason);
  *out->mutable_state_since() = ToProtoTime(e.state_since);
  if (e.state_until != absl::InfinitePast()) *out->mutable_state_until() = ToProtoTime(e.state_until);
  out->set_request_count(e.request_count);
  if (e.last_used != absl::InfinitePast()) *out->mutable_last_used() = ToProtoTime(e.last_used);
  out->set_prompt_tokens(e.prompt_tokens);
  out->set_completion_tokens(e.completion_tokens);
  *out->mutable_added_at() = ToProtoTime(e.added_at);
  for (const std::string& m : e.forbidden_models) out->add_forbidden_models(m);
  out->set_state_status(e.state_status);
  out->set_state_message(e.state_message);
  out->set_state_actor(e.state_actor);
}

v1::Snapshot KeyRegistry::BuildSnapshot() const {
  v1::Snapshot out;
  MutexLock lock(&mu_);
  out.set_version(version_);
  out.set_epoch(epoch_);
  out.mutable_keys()->Reserve(static_cast<int>(keys_.size()));
  for (const auto& e : keys_) FillUpstreamKey(*e, out.add_keys());
  for (v1::ScopeBlock& b : blocks_.All()) *out.add_blocks() = std::move(b);
  return out;
}

bool KeyRegistry::BuildUpdate(uint64_t known_version, v1::WatchResponse* out) const {
  {
    MutexLock lock(&mu_);
    if (known_version == version_) return false;
    // Retained history covers (known_version, version_] iff the oldest retained step is
    // known_version + 1 or older.
    bool covered = known_version < version_ && !changes_.empty() &&
                   changes_.front().version <= known_version + 1;
    if (covered) {
      absl::flat_hash_set<uint64_t> ids;
      bool full = false;
      bool blocks = false;
      for (const Change& c : changes_) {
        if (c.version <= known_version) continue;
        if (c.full) {
          full = true;
          break;
        }
        ids.insert(c.upserted.begin(), c.upserted.end());
        blocks = blocks || c.blocks;
      }
      if (!full) {
        v1::SnapshotDelta* delta = out->mutable_delta();
        delta->set_from_version(known_version);
        delta->set_version(version_);
        for (uint64_t id : ids) {
          auto it = by_id_.find(id);
          if (it == by_id_.end()) {
            delta->add_removed_ids(id);
          } else {
            FillUpstreamKey(*it->second, delta->add_upserted());
          }
        }
        if (blocks) {
          delta->set_blocks_changed(true);
          for (v1::ScopeBlock& b : blocks_.All()) *delta->add_blocks() = std::move(b);
        }
        return true;
      }
    }
  }
  *out->mutable_snapshot() = BuildSnapshot();
  return true;
}

void KeyRegistry::WaitForChange(uint64_t known_version, absl::Duration timeout) const {
  absl::Time deadline = absl::Now() + timeout;
  MutexLock lock(&mu_);
  while (version_ == known_version) {
    if (!changed_.WaitWithDeadline(&mu_, deadline)) return;
  }
}

uint64_t KeyRegistry::version() const {
  MutexLock lock(&mu_);
  return version_;
}

size_t KeyRegistry::size() const {
  MutexLock lock(&mu_);
  return keys_.size();
}

std::vector<v1::KeyStatus> KeyRegistry::ListKeys(v1::KeyState filter) const {
  std::vector<v1::KeyStatus> out;
  MutexLock lock(&mu_);
  out.reserve(keys_.size());
  for (const auto& e : keys_) {
    if (filter != v1::KEY_STATE_UNSPECIFIED && e->state != filter) continue;
    out.emplace_back();
    FillStatus(*e, &out.back());
  }
  return out;
}

void KeyRegistry::FillStats(v1::GetStatsResponse* out) const {
  MutexLock lock(&mu_);
  out->set_total_keys(static_cast<uint32_t>(keys_.size()));
  out->set_active_keys(static_cast<uint32_t>(active_.size()));
  uint64_t total = 0;
  for (const auto& e : keys_) {
    total += e->request_count;
    FillStatus(*e, out->add_keys());
  }
  out->set_total_requests(total);
  out->set_snapshot_version(version_);
  out->set_leased_total(leased_total_);
  for (v1::ScopeBlock& b : blocks_.All()) *out->add_blocks() = std::move(b);
}

absl::StatusOr<uint64_t> KeyRegistry::Resolve(const std::string& reference) const {
  MutexLock lock(&mu_);
  absl::string_view ref = reference;
  uint64_t number;
  if (absl::ConsumePrefix(&ref, "id:")) {
    if (absl::SimpleAtoi(ref, &number) && by_id_.contains(number)) return number;
    return absl::NotFoundError(absl::StrCat("no key with id ", ref));
  }
  if (absl::SimpleAtoi(ref, &number) && ref.size() < 6) {
    if (number < keys_.size()) return keys_[number]->id;
    return absl::NotFoundError(
        absl::StrCat("no key at index ", number, " (there are ", keys_.size(), ")"));
  }
  std::string prefix = absl::AsciiStrToLower(ref);
  if (prefix.size() < 6) {
    return absl::InvalidArgumentError(
        "a key reference is an index, a fingerprint (6+ hex digits) or id:N");
  }
  const Entry* found = nullptr;
  for (const auto& e : keys_) {
    if (absl::StartsWith(e->fingerprint, prefix)) {
      if (found != nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("fingerprint prefix '", prefix, "' matches more than one key"));
      }
      found = e.get();
    }
  }
  if (found == nullptr) return absl::NotFoundError(absl::StrCat("no key with fingerprint ", prefix));
  return found->id;
}

}  // namespace sflb
