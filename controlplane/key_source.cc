#include "controlplane/key_source.h"

#include <algorithm>
#include <cstddef>

#include "common/log.h"

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

namespace sflb {

nlohmann::json ReloadAuditDetails(const absl::StatusOr<ReloadOutcome>& outcome, size_t keys_kept) {
  if (!outcome.ok()) {
    return {{"result", "failed"},
            {"error", std::string(outcome.status().message())},
            {"keys_kept", keys_kept}};
  }
  return {{"result", "ok"},
          {"previous", outcome->change.previous_count},
          {"new", outcome->change.new_count},
          {"added", outcome->change.added},
          {"removed", outcome->change.removed},
          {"warnings", outcome->warnings},
          {"source", outcome->source}};
}

void LogReload(const absl::StatusOr<ReloadOutcome>& outcome, size_t keys_kept,
               nlohmann::json context) {
  if (!outcome.ok()) {
    context["error"] = std::string(outcome.status().message());
    context["keys_kept"] = keys_kept;
    LogWarning("reload_failed", context);
    return;
  }
  auto first = [](const std::vector<std::string>& fingerprints) {
    return std::vector<std::string>(
        fingerprints.begin(),
        fingerprints.begin() + static_cast<std::ptrdiff_t>(
                                   std::min(fingerprints.size(), kLoggedFingerprints)));
  };
  context["previous"] = outcome->change.previous_count;
  context["new"] = outcome->change.new_count;
  context["added_count"] = outcome->change.added.size();
  context["added"] = first(outcome->change.added);
  context["removed_count"] = outcome->change.removed.size();
  context["removed"] = first(outcome->change.removed);
  context["warnings"] = outcome->warnings;
  context["source"] = outcome->source;
  LogInfo("keys_reloaded", context);
}

}  // namespace sflb
