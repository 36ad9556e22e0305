// Settings from environment variables and --flags, for all three binaries.
//
// Every setting has an environment variable and a --flag of the same meaning; a flag wins over
// the variable, which wins over the default. Secrets (flagged `secret`) are never accepted as a
// flag value, because command lines are visible in `ps`: their flag is `--<name>-file PATH`,
// which reads the value from a file (trailing newline trimmed).
#ifndef SFLB_COMMON_OPTIONS_H_
#define SFLB_COMMON_OPTIONS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"

namespace sflb {

// Looks up an environment variable; nullopt when unset.
using EnvLookup = std::function<absl::optional<std::string>(const std::string&)>;
// The process environment.
EnvLookup ProcessEnv();

// Declares settings bound to caller-owned variables, then fills them. Not thread-safe; use
// once at startup.
class OptionParser {
 public:
  OptionParser(std::string program, std::string summary);

  // Binds a setting. `flag` without dashes ("port"), `env` may be "" for flag-only settings.
  // The variable's current value is the default shown by --help.
  void AddString(std::string flag, std::string env, std::string* target, std::string help);
  // Like AddString, for secrets: env var or --<flag>-file only, never shown in --help output.
  void AddSecret(std::string flag, std::string env, std::string* target, std::string help);
  void AddInt(std::string flag, std::string env, int64_t* target, int64_t min, int64_t max,
              std::string help);
  // Accepts absl durations ("30s", "5m", "250ms") or a plain number of seconds.
  void AddDuration(std::string flag, std::string env, absl::Duration* target, std::string help);
  // Accepts 1/0, true/false, yes/no, on/off.
  void AddBool(std::string flag, std::string env, bool* target, std::string help);

  // Applies the environment, then argv. Returns INVALID_ARGUMENT naming the flag or variable
  // and the bad value for anything malformed or unknown. `--help`/`-h` sets help_requested().
  absl::Status Parse(int argc, const char* const* argv, const EnvLookup& env);

  bool help_requested() const { return help_requested_; }
  // Text for --help: usage line, summary, one line per setting with env var and default.
  std::string Usage() const;

 private:
  enum class Kind { kString, kSecret, kInt, kDuration, kBool };
  struct Option {
    std::string flag;
    std::string env;
    Kind kind;
    void* target;
    int64_t min = 0;
    int64_t max = 0;
    std::string help;
    std::string default_text;
  };
  absl::Status Apply(const Option& option, absl::string_view value, absl::string_view where);
  void Add(Option option);

  std::string program_;
  std::string summary_;
  std::vector<Option> options_;
  bool help_requested_ = false;
};

// Parses "30s", "1m30s", "250ms" or a plain number of seconds ("45", "0.5").
absl::optional<absl::Duration> ParseDurationSetting(absl::string_view text);

}  // namespace sflb

#endif  // SFLB_COMMON_OPTIONS_H_
