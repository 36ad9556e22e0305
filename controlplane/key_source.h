// KeySource: where the controlplane's keys come from (keys file, else SILICONFLOW_API_KEY_N),
// and the one place that loads them into the registry.
#ifndef SFLB_CONTROLPLANE_KEY_SOURCE_H_
#define SFLB_CONTROLPLANE_KEY_SOURCE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "common/keys_file.h"
#include "common/mutex.h"
#include "common/options.h"
#include "controlplane/key_registry.h"

namespace sflb {

struct ReloadOutcome {
  ReplaceResult change;
  std::vector<std::string> warnings;  // from parsing; never contain keys
  std::string source;
};

// What an audit entry records about a reload: "result": "ok" with the counts, the added and
// removed fingerprints (all of them), the warnings and the source; or "result": "failed" with
// the error and the number of running keys kept (`keys_kept`).
nlohmann::json ReloadAuditDetails(const absl::StatusOr<ReloadOutcome>& outcome, size_t keys_kept);

// Logs a reload ("keys_reloaded", or "reload_failed" as a warning) with `context` (who asked:
// trigger, peer, reason). The fingerprint lists are cut to their first kLoggedFingerprints, with
// the full counts beside them: a 10,000-key reload would otherwise be one 150 KB log line (the
// audit entry keeps them all).
inline constexpr size_t kLoggedFingerprints = 20;
void LogReload(const absl::StatusOr<ReloadOutcome>& outcome, size_t keys_kept,
               nlohmann::json context);

// Thread-safe: reloads are serialised so two concurrent reloads cannot interleave.
class KeySource {
 public:
  // `registry` must outlive this object.
  KeySource(std::string keys_file, EnvLookup env, KeyRegistry* registry);

  // Reads the source and, if it yields at least one key, replaces the registry's key set.
  // On error (unreadable file, no usable key) the registry is untouched and the status says
  // why: FAILED_PRECONDITION / NOT_FOUND / PERMISSION_DENIED / INTERNAL, naming file and lines.
  absl::StatusOr<ReloadOutcome> Reload();

  const std::string& keys_file() const { return keys_file_; }
  // Source of the running key set ("keys.txt", "env:SILICONFLOW_API_KEY_N"); "" before the
  // first successful load.
  std::string current_source() const;

 private:
  const std::string keys_file_;
  const EnvLookup env_;
  KeyRegistry* const registry_;
  mutable Mutex reload_mu_;
  std::string current_source_ ABSL_GUARDED_BY(reload_mu_);
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_KEY_SOURCE_H_
