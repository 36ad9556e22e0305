#include "dataplane/key_pool.h"

#include <algorithm>
#include <cmath>

#include "absl/random/random.h"
#include "absl/time/clock.h"

namespace sflb {
namespace {

bool IsEligible(const PoolKey& key) { return key.state == v1::KEY_STATE_ACTIVE; }

bool Contains(const std::vector<uint64_t>& ids, uint64_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

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
  return out;
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
  absl::flat_hash_map<uint64_t, std::shared_ptr<const PoolKey>> upserts;
  for (const v1::UpstreamKey& key : delta.upserted()) upserts[key.id()] = MakeKey(key);
  std::vector<uint64_t> removed(delta.removed_ids().begin(), delta.removed_ids().end());
  view->keys.reserve(current->keys.size());
  for (const auto& key : current->keys) {
    if (Contains(removed, key->id)) continue;
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

PickResult KeyPool::Pick(const std::vector<uint64_t>& exclude) {
  PickResult result;
  MutexLock lock(&mu_);
  ++picks_in_window_;
  if (view_ == nullptr) {
    result.failure = PickFailure::kNoSnapshot;
    return result;
  }
  if (view_->keys.empty()) {
    result.failure = PickFailure::kNoKeys;
    return result;
  }
  while (!lease_.empty()) {
    uint64_t id = lease_.front();
    lease_.pop_front();
    auto it = view_->by_id.find(id);
    if (it == view_->by_id.end() || !IsEligible(*it->second) || Contains(exclude, id)) continue;
    result.key = it->second;
    result.from_lease = true;
    break;
  }
  if (result.key == nullptr) {
    const auto& eligible = view_->eligible;
    for (size_t tried = 0; tried < eligible.size(); ++tried) {
      const auto& candidate = eligible[local_cursor_++ % eligible.size()];
      if (!Contains(exclude, candidate->id)) {
        result.key = candidate;
        break;
      }
    }
  }
  if (result.key == nullptr) result.failure = PickFailure::kNoneEligible;
  if (lease_.size() < BatchSize() / 2) lease_need_.Signal();
  return result;
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
