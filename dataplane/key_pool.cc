#include "dataplane/key_pool.h"

#include <algorithm>
#include <cmath>

#include "absl/random/random.h"
#include "absl/time/clock.h"
#include "common/time_format.h"

namespace sflb {
namespace {

bool IsEligible(const PoolKey& key) { return key.state == v1::KEY_STATE_ACTIVE; }

template <typename T>
bool Contains(const std::vector<T>& items, const T& item) {
  return std::find(items.begin(), items.end(), item) != items.end();
}

constexpr char kAll[] = "*";
// While connected, a local block only bridges the time until the controlplane's block arrives.
constexpr absl::Duration kLocalOverlap = absl::Seconds(5);
constexpr absl::Duration kLostProbe = absl::Seconds(60);

}  // namespace

KeyPool::KeyPool() : KeyPool(Options()) {}

KeyPool::KeyPool(Options options) : options_(options), window_start_(absl::Now()) {
  // Replicas start their local fallback at different places so they do not all hit key 0.
  absl::BitGen gen;
  local_cursor_ = absl::Uniform<uint64_t>(gen, 0, 1u << 20);
}

std::shared_ptr<const PoolKey> KeyPool::MakeKey(const v1::UpstreamKey& key) {
  auto out = std::make_shared<PoolKey>();
  out->id = key.id();
  out->secret = key.secret();
  out->fingerprint = key.fingerprint();
  out->account = key.account();
  out->state = key.state();
  out->index = key.index();
  if (key.has_state_until()) out->state_until = FromProtoTime(key.state_until());
  out->forbidden_models.assign(key.forbidden_models().begin(), key.forbidden_models().end());
  return out;
}

void KeyPool::CopyBlocks(const google::protobuf::RepeatedPtrField<v1::ScopeBlock>& blocks,
                         KeySetView* view) {
  view->blocks.clear();
  for (const v1::ScopeBlock& b : blocks) {
    view->blocks[{b.account(), b.model()}] =
        Block{b.phase(), FromProtoTime(b.until()), b.probe_replica()};
  }
}

void KeyPool::Index(KeySetView* view) {
  view->by_id.clear();
  view->eligible.clear();
  view->by_id.reserve(view->keys.size());
  for (const auto& key : view->keys) {
    view->by_id[key->id] = key;
    if (IsEligible(*key)) view->eligible.push_back(key);
  }
}

void KeyPool::ApplySnapshot(const v1::Snapshot& snapshot) {
  auto view = std::make_shared<KeySetView>();
  view->version = snapshot.version();
  view->epoch = snapshot.epoch();
  view->keys.reserve(static_cast<size_t>(snapshot.keys_size()));
  for (const v1::UpstreamKey& key : snapshot.keys()) view->keys.push_back(MakeKey(key));
  Index(view.get());
  CopyBlocks(snapshot.blocks(), view.get());
  auto keys = std::make_shared<const std::vector<std::shared_ptr<const PoolKey>>>(view->keys);
  MutexLock lock(&mu_);
  if (view_ != nullptr && view_->epoch != view->epoch) {
    // A new controlplane incarnation: our leases were cut from a sequence that is gone.
    lease_.clear();
  }
  view_ = std::move(view);
  keys_ = std::move(keys);
}

bool KeyPool::ApplyDelta(const v1::SnapshotDelta& delta) {
  std::shared_ptr<const KeySetView> current;
  {
    MutexLock lock(&mu_);
    current = view_;
  }
  if (current == nullptr || current->version != delta.from_version()) return false;
  auto view = std::make_shared<KeySetView>();
  view->version = delta.version();
  view->epoch = current->epoch;
  if (delta.blocks_changed()) {
    CopyBlocks(delta.blocks(), view.get());
  } else {
    view->blocks = current->blocks;
  }
  absl::flat_hash_map<uint64_t, std::shared_ptr<const PoolKey>> upserts;
  for (const v1::UpstreamKey& key : delta.upserted()) upserts[key.id()] = MakeKey(key);
  std::vector<uint64_t> removed(delta.removed_ids().begin(), delta.removed_ids().end());
  auto removed_contains = [&removed](uint64_t id) { return Contains(removed, id); };
  view->keys.reserve(current->keys.size());
  for (const auto& key : current->keys) {
    if (removed_contains(key->id)) continue;
    auto it = upserts.find(key->id);
    if (it != upserts.end()) {
      view->keys.push_back(it->second);
      upserts.erase(it);
    } else {
      view->keys.push_back(key);
    }
  }
  for (auto& [id, key] : upserts) view->keys.push_back(key);  // new keys (rare in deltas)
  std::sort(view->keys.begin(), view->keys.end(),
            [](const auto& a, const auto& b) { return a->index < b->index; });
  Index(view.get());
  auto keys = std::make_shared<const std::vector<std::shared_ptr<const PoolKey>>>(view->keys);
  MutexLock lock(&mu_);
  if (view_ != current) return false;  // raced with another update; caller resyncs
  view_ = std::move(view);
  keys_ = std::move(keys);
  return true;
}

void KeyPool::AddLease(const v1::LeaseResponse& lease) {
  MutexLock lock(&mu_);
  for (uint64_t id : lease.key_ids()) lease_.push_back(id);
}

void KeyPool::ClearLease() {
  MutexLock lock(&mu_);
  lease_.clear();
}

uint32_t KeyPool::BatchSize() {
  double want = picks_per_second_ * absl::ToDoubleSeconds(options_.lease_horizon);
  return static_cast<uint32_t>(std::clamp<double>(std::ceil(want), options_.min_lease,
                                                  options_.max_lease));
}

KeyPool::Verdict KeyPool::JudgeBlock(const Scope& scope, absl::Time now, absl::Time* until) {
  // This replica's own recent 429 wins over the snapshot: the controlplane may not have heard
  // of it yet (e.g. a probe that just failed while the snapshot still says half-open).
  auto local = local_blocks_.find(scope);
  if (local != local_blocks_.end()) {
    absl::Time end = connected_ ? std::min(local->second.until, local->second.created + kLocalOverlap)
                                : local->second.until;
    if (now < end) {
      *until = std::max(*until, end);
      return Verdict::kBlocked;
    }
  }
  auto it = view_->blocks.find(scope);
  if (it == view_->blocks.end()) return Verdict::kUse;
  const Block& b = it->second;
  if (b.phase == v1::BLOCK_PHASE_COOLING && now < b.until) {
    *until = std::max(*until, b.until);
    return Verdict::kBlocked;
  }
  // Half-open (or cooling that ended and awaits the controlplane's probe assignment): only the
  // named replica may send one probe.
  bool mine = b.phase == v1::BLOCK_PHASE_HALF_OPEN && !b.probe_replica.empty() &&
              b.probe_replica == replica_id_;
  auto probing = probing_.find(scope);
  bool in_flight = probing != probing_.end() && now - probing->second < kLostProbe;
  if (!mine || in_flight) {
    *until = std::max(*until, now + absl::Seconds(1));
    return Verdict::kBlocked;
  }
  return Verdict::kProbe;
}

KeyPool::Verdict KeyPool::Judge(const PoolKey& key, const std::string& model, absl::Time now,
                                absl::Time* until, std::vector<Scope>* probe_scopes) {
  if (key.state == v1::KEY_STATE_COOLING && key.state_until != absl::InfinitePast()) {
    *until = std::max(*until, key.state_until);
    return Verdict::kBlocked;
  }
  if (!IsEligible(key)) return Verdict::kUnusable;
  if (!model.empty() && Contains(key.forbidden_models, model)) return Verdict::kUnusable;
  probe_scopes->clear();
  for (const Scope& scope : {Scope{kAll, model}, Scope{kAll, kAll}, Scope{key.account, model},
                             Scope{key.account, kAll}}) {
    absl::Time scope_until = absl::InfinitePast();
    Verdict v = JudgeBlock(scope, now, &scope_until);
    if (v == Verdict::kBlocked) {
      *until = std::max(*until, scope_until);
      probe_scopes->clear();
      return Verdict::kBlocked;
    }
    if (v == Verdict::kProbe) probe_scopes->push_back(scope);
  }
  return probe_scopes->empty() ? Verdict::kUse : Verdict::kProbe;
}

PickResult KeyPool::Pick(const PickRequest& request) {
  MutexLock lock(&mu_);
  ++picks_in_window_;
  return PickLocked(request, /*consume=*/true);
}

PickResult KeyPool::Peek(const PickRequest& request) {
  MutexLock lock(&mu_);
  return PickLocked(request, /*consume=*/false);
}

PickResult KeyPool::PickLocked(const PickRequest& request, bool consume) {
  PickResult result;
  if (view_ == nullptr) {
    result.failure = PickFailure::kNoSnapshot;
    return result;
  }
  if (view_->keys.empty()) {
    result.failure = PickFailure::kNoKeys;
    return result;
  }
  absl::Time now = absl::Now();
  absl::Time earliest = absl::InfiniteFuture();
  bool any_blocked = false;
  std::vector<Scope> probe_scopes;
  auto consider = [&](const std::shared_ptr<const PoolKey>& key, bool avoid_accounts) {
    if (Contains(request.exclude, key->id)) return false;
    if (avoid_accounts && Contains(request.avoid_accounts, key->account)) return false;
    absl::Time until = absl::InfinitePast();
    Verdict v = Judge(*key, request.model, now, &until, &probe_scopes);
    if (v == Verdict::kBlocked) {
      any_blocked = true;
      earliest = std::min(earliest, until);
      return false;
    }
    if (v == Verdict::kUnusable) return false;
    result.key = key;
    if (v == Verdict::kProbe) {
      result.probe = true;
      if (consume) {
        for (const Scope& scope : probe_scopes) probing_[scope] = now;
      }
    }
    return true;
  };
  // Leased assignments first: they are this replica's share of the global sequence. An entry
  // that cannot serve this request is dropped (it would be stale by the time another could).
  while (consume && !lease_.empty()) {
    uint64_t id = lease_.front();
    lease_.pop_front();
    auto it = view_->by_id.find(id);
    if (it == view_->by_id.end()) continue;
    if (consider(it->second, /*avoid_accounts=*/true)) {
      result.from_lease = true;
      break;
    }
  }
  // Local round robin: first avoiding accounts this request saw fail, then any.
  for (int pass = 0; result.key == nullptr && pass < 2; ++pass) {
    const auto& eligible = view_->eligible;
    uint64_t cursor = local_cursor_;
    for (size_t tried = 0; tried < eligible.size(); ++tried) {
      if (consider(eligible[cursor++ % eligible.size()], pass == 0)) break;
    }
    if (consume) local_cursor_ = cursor;
  }
  if (result.key == nullptr) {
    // Keys cooling until a time (operator cooldowns) are not in the round robin, but they make
    // the pool "rate limited until" rather than "out of keys".
    for (const auto& key : view_->keys) {
      if (key->state == v1::KEY_STATE_COOLING && key->state_until > now &&
          !Contains(request.exclude, key->id)) {
        any_blocked = true;
        earliest = std::min(earliest, key->state_until);
      }
    }
    result.failure = PickFailure::kNoneEligible;
    result.rate_limited = any_blocked;
    if (any_blocked) result.retry_at = earliest;
  }
  if (consume && lease_.size() < BatchSize() / 2) lease_need_.Signal();
  return result;
}

void KeyPool::AddLocalBlock(const std::string& account, const std::string& model,
                            absl::Time until) {
  MutexLock lock(&mu_);
  LocalBlock& b = local_blocks_[{account, model}];
  b.until = std::max(b.until, until);
  b.created = absl::Now();
  // Forget expired ones now and then.
  if (local_blocks_.size() > 1024) {
    absl::Time now = absl::Now();
    for (auto it = local_blocks_.begin(); it != local_blocks_.end();) {
      if (it->second.until < now) {
        local_blocks_.erase(it++);
      } else {
        ++it;
      }
    }
  }
}

void KeyPool::ProbeDone(const std::string& account, const std::string& model) {
  MutexLock lock(&mu_);
  for (const Scope& scope : {Scope{account, model}, Scope{account, kAll}, Scope{kAll, model},
                             Scope{kAll, kAll}}) {
    probing_.erase(scope);
  }
}

void KeyPool::SetConnected(bool connected) {
  MutexLock lock(&mu_);
  connected_ = connected;
}

void KeyPool::SetReplicaId(std::string replica_id) {
  MutexLock lock(&mu_);
  replica_id_ = std::move(replica_id);
}

uint32_t KeyPool::WaitForLeaseNeed(absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  MutexLock lock(&mu_);
  for (;;) {
    absl::Time now = absl::Now();
    if (now - window_start_ >= absl::Seconds(1)) {
      double seconds = absl::ToDoubleSeconds(now - window_start_);
      // Smooth the rate so one quiet second does not shrink the batch to the minimum.
      picks_per_second_ = 0.5 * picks_per_second_ + 0.5 * (picks_in_window_ / seconds);
      picks_in_window_ = 0;
      window_start_ = now;
    }
    bool usable = view_ != nullptr && !view_->eligible.empty();
    uint32_t batch = BatchSize();
    if (usable && lease_.size() < batch / 2) return batch;
    if (now >= deadline) return 0;
    lease_need_.WaitWithDeadline(&mu_, std::min(deadline, window_start_ + absl::Seconds(1)));
  }
}

bool KeyPool::has_snapshot() const {
  MutexLock lock(&mu_);
  return view_ != nullptr;
}

uint64_t KeyPool::version() const {
  MutexLock lock(&mu_);
  return view_ == nullptr ? 0 : view_->version;
}

std::string KeyPool::epoch() const {
  MutexLock lock(&mu_);
  return view_ == nullptr ? "" : view_->epoch;
}

size_t KeyPool::key_count() const {
  MutexLock lock(&mu_);
  return view_ == nullptr ? 0 : view_->keys.size();
}

size_t KeyPool::eligible_count() const {
  MutexLock lock(&mu_);
  return view_ == nullptr ? 0 : view_->eligible.size();
}

size_t KeyPool::leased_remaining() const {
  MutexLock lock(&mu_);
  return lease_.size();
}

std::shared_ptr<const std::vector<std::shared_ptr<const PoolKey>>> KeyPool::keys() const {
  MutexLock lock(&mu_);
  return keys_;
}

}  // namespace sflb
