#include "common/log.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "absl/strings/ascii.h"
#include "absl/time/clock.h"
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

}  // namespace

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
  const char* data = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, data, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // stderr gone: nothing sensible to do
    data += n;
    left -= static_cast<size_t>(n);
  }
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
