#include "common/log.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
#include "common/mutex.h"
#include "common/time_format.h"

namespace sflb {
namespace {

std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
// Set once at startup, before threads start; read-only afterwards.
std::string* g_component = new std::string("sflb");

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "info";
}

// Every write to stderr holds this: a batch of lines is larger than a pipe writes atomically
// (4 KiB), and another thread's line must not land inside it.
Mutex& StderrMutex() {
  static Mutex* mu = new Mutex();
  return *mu;
}

// Writes all of `data` to stderr; the caller holds StderrMutex().
void WriteAllToStderr(absl::string_view data) {
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // stderr gone: nothing sensible to do
    p += n;
    left -= static_cast<size_t>(n);
  }
}

// The buffer behind WriteBufferedLogLine. One instance for the process, never destroyed (a
// line may be written while the process exits).
class LogBuffer {
 public:
  void Start(absl::Duration interval) {
    if (interval <= absl::ZeroDuration()) return;
    MutexLock lock(&mu_);
    if (on_) return;
    on_ = true;
    stop_ = false;
    interval_ = interval;
    thread_ = std::thread([this] { FlushLoop(); });
  }

  void Stop() {
    std::thread thread;
    {
      MutexLock lock(&mu_);
      if (!on_ || stop_) return;
      stop_ = true;
      wake_.SignalAll();
      thread = std::move(thread_);
    }
    thread.join();
    Flush(/*turn_off=*/true);
  }

  // False when buffering is off: the caller writes the line itself.
  bool Add(absl::string_view line) {
    bool flush_here = false;
    {
      MutexLock lock(&mu_);
      if (!on_) return false;
      pending_.append(line.data(), line.size());
      if (pending_.size() >= kSoonBytes) wake_.Signal();
      // The writer thread cannot keep up: the producer writes, which bounds the memory.
      flush_here = pending_.size() >= kMaxBytes;
    }
    if (flush_here) Flush();
    return true;
  }

 private:
  static constexpr size_t kSoonBytes = 64 * 1024;
  static constexpr size_t kMaxBytes = 4 * 1024 * 1024;

  void FlushLoop() {
    for (;;) {
      {
        MutexLock lock(&mu_);
        if (stop_) return;
        if (pending_.size() < kSoonBytes) wake_.WaitWithTimeout(&mu_, interval_);
        if (stop_) return;
      }
      Flush();
    }
  }

  // Writes what is pending. Chunks are taken and written under the stderr mutex, so they come
  // out whole and in the order their lines were added. `turn_off` ends buffering in the same
  // step, so a line written at once afterwards (it waits for the stderr mutex) follows them.
  void Flush(bool turn_off = false) {
    MutexLock write_lock(&StderrMutex());
    {
      MutexLock lock(&mu_);
      if (turn_off) on_ = false;
      if (pending_.empty()) return;
      writing_.swap(pending_);
    }
    WriteAllToStderr(writing_);
    writing_.clear();
  }

  std::string writing_;  // only touched under StderrMutex()
  Mutex mu_;  // taken after StderrMutex(), never before
  CondVar wake_;
  bool on_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration interval_ ABSL_GUARDED_BY(mu_);
  std::string pending_ ABSL_GUARDED_BY(mu_);
  std::thread thread_ ABSL_GUARDED_BY(mu_);
};

LogBuffer& TheLogBuffer() {
  static LogBuffer* buffer = new LogBuffer();
  return *buffer;
}

}  // namespace

void StartLogBuffering(absl::Duration flush_interval) { TheLogBuffer().Start(flush_interval); }

void StopLogBuffering() { TheLogBuffer().Stop(); }

void WriteBufferedLogLine(absl::string_view line) {
  if (!TheLogBuffer().Add(line)) WriteRawLogLine(line);
}

void SetLogComponent(std::string component) { *g_component = std::move(component); }

void SetMinLogLevel(LogLevel level) { g_min_level.store(static_cast<int>(level)); }

bool ParseLogLevel(absl::string_view text, LogLevel* level) {
  std::string t = absl::AsciiStrToLower(text);
  if (t == "debug") *level = LogLevel::kDebug;
  else if (t == "info") *level = LogLevel::kInfo;
  else if (t == "warning" || t == "warn") *level = LogLevel::kWarning;
  else if (t == "error") *level = LogLevel::kError;
  else return false;
  return true;
}

void WriteLogLine(const nlohmann::ordered_json& object) {
  std::string line = object.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  line.push_back('\n');
  WriteRawLogLine(line);
}

void AppendJsonString(absl::string_view value, std::string* out) {
  bool plain = true;
  for (char c : value) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u >= 0x7f || c == '"' || c == '\\') {
      plain = false;
      break;
    }
  }
  if (plain) {  // the common case: ids, IPs, paths, fingerprints
    out->push_back('"');
    out->append(value.data(), value.size());
    out->push_back('"');
    return;
  }
  // nlohmann's serializer does the escaping and UTF-8 repair exactly as for other log lines.
  out->append(nlohmann::json(std::string(value)).dump(-1, ' ', false,
                                                      nlohmann::json::error_handler_t::replace));
}

void WriteRawLogLine(absl::string_view line) {
  MutexLock lock(&StderrMutex());
  WriteAllToStderr(line);
}

void LogEvent(LogLevel level, absl::string_view event, const nlohmann::json& fields) {
  if (static_cast<int>(level) < g_min_level.load(std::memory_order_relaxed)) return;
  nlohmann::ordered_json line = nlohmann::ordered_json::object();
  line["ts"] = FormatIso8601(absl::Now());
  line["level"] = LevelName(level);
  line["component"] = *g_component;
  line["event"] = std::string(event);
  if (fields.is_object()) {
    for (auto it = fields.begin(); it != fields.end(); ++it) line[it.key()] = it.value();
  }
  WriteLogLine(line);
}

}  // namespace sflb
