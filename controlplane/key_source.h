// KeySource: where the controlplane's keys come from (keys file, else SILICONFLOW_API_KEY_N),
// and the one place that loads them into the registry.
#ifndef SFLB_CONTROLPLANE_KEY_SOURCE_H_
#define SFLB_CONTROLPLANE_KEY_SOURCE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
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
