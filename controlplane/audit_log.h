// AuditLog: the controlplane's append-only audit trail, one JSON object per line
// (SFLB_AUDIT_LOG).
//
// Every line is {"seq":N,"ts":"2026-11-26T13:00:00.123Z","type":...,"actor":...,"details":{...}}.
// `seq` grows by one per entry and continues across restarts and rotations; `ts` comes from the
// injected clock. An entry is written with one write(2) and fsync'ed before Append() returns OK,
// so an admin operation acknowledged after its Append() is on disk.
//
// Crash safety: a crash (even SIGKILL or power loss) can at worst leave the last line torn; Open()
// cuts a torn tail away (that entry was never acknowledged) and never touches earlier lines.
// Size-based rotation: path -> path.1 -> ... -> path.N (oldest dropped). One process at a time:
// Open() takes an exclusive flock(2) on the file and fails if another process holds it.
//
// Secrets: callers log keys by fingerprint only (common/key_format.h). As a second line of
// defence Append() replaces anything shaped like a SiliconFlow key ("sk-" + 20 or more letters and
// digits) in the entry's strings with "[redacted key <fingerprint>]".
//
// Thread-safe: every method may be called from any thread. Appends are serialised (one writer at
// a time holds the file for its write+fsync); readers never wait for an fsync except for the
// moment Read() takes its snapshot of the file set.
#ifndef SFLB_CONTROLPLANE_AUDIT_LOG_H_
#define SFLB_CONTROLPLANE_AUDIT_LOG_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/mutex.h"
#include "nlohmann/json.hpp"

namespace sflb {

struct AuditLogOptions {
  // The live file. Required; its directory must exist. Rotated files are `path`.1 .. `path`.N.
  std::string path;
  // Rotate before an append would make the live file larger than this. An entry larger than
  // this on its own is still written (into a fresh file). Default 64 MiB; must be > 0.
  uint64_t max_bytes = 64ull << 20;
  // Rotated files kept (path.1 newest .. path.N oldest); 0 = rotation discards the old file.
  // Default 5; must be >= 0.
  int max_files = 5;
  // Source of `ts`. Default: the real clock. Must outlive the log.
  Clock* clock = RealClock::Get();
  // Entries kept in memory so that a follower polling with `after_seq` near the end is served
  // without reading the files. Default 4096.
  size_t recent_entries = 4096;
};

// What an entry says. The log adds `seq` and `ts`.
struct AuditEntry {
  // What happened: "reload", "key_state", "admin_call", "auth_failed", ... Must not be empty.
  std::string type;
  // Who did it: "sflbctl@ipv4:10.0.0.5:51234", "dataplane:dp-1", "SIGHUP", ...
  std::string actor;
  // A JSON object (or null, written as {}). Keys only by fingerprint.
  nlohmann::json details = nlohmann::json::object();
};

// Which entries Read() returns: those with ts >= since AND seq > after_seq; then, if limit > 0,
// only the newest `limit` of them. Always oldest first.
struct AuditQuery {
  absl::Time since = absl::InfinitePast();
  uint64_t after_seq = 0;
  // 0 = no limit (every matching entry of every kept file is returned: callers serving remote
  // clients should set one).
  size_t limit = 0;
};

class AuditLog {
 public:
  // Opens (creating if needed) options.path, cuts a torn last line away (logging a warning),
  // and recovers the last seq from the live file or, if it holds none, from the newest rotated
  // file that does. Errors (INVALID_ARGUMENT for bad options, FAILED_PRECONDITION when another
  // process holds the file, INTERNAL for I/O) name the path.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(AuditLogOptions options);

  // Closes the file. No other call may be in progress or start (wake followers first).
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one entry and returns once it is durably written (write + fsync). On OK, `*seq`
  // (if given) receives the entry's seq. On error nothing was appended (a partial write is cut
  // back), the seq is not consumed, and the caller must not acknowledge the operation:
  // INVALID_ARGUMENT for an empty type or non-object details, INTERNAL for I/O (naming the
  // path). Rotates first when the entry would push the live file past max_bytes; a failed
  // rotation is logged and the entry goes to the current file instead.
  absl::Status Append(AuditEntry entry, uint64_t* seq = nullptr);

  // The entries matching `query`, oldest first, read from the rotated files (oldest first) and
  // the live file; entries appended while Read runs may or may not be included. Lines that are
  // not a JSON object with a numeric seq and an ISO-8601 ts are skipped and counted in
  // `*skipped_lines` (if given). INTERNAL if a file cannot be read (naming it).
  absl::StatusOr<std::vector<nlohmann::json>> Read(const AuditQuery& query,
                                                   size_t* skipped_lines = nullptr) const;

  // Waits until an entry with seq > `after_seq` exists or `timeout` (real time) passes, and
  // returns the last seq (which is <= after_seq on timeout). For `sflbctl audit --follow`: loop
  // { last = WaitForAppend(cursor, 1s); if (last > cursor) { q.after_seq = cursor; Read(q); } },
  // checking between waits whether the stream was cancelled.
  uint64_t WaitForAppend(uint64_t after_seq, absl::Duration timeout) const;

  // The seq of the newest entry (0 if none was ever written).
  uint64_t last_seq() const;
  const std::string& path() const { return options_.path; }

 private:
  struct Recent {
    uint64_t seq = 0;
    absl::Time ts;
    std::string line;  // without '\n'
  };

  explicit AuditLog(AuditLogOptions options);

  // Renames path -> path.1 (shifting older files) and opens a fresh live file. On failure the
  // current file stays in use, unless it was already renamed and no fresh file could be opened
  // (then fd_ == -1 and the next Append retries the open).
  absl::Status RotateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Opens (creating) the live file if fd_ == -1.
  absl::Status EnsureOpenLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);

  const AuditLogOptions options_;

  // Serialises appends and rotation; held across write(2)+fsync on purpose: the file is the
  // shared resource, and seq order must equal file order.
  mutable Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  int fd_ ABSL_GUARDED_BY(write_mu_) = -1;
  // Bytes of complete lines in the live file (what readers may read).
  uint64_t size_ ABSL_GUARDED_BY(write_mu_) = 0;
  // First seq of each file this process wrote to, oldest first, the live file last (0 for the
  // file found at Open: it starts before anything in `recent_`). Lets a rotation drop from
  // `recent_` the entries whose file it deleted, so memory and disk answer alike.
  std::deque<uint64_t> file_first_seqs_ ABSL_GUARDED_BY(write_mu_);

  // Never held across I/O.
  mutable Mutex mu_;
  mutable CondVar appended_;
  uint64_t last_seq_ ABSL_GUARDED_BY(mu_) = 0;
  // The newest entries appended by this process, oldest first, contiguous in seq.
  std::deque<Recent> recent_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_AUDIT_LOG_H_
