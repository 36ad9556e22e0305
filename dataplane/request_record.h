// RequestRecord: what happened to one client request, written as one JSON log line when the
// last holder lets go of it (the handler for plain responses, the stream for streamed ones).
#ifndef SFLB_DATAPLANE_REQUEST_RECORD_H_
#define SFLB_DATAPLANE_REQUEST_RECORD_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace sflb {

class DataplaneMetrics;

// Filled by one request thread at a time (the handler, then the stream provider); no locking.
struct RequestRecord {
  RequestRecord() = default;
  RequestRecord(const RequestRecord&) = delete;
  RequestRecord& operator=(const RequestRecord&) = delete;
  // Records metrics and writes the log line (if `enabled`), both with the same end time.
  ~RequestRecord();

  bool enabled = true;
  std::string request_id;
  absl::Time started;
  std::string client_ip;
  std::string method;
  std::string path;  // without the query string
  std::string model;
  bool stream = false;
  int status = 0;
  int attempts = 0;
  std::vector<std::string> key_fingerprints;
  std::string upstream_trace_id;
  // Set when sflb answered itself (auth failure, no key, upstream unreachable...).
  std::string error_code;
  uint64_t request_bytes = 0;
  uint64_t response_bytes = 0;
  absl::Duration time_to_first_byte = absl::ZeroDuration();
  bool have_usage = false;
  uint64_t prompt_tokens = 0;
  uint64_t completion_tokens = 0;
  // The stream ended early: client gone or upstream broke.
  std::string stream_end;
  // Where the request's metrics go (may be null).
  DataplaneMetrics* metrics = nullptr;
  // The upstream answered (TTFB is meaningful).
  bool upstream_answered = false;
};

// Random 16-hex-digit id (lower case). Thread-safe.
std::string NewRequestId();

// Appends `d` in milliseconds with three decimals, exactly as
// absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(d)) would ("2.346", "0.000", "inf"),
// without going through printf in the common case. The log line's ttfb_ms and total_ms.
void AppendMilliseconds(absl::Duration d, std::string* out);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_REQUEST_RECORD_H_
