#include "controlplane/key_registry.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
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

KeyRegistry::KeyRegistry(Clock* clock) : clock_(clock), epoch_(NewEpoch()) {}

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
    entry->account = spec.account.empty() ? entry->fingerprint : spec.account;
    entry->index = static_cast<uint32_t>(next.size());
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
  BumpVersion(Change{0, true, {}});
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

void KeyRegistry::ApplyUsage(const v1::ReportRequest& report) {
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
}

bool KeyRegistry::SetState(uint64_t id, v1::KeyState state, std::string reason,
                           absl::Time until) {
  MutexLock lock(&mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return false;
  Entry* e = it->second;
  if (e->state == state && e->state_until == until && e->state_reason == reason) return true;
  bool activity_changed = (e->state == v1::KEY_STATE_ACTIVE) != (state == v1::KEY_STATE_ACTIVE);
  e->state = state;
  e->state_reason = std::move(reason);
  e->state_since = clock_->Now();
  e->state_until = until;
  if (activity_changed) RebuildActive();
  BumpVersion(Change{0, false, {id}});
  return true;
}

void KeyRegistry::FillUpstreamKey(const Entry& e, v1::UpstreamKey* out) {
  out->set_id(e.id);
  out->set_secret(e.secret);
  out->set_fingerprint(e.fingerprint);
  out->set_account(e.account);
  out->set_state(e.state);
  out->set_index(e.index);
  if (e.state_until != absl::InfinitePast()) *out->mutable_state_until() = ToProtoTime(e.state_until);
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
}

v1::Snapshot KeyRegistry::BuildSnapshot() const {
  v1::Snapshot out;
  MutexLock lock(&mu_);
  out.set_version(version_);
  out.set_epoch(epoch_);
  out.mutable_keys()->Reserve(static_cast<int>(keys_.size()));
  for (const auto& e : keys_) FillUpstreamKey(*e, out.add_keys());
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
      for (const Change& c : changes_) {
        if (c.version <= known_version) continue;
        if (c.full) {
          full = true;
          break;
        }
        ids.insert(c.upserted.begin(), c.upserted.end());
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
