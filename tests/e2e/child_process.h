// ChildProcess: runs one of sflb's binaries (or the fake upstream) for an end-to-end test, with
// its stdout and stderr captured in a log file the test can search.
#ifndef SFLB_TESTS_E2E_CHILD_PROCESS_H_
#define SFLB_TESTS_E2E_CHILD_PROCESS_H_

#include <sys/types.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace sflb::e2e {

// Not thread-safe; owned by one test. The destructor kills the process if it still runs.
class ChildProcess {
 public:
  ChildProcess() = default;
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Starts `binary args...` with exactly `env` as its environment (plus PATH and the
  // sanitizer options of the test process), output appended to `log_path`.
  absl::Status Start(const std::string& binary, const std::vector<std::string>& args,
                     const std::map<std::string, std::string>& env, const std::string& log_path);

  // Waits until a JSON log line satisfies `predicate`; returns it. DEADLINE_EXCEEDED on timeout,
  // FAILED_PRECONDITION if the process exits first.
  absl::StatusOr<nlohmann::json> WaitForLog(const std::function<bool(const nlohmann::json&)>& predicate,
                                            absl::Duration timeout);
  // Waits for the {"event":"listening","port":N} line and returns N.
  absl::StatusOr<int> WaitForListening(absl::Duration timeout = absl::Seconds(30));

  // Sends a signal. No-op if not running.
  void Signal(int sig);
  // Waits up to `timeout` for exit; returns the exit code (128+signal if killed), or
  // DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  // SIGTERM, then SIGKILL after `grace`. Returns the exit code.
  int Stop(absl::Duration grace = absl::Seconds(10));
  bool running();

  // Everything the process wrote so far.
  std::string ReadLog() const;
  // Every line of the log that parses as a JSON object.
  std::vector<nlohmann::json> LogLines() const;
  const std::string& log_path() const { return log_path_; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int exit_code_ = -1;
  std::string log_path_;
};

// Runs a command to completion (e.g. sflbctl) and captures stdout and stderr separately.
struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
CommandResult RunCommand(const std::string& binary, const std::vector<std::string>& args,
                         const std::map<std::string, std::string>& env,
                         absl::Duration timeout = absl::Seconds(60));

// A fresh directory under TEST_TMPDIR or /tmp, removed by nobody (ctest runs are short-lived;
// logs stay for post-mortems).
std::string MakeTempDir(const std::string& prefix);

// Writes `content` to `path` atomically (temp file + rename).
void WriteFileAtomically(const std::string& path, const std::string& content);

}  // namespace sflb::e2e

#endif  // SFLB_TESTS_E2E_CHILD_PROCESS_H_
