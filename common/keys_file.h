// Parsing of keys.txt and of the SILICONFLOW_API_KEY_N environment fallback.
//
// Format, one key per line:
//   sk-xxxxxxxx                  a key; it is its own account (rate-limit scope)
//   sk-yyyyyyyy account=team-a   a key of account "team-a"
//   # comment                    ignored, as are blank lines
// Surrounding whitespace is trimmed and CRLF line ends are accepted. A malformed line is
// reported as "<source>:<line>: <reason>" and skipped; a duplicate key is reported and used once.
#ifndef SFLB_COMMON_KEYS_FILE_H_
#define SFLB_COMMON_KEYS_FILE_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"

namespace sflb {

// One usable key from a key source.
struct KeySpec {
  std::string secret;
  // Empty when the line did not name one (the registry then uses the key's fingerprint).
  std::string account;
  // Where it came from, for messages: "keys.txt:12" or "env:SILICONFLOW_API_KEY_3".
  std::string origin;
};

// The result of reading a key source: the keys in order plus findings that did not stop it.
struct KeySet {
  std::vector<KeySpec> keys;
  // "keys.txt:7: whitespace inside key" and the like. Never contains a key.
  std::vector<std::string> warnings;
  // Path of the file, or "env:SILICONFLOW_API_KEY_N".
  std::string source;
};

// Parses keys.txt content. `source_name` prefixes every warning. Never fails: bad lines become
// warnings. The caller decides whether an empty result is acceptable.
KeySet ParseKeysText(absl::string_view text, absl::string_view source_name);

// Reads SILICONFLOW_API_KEY_1, _2, ... until the first missing number.
KeySet ReadKeysFromEnv(const std::function<absl::optional<std::string>(const std::string&)>& getenv);

// Loads the key source the controlplane uses: `keys_file` if it exists, else the environment
// fallback. Errors: NOT_FOUND when neither yields a source, FAILED_PRECONDITION when the source
// exists but holds no usable key (message lists the warnings), PERMISSION_DENIED/INTERNAL
// for read errors naming the file.
absl::StatusOr<KeySet> LoadKeySource(
    const std::string& keys_file,
    const std::function<absl::optional<std::string>(const std::string&)>& getenv);

}  // namespace sflb

#endif  // SFLB_COMMON_KEYS_FILE_H_
