// Structured logging: one JSON object per line on stderr.
//
//   LogInfo("listening", {{"address", "0.0.0.0:3000"}});
//   -> {"ts":"2026-11-26T13:00:00.123Z","level":"info","component":"dataplane","event":"listening","address":"0.0.0.0:3000"}
//
// Field values are JSON-escaped, so client-supplied text cannot forge lines. Callers must never
// pass a secret: log keys by fingerprint or mask (common/key_format.h). Thread-safe; a line is
// written with one write(2) so lines from several threads never interleave.
#ifndef SFLB_COMMON_LOG_H_
#define SFLB_COMMON_LOG_H_

#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace sflb {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Process-wide settings; call once at startup before other threads log.
void SetLogComponent(std::string component);
void SetMinLogLevel(LogLevel level);
// Parses "debug", "info", "warning"/"warn", "error". Returns false for anything else.
bool ParseLogLevel(absl::string_view text, LogLevel* level);

// Writes one line if `level` is at or above the minimum. `fields` must be a JSON object (or
// null); its members follow the fixed ones.
void LogEvent(LogLevel level, absl::string_view event, const nlohmann::json& fields = nullptr);

inline void LogDebug(absl::string_view event, const nlohmann::json& fields = nullptr) {
  LogEvent(LogLevel::kDebug, event, fields);
}
inline void LogInfo(absl::string_view event, const nlohmann::json& fields = nullptr) {
  LogEvent(LogLevel::kInfo, event, fields);
}
inline void LogWarning(absl::string_view event, const nlohmann::json& fields = nullptr) {
  LogEvent(LogLevel::kWarning, event, fields);
}
inline void LogError(absl::string_view event, const nlohmann::json& fields = nullptr) {
  LogEvent(LogLevel::kError, event, fields);
}

// Writes an already-built JSON object as one line (request logs build their own objects).
void WriteLogLine(const nlohmann::ordered_json& object);
// Writes a complete line (JSON object and '\n') with one write(2) under the process's stderr
// lock, so it never lands inside another line or batch. The caller escaped it.
void WriteRawLogLine(absl::string_view line);

// Buffered lines, for logs written once per request: instead of one write(2) per line, lines
// are collected in order and written together by a background thread at least every
// `flush_interval` (sooner once 64 KiB are pending), which takes a syscall off every request.
// Lines still pending when the process dies without StopLogBuffering() are lost; lines of
// other log calls may come out ahead of buffered lines written before them (each has its ts),
// but buffered lines never come out of order.
//
// StartLogBuffering: a zero interval, or never calling it, writes each line at once. Call at
// most once per StopLogBuffering, before other threads log.
void StartLogBuffering(absl::Duration flush_interval);
// Writes everything pending and ends the background thread; later lines are written at once.
// Idempotent.
void StopLogBuffering();
// Like WriteRawLogLine, through the buffer while buffering is on. Thread-safe.
void WriteBufferedLogLine(absl::string_view line);
// Appends `value` as a JSON string literal (quotes included), escaping quotes, backslashes and
// control characters; invalid UTF-8 bytes become U+FFFD so the line stays valid JSON.
void AppendJsonString(absl::string_view value, std::string* out);

}  // namespace sflb

#endif  // SFLB_COMMON_LOG_H_
