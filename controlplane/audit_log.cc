#include "controlplane/audit_log.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"
#include "common/key_format.h"
#include "common/log.h"
#include "common/time_format.h"

namespace sflb {
namespace {

using json = nlohmann::json;

// Chunk size for reading files forwards, and the first window when searching backwards.
constexpr size_t kReadChunk = 1 << 20;
constexpr uint64_t kFirstTailWindow = 64 << 10;

// Closes a descriptor on scope exit.
class ScopedFd {
 public:
  explicit ScopedFd(int fd = -1) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) close(fd_);
  }
  ScopedFd(ScopedFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  ScopedFd& operator=(ScopedFd&& other) noexcept {
    if (this != &other) {
      if (fd_ >= 0) close(fd_);
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// errno as text; std::error_code's message is thread-safe, unlike strerror().
std::string ErrnoText(int err) { return std::error_code(err, std::generic_category()).message(); }

absl::Status IoError(absl::string_view what, absl::string_view path, int err) {
  return absl::InternalError(absl::StrCat("audit log ", path, ": ", what, ": ", ErrnoText(err)));
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Makes renames and creations in the directory of `path` durable.
absl::Status FsyncDir(const std::string& path) {
  const std::string dir = DirName(path);
  ScopedFd fd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) return IoError("open directory", dir, errno);
  if (fsync(fd.get()) != 0) return IoError("fsync directory", dir, errno);
  return absl::OkStatus();
}

// Reads exactly [offset, offset+length) unless the file is shorter. Returns false on error.
bool PreadAll(int fd, uint64_t offset, size_t length, std::string* out) {
  out->resize(length);
  size_t done = 0;
  while (done < length) {
    ssize_t n = pread(fd, &(*out)[done], length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  out->resize(done);
  return true;
}

absl::optional<absl::Time> ParseTs(absl::string_view text) {
  absl::Time t;
  std::string err;
  if (!absl::ParseTime("%Y-%m-%dT%H:%M:%E*SZ", text, absl::UTCTimeZone(), &t, &err)) {
    return absl::nullopt;
  }
  return t;
}

// A parsed line: a JSON object with an unsigned "seq" and an ISO-8601 "ts".
struct ParsedLine {
  uint64_t seq = 0;
  absl::Time ts;
  json value;
};

absl::optional<ParsedLine> ParseLine(absl::string_view line) {
  ParsedLine out;
  out.value = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (!out.value.is_object()) return absl::nullopt;
  auto seq = out.value.find("seq");
  auto ts = out.value.find("ts");
  if (seq == out.value.end() || !seq->is_number_unsigned() || ts == out.value.end() ||
      !ts->is_string()) {
    return absl::nullopt;
  }
  absl::optional<absl::Time> t = ParseTs(ts->get_ref<const std::string&>());
  if (!t) return absl::nullopt;
  out.seq = seq->get<uint64_t>();
  out.ts = *t;
  return out;
}

// Calls `fn` with each line (without '\n') of the first `length` bytes of `fd`, in order. A
// final segment without '\n' is passed too. Returns false on a read error.
bool ForEachLine(int fd, uint64_t length, const std::function<void(absl::string_view)>& fn) {
  std::string carry;
  std::string chunk;
  uint64_t offset = 0;
  while (offset < length) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(kReadChunk, length - offset));
    if (!PreadAll(fd, offset, want, &chunk)) return false;
    if (chunk.empty()) break;  // The file shrank underneath us.
    offset += chunk.size();
    absl::string_view rest(chunk);
    size_t nl;
    while ((nl = rest.find('\n')) != absl::string_view::npos) {
      if (carry.empty()) {
        fn(rest.substr(0, nl));
      } else {
        carry.append(rest.data(), nl);
        fn(carry);
        carry.clear();
      }
      rest.remove_prefix(nl + 1);
    }
    carry.append(rest.data(), rest.size());
  }
  if (!carry.empty()) fn(carry);
  return true;
}

// The seq of the last parsable line among the first `length` bytes of `fd`, searching backwards
// in growing windows so the usual case reads only the tail.
absl::optional<uint64_t> LastSeqIn(int fd, uint64_t length) {
  uint64_t window = kFirstTailWindow;
  std::string buf;
  while (length > 0) {
    const uint64_t start = length > window ? length - window : 0;
    if (!PreadAll(fd, start, static_cast<size_t>(length - start), &buf)) return absl::nullopt;
    absl::string_view text(buf);
    // Drop the first segment unless it starts the file: it may be the tail of a longer line.
    if (start > 0) {
      size_t nl = text.find('\n');
      text = nl == absl::string_view::npos ? absl::string_view() : text.substr(nl + 1);
    }
    while (!text.empty()) {
      if (text.back() == '\n') text.remove_suffix(1);
      size_t nl = text.rfind('\n');
      absl::string_view line = nl == absl::string_view::npos ? text : text.substr(nl + 1);
      if (absl::optional<ParsedLine> p = ParseLine(line)) return p->seq;
      text = nl == absl::string_view::npos ? absl::string_view() : text.substr(0, nl + 1);
    }
    if (start == 0) break;
    window *= 4;
  }
  return absl::nullopt;
}

// Offset just past the last '\n' among the first `length` bytes of `fd` (0 if none), or -1 on a
// read error.
int64_t EndOfLastLine(int fd, uint64_t length) {
  std::string buf;
  uint64_t end = length;
  while (end > 0) {
    const uint64_t start = end > kReadChunk ? end - kReadChunk : 0;
    if (!PreadAll(fd, start, static_cast<size_t>(end - start), &buf)) return -1;
    size_t nl = buf.rfind('\n');
    if (nl != std::string::npos) return static_cast<int64_t>(start + nl + 1);
    end = start;
  }
  return 0;
}

// Secret scrubbing: "sk-" followed by at least this many letters/digits looks like a key.
constexpr size_t kMinKeyBody = 20;

bool IsKeyChar(char c) { return absl::ascii_isalnum(static_cast<unsigned char>(c)); }

// Replaces key-shaped tokens in `*s`. Returns true if anything was replaced.
bool RedactKeys(std::string* s) {
  bool changed = false;
  size_t pos = 0;
  while ((pos = s->find("sk-", pos)) != std::string::npos) {
    size_t end = pos + 3;
    while (end < s->size() && IsKeyChar((*s)[end])) ++end;
    if (end - pos - 3 >= kMinKeyBody) {
      std::string replacement = absl::StrCat(
          "[redacted key ", KeyFingerprint(absl::string_view(*s).substr(pos, end - pos)), "]");
      s->replace(pos, end - pos, replacement);
      pos += replacement.size();
      changed = true;
    } else {
      pos = end;
    }
  }
  return changed;
}

bool RedactKeys(json* j) {
  bool changed = false;
  if (j->is_string()) {
    changed = RedactKeys(j->get_ptr<std::string*>());
  } else if (j->is_array()) {
    for (json& item : *j) changed |= RedactKeys(&item);
  } else if (j->is_object()) {
    json rebuilt = json::object();
    for (auto& [key, value] : j->items()) {
      changed |= RedactKeys(&value);
      std::string k = key;
      changed |= RedactKeys(&k);
      rebuilt[k] = std::move(value);
    }
    *j = std::move(rebuilt);
  }
  return changed;
}

// JSON text that never throws: invalid UTF-8 (say, from a peer address) becomes U+FFFD.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

AuditLog::AuditLog(AuditLogOptions options) : options_(std::move(options)) {}

AuditLog::~AuditLog() {
  MutexLock lock(&write_mu_);
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(AuditLogOptions options) {
  if (options.path.empty()) return absl::InvalidArgumentError("audit log path is empty");
  if (options.max_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit log ", options.path, ": max_bytes must be > 0"));
  }
  if (options.max_files < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit log ", options.path, ": max_files must be >= 0"));
  }
  if (options.clock == nullptr) options.clock = RealClock::Get();

  std::unique_ptr<AuditLog> log(new AuditLog(std::move(options)));
  const std::string& path = log->options_.path;
  absl::optional<uint64_t> last;
  uint64_t size = 0;
  {
    MutexLock lock(&log->write_mu_);
    absl::Status status = log->EnsureOpenLocked();
    if (!status.ok()) return status;
    size = log->size_;
    last = LastSeqIn(log->fd_, log->size_);
    log->file_first_seqs_.push_back(0);
  }
  // The live file holds no entry (fresh, or rotated just before a crash): continue from the
  // newest rotated file that has one.
  for (int i = 1; !last && i <= log->options_.max_files; ++i) {
    const std::string name = absl::StrCat(path, ".", i);
    ScopedFd fd(open(name.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) {
      if (errno == ENOENT) continue;
      return IoError("open", name, errno);
    }
    struct stat st;
    if (fstat(fd.get(), &st) != 0) return IoError("stat", name, errno);
    last = LastSeqIn(fd.get(), static_cast<uint64_t>(st.st_size));
  }
  {
    MutexLock lock(&log->mu_);
    log->last_seq_ = last.value_or(0);
  }
  LogInfo("audit_log_opened", {{"path", path}, {"bytes", size}, {"last_seq", last.value_or(0)}});
  return log;
}

absl::Status AuditLog::EnsureOpenLocked() {
  if (fd_ >= 0) return absl::OkStatus();
  const std::string& path = options_.path;
  struct stat st;
  const bool existed = stat(path.c_str(), &st) == 0;
  ScopedFd fd(open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0640));
  if (fd.get() < 0) return IoError("open", path, errno);
  if (flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("audit log ", path, " is in use by another process (flock)"));
    }
    return IoError("flock", path, errno);
  }
  if (fstat(fd.get(), &st) != 0) return IoError("stat", path, errno);
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("audit log ", path, " is not a regular file"));
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size > 0) {
    // A torn last line (crash mid-write): that entry was never acknowledged, so cut it away
    // and start the next entry on a fresh line. Everything before the last '\n' stays as is.
    std::string last_byte;
    if (!PreadAll(fd.get(), size - 1, 1, &last_byte) || last_byte.size() != 1) {
      return IoError("read", path, errno);
    }
    if (last_byte[0] != '\n') {
      int64_t keep = EndOfLastLine(fd.get(), size);
      if (keep < 0) return IoError("read", path, errno);
      if (ftruncate(fd.get(), static_cast<off_t>(keep)) != 0) {
        return IoError("truncate torn last line", path, errno);
      }
      if (fdatasync(fd.get()) != 0) return IoError("fsync", path, errno);
      LogWarning("audit_log_torn_line_removed",
                 {{"path", path}, {"dropped_bytes", size - static_cast<uint64_t>(keep)}});
      size = static_cast<uint64_t>(keep);
    }
  }
  if (!existed) {
    absl::Status status = FsyncDir(path);
    if (!status.ok()) return status;
  }
  fd_ = fd.release();
  size_ = size;
  return absl::OkStatus();
}

absl::Status AuditLog::RotateLocked() {
  const std::string& path = options_.path;
  if (options_.max_files == 0) {
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return IoError("unlink", path, errno);
  } else {
    // Shift path.(N-1) -> path.N (replacing the oldest) ... path.1 -> path.2, then path -> path.1.
    for (int i = options_.max_files - 1; i >= 1; --i) {
      const std::string from = absl::StrCat(path, ".", i);
      const std::string to = absl::StrCat(path, ".", i + 1);
      if (rename(from.c_str(), to.c_str()) != 0 && errno != ENOENT) {
        return IoError(absl::StrCat("rename to ", to), from, errno);
      }
    }
    const std::string first = absl::StrCat(path, ".1");
    if (rename(path.c_str(), first.c_str()) != 0) {
      return IoError(absl::StrCat("rename to ", first), path, errno);
    }
  }
  // The old file is gone from `path`: from here on the live file must be a new one.
  close(fd_);
  fd_ = -1;
  size_ = 0;
  {
    // The new live file starts with the entry being appended. Entries of deleted files leave
    // the in-memory tail too.
    MutexLock lock(&mu_);
    file_first_seqs_.push_back(last_seq_ + 1);
    while (file_first_seqs_.size() > static_cast<size_t>(options_.max_files) + 1) {
      file_first_seqs_.pop_front();
    }
    const uint64_t oldest_kept = file_first_seqs_.front();
    while (!recent_.empty() && recent_.front().seq < oldest_kept) recent_.pop_front();
  }
  absl::Status synced = FsyncDir(path);
  if (!synced.ok()) LogWarning("audit_log_rotate_fsync_failed", {{"error", synced.ToString()}});
  absl::Status opened = EnsureOpenLocked();
  if (opened.ok()) LogInfo("audit_log_rotated", {{"path", path}});
  return opened;
}

absl::Status AuditLog::Append(AuditEntry entry, uint64_t* seq_out) {
  if (entry.type.empty()) return absl::InvalidArgumentError("audit entry type is empty");
  if (entry.details.is_null()) entry.details = json::object();
  if (!entry.details.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit entry details must be a JSON object, got ", entry.details.type_name()));
  }
  bool redacted = RedactKeys(&entry.type);
  redacted |= RedactKeys(&entry.actor);
  redacted |= RedactKeys(&entry.details);
  if (redacted) LogWarning("audit_entry_key_redacted", {{"type", entry.type}});

  MutexLock write_lock(&write_mu_);
  absl::Status status = EnsureOpenLocked();
  if (!status.ok()) return status;

  uint64_t seq;
  {
    MutexLock lock(&mu_);
    seq = last_seq_ + 1;
  }
  const absl::Time now = options_.clock->Now();
  // Built by hand to fix the member order (seq and ts first, for people and for `grep`).
  std::string text = absl::StrCat(
      "{\"seq\":", seq, ",\"ts\":\"", FormatIso8601(now), "\",\"type\":", Dump(entry.type),
      ",\"actor\":", Dump(entry.actor), ",\"details\":", Dump(entry.details), "}\n");

  if (size_ > 0 && size_ + text.size() > options_.max_bytes) {
    absl::Status rotated = RotateLocked();
    if (!rotated.ok()) {
      LogWarning("audit_log_rotate_failed", {{"error", rotated.ToString()}});
      status = EnsureOpenLocked();  // Only fails if the old file was renamed already.
      if (!status.ok()) return status;
    }
  }

  const std::string& path = options_.path;
  // One write(2) in practice; the loop only covers a short write (disk full, signal).
  size_t done = 0;
  int err = 0;
  while (done < text.size()) {
    ssize_t n = write(fd_, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (err == 0 && fdatasync(fd_) != 0) err = errno;
  if (err != 0) {
    // Not acknowledged, so it must not stay: cut back to the last complete entry. If even that
    // fails, reopen next time, which cuts any torn tail away.
    const bool write_failed = done < text.size();
    if (ftruncate(fd_, static_cast<off_t>(size_)) != 0 || fdatasync(fd_) != 0) {
      close(fd_);
      fd_ = -1;
    }
    return IoError(write_failed ? "write" : "fsync", path, err);
  }
  size_ += text.size();
  text.pop_back();  // '\n'

  MutexLock lock(&mu_);
  last_seq_ = seq;
  recent_.push_back(Recent{seq, now, std::move(text)});
  while (recent_.size() > options_.recent_entries) recent_.pop_front();
  appended_.SignalAll();
  if (seq_out != nullptr) *seq_out = seq;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<json>> AuditLog::Read(const AuditQuery& query,
                                                 size_t* skipped_lines) const {
  size_t skipped = 0;
  auto matches = [&query](uint64_t seq, absl::Time ts) {
    return seq > query.after_seq && ts >= query.since;
  };

  // Fast path for followers: everything after `after_seq` is in memory.
  {
    MutexLock lock(&mu_);
    const bool nothing_new = query.after_seq >= last_seq_;
    const bool in_memory = !recent_.empty() && query.after_seq + 1 >= recent_.front().seq;
    if (nothing_new || in_memory) {
      std::vector<json> out;
      for (const Recent& r : recent_) {
        if (!matches(r.seq, r.ts)) continue;
        out.push_back(json::parse(r.line, nullptr, /*allow_exceptions=*/false));
      }
      if (query.limit > 0 && out.size() > query.limit) {
        out.erase(out.begin(), out.end() - static_cast<std::ptrdiff_t>(query.limit));
      }
      if (skipped_lines != nullptr) *skipped_lines = 0;
      return out;
    }
  }

  // Snapshot of the file set, oldest first. Open descriptors keep naming the same files even if
  // a rotation renames them later; the live file is read only up to its last complete entry.
  struct FileRef {
    std::string name;
    ScopedFd fd;
    uint64_t length = 0;
  };
  std::vector<FileRef> files;
  {
    MutexLock lock(&write_mu_);
    for (int i = options_.max_files; i >= 1; --i) {
      std::string name = absl::StrCat(options_.path, ".", i);
      ScopedFd fd(open(name.c_str(), O_RDONLY | O_CLOEXEC));
      if (fd.get() < 0) {
        if (errno == ENOENT) continue;
        return IoError("open", name, errno);
      }
      struct stat st;
      if (fstat(fd.get(), &st) != 0) return IoError("stat", name, errno);
      files.push_back(FileRef{std::move(name), std::move(fd), static_cast<uint64_t>(st.st_size)});
    }
    if (fd_ >= 0) {
      ScopedFd fd(open(options_.path.c_str(), O_RDONLY | O_CLOEXEC));
      if (fd.get() < 0) return IoError("open", options_.path, errno);
      files.push_back(FileRef{options_.path, std::move(fd), size_});
    }
  }

  // Newest file first, so that a `limit` or an `after_seq` can stop before the older files.
  std::deque<json> result;
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    std::deque<json> in_file;
    absl::optional<uint64_t> first_seq;
    const size_t room = query.limit > 0 ? query.limit - result.size() : 0;
    bool ok = ForEachLine(it->fd.get(), it->length, [&](absl::string_view line) {
      if (line.empty()) return;
      absl::optional<ParsedLine> p = ParseLine(line);
      if (!p) {
        ++skipped;
        return;
      }
      if (!first_seq) first_seq = p->seq;
      if (!matches(p->seq, p->ts)) return;
      in_file.push_back(std::move(p->value));
      if (room > 0 && in_file.size() > room) in_file.pop_front();
    });
    if (!ok) return IoError("read", it->name, errno);
    for (auto r = in_file.rbegin(); r != in_file.rend(); ++r) result.push_front(std::move(*r));
    if (query.limit > 0 && result.size() >= query.limit) break;
    // Seqs grow from file to file: older files hold only seqs below this file's first one.
    if (query.after_seq > 0 && first_seq && *first_seq <= query.after_seq + 1) break;
  }
  if (skipped > 0) {
    LogWarning("audit_log_unparsable_lines", {{"path", options_.path}, {"lines", skipped}});
  }
  if (skipped_lines != nullptr) *skipped_lines = skipped;
  return std::vector<json>(std::make_move_iterator(result.begin()),
                           std::make_move_iterator(result.end()));
}

uint64_t AuditLog::WaitForAppend(uint64_t after_seq, absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  MutexLock lock(&mu_);
  while (last_seq_ <= after_seq) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) break;
    // Sliced, so that an infinite timeout never overflows the std::chrono arithmetic.
    appended_.WaitWithTimeout(&mu_, std::min(left, absl::Hours(1)));
  }
  return last_seq_;
}

uint64_t AuditLog::last_seq() const {
  MutexLock lock(&mu_);
  return last_seq_;
}

}  // namespace sflb
