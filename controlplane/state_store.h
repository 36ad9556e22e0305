// StateStore: the controlplane's state file (SFLB_STATE_FILE): key states, counters and
// rate-limit blocks, so a restart does not forget them. Writes are atomic (temp file, fsync,
// rename, directory fsync): a crash leaves the old or the new file, never a torn one.
#ifndef SFLB_CONTROLPLANE_STATE_STORE_H_
#define SFLB_CONTROLPLANE_STATE_STORE_H_

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace sflb {

// Thread-compatible: one writer at a time (the controlplane's maintenance thread).
class StateStore {
 public:
  explicit StateStore(std::string path) : path_(std::move(path)) {}

  // NOT_FOUND when there is no file yet; DATA_LOSS naming the file when it does not parse.
  absl::StatusOr<nlohmann::json> Load() const;
  // Replaces the file atomically. Errors name the path.
  absl::Status Save(const nlohmann::json& state) const;

  const std::string& path() const { return path_; }

 private:
  const std::string path_;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_STATE_STORE_H_
