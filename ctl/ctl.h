// sflbctl: the operator's command line for sflb-controlplane's AdminService.
//
//   sflbctl <command> [args] [--flags]
//
// The whole CLI is RunCtl(), a function that returns the exit code, so tests drive it without
// a process. Commands live in one table in ctl.cc ({name, usage, summary, flags, handler}):
// adding a command is adding an entry. Every command that talks to the controlplane prints
// either an aligned table for people or, with --json, the RPC response as one JSON object.
//
//   stats                      pool totals, the key table, the rate-limit blocks
//   keys [--state STATE]       the keys with state, time left and why
//   keys show KEY              one key in detail, the blocks on it, why it is (not) used
//   keys disable|enable KEY    operator state changes; keys cooldown KEY --duration 5m
//   reload                     re-read the key source
//   balance [--refresh]        account balances per key, with a total
//   audit [--since T] [--limit N] [--follow]
//                              the audit log, one line per entry; --follow keeps tailing it
//   health [--http URL]        grpc.health.v1 check of the controlplane (no admin key), or a
//                              plain HTTP GET, for container health checks without curl
//   help, version
//
// KEY is an index ("3"), a fingerprint or a unique prefix of it (6+ hex digits), or "id:N".
#ifndef SFLB_CTL_CTL_H_
#define SFLB_CTL_CTL_H_

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "common/options.h"

namespace sflb {

// Exit codes of sflbctl (also listed by `sflbctl help`).
enum CtlExitCode : int {
  kCtlOk = 0,
  // The controlplane refused the operation (e.g. a reload that found no usable key).
  kCtlFailed = 1,
  // Unknown command or flag, bad value, wrong number of arguments.
  kCtlUsage = 2,
  // UNAVAILABLE or DEADLINE_EXCEEDED: wrong --server, or the controlplane is down or stuck.
  kCtlUnreachable = 3,
  // UNAUTHENTICATED or PERMISSION_DENIED: the admin key was rejected.
  kCtlAuthFailed = 4,
  // No admin key in LB_ADMIN_KEY or --admin-key-file.
  kCtlNoAdminKey = 5,
};

// Runs one sflbctl invocation. `args` are the command-line arguments without the program name
// (argv[1..]). Settings come from `args` first, then from `env` (SFLB_CONTROLPLANE,
// LB_ADMIN_KEY). Results go to `out`, diagnostics ("sflbctl: <what>") to `err`. Never prints
// the admin key. Returns a CtlExitCode. Thread-compatible: concurrent calls are fine as long
// as they use different streams.
int RunCtl(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err);

// The same, with the end of long-running commands (`audit --follow`) under the caller's control:
// they stop, exiting 0, once `stop_requested` returns true. It is called from the calling
// thread, between polls and about every 100 ms while a poll waits (so it may look at `out`).
// The four-argument RunCtl stops them on SIGINT or SIGTERM instead.
int RunCtl(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err, const std::function<bool()>& stop_requested);

// ---- Formatting helpers, public so they can be tested on their own. ----

// How long ago `when` was, relative to `now`: "never" for absl::InfinitePast(), "just now"
// under a second, else "3s ago", "4m ago", "2h ago", "5d ago"; a future time reads "in 42s".
std::string FormatTimeAgo(absl::Time when, absl::Time now);

// The time `audit --since` means: an RFC 3339 time ("2026-11-26T13:00:00Z",
// "2026-11-26T14:00:00.5+01:00"), a date ("2026-11-26", midnight UTC), or a duration ago
// relative to `now` ("1h", "30m", "1h30m", "90s"). Nullopt for anything else.
absl::optional<absl::Time> ParseSinceTime(absl::string_view text, absl::Time now);

// A compact duration: "42s", "3m07s", "1h02m", "2d03h". Negative durations print as "0s".
std::string FormatShortDuration(absl::Duration d);

// Word-wraps `text` (newlines count as spaces, runs of spaces collapse) into lines of at most
// `width` display columns including `indent`, each prefixed by `indent` and ended by "\n".
// A word longer than the line stays whole on a line of its own. Empty text gives "".
std::string WrapText(absl::string_view text, size_t width, absl::string_view indent = "");

// An aligned text table for terminals:
//
//   INDEX  KEY         REQUESTS
//   0      sk-ab…wxyz        12
//   1      sk-cd…1234         3
//   -----  ----------  --------
//   TOTAL                    15
//
// Columns are padded to their widest cell, counted in UTF-8 code points (masks contain "…"),
// and separated by two spaces. Right-aligned columns suit numbers. When every header is empty
// no header line is printed, which makes it a two-column "label: value" list as well.
// Not thread-safe.
class TextTable {
 public:
  enum class Align { kLeft, kRight };
  struct Column {
    std::string header;
    Align align = Align::kLeft;
  };

  explicit TextTable(std::vector<Column> columns);

  // Adds a row. Missing trailing cells print empty; extra cells are ignored.
  void AddRow(std::vector<std::string> cells);
  // Sets the totals row, printed after a rule. Empty cells stay blank.
  void SetTotals(std::vector<std::string> cells);
  // Writes the header, the rows and the totals (if set), each line prefixed by `indent`.
  // Trailing spaces are trimmed.
  void Print(std::ostream& out, absl::string_view indent = "") const;

 private:
  std::vector<Column> columns_;
  std::vector<std::vector<std::string>> rows_;
  std::vector<std::string> totals_;
  bool has_totals_ = false;
};

}  // namespace sflb

#endif  // SFLB_CTL_CTL_H_
