#include "controlplane/key_source.h"

namespace sflb {

KeySource::KeySource(std::string keys_file, EnvLookup env, KeyRegistry* registry)
    : keys_file_(std::move(keys_file)), env_(std::move(env)), registry_(registry) {}

absl::StatusOr<ReloadOutcome> KeySource::Reload() {
  MutexLock lock(&reload_mu_);
  absl::StatusOr<KeySet> keys = LoadKeySource(keys_file_, env_);
  if (!keys.ok()) return keys.status();
  ReloadOutcome outcome;
  outcome.change = registry_->Replace(*keys);
  outcome.warnings = std::move(keys->warnings);
  outcome.source = std::move(keys->source);
  current_source_ = outcome.source;
  return outcome;
}

std::string KeySource::current_source() const {
  MutexLock lock(&reload_mu_);
  return current_source_;
}

}  // namespace sflb
