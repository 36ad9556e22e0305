#include "dataplane/request_record.h"

#include "absl/random/random.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/time_format.h"
#include "dataplane/dataplane_metrics.h"
#include "nlohmann/json.hpp"

namespace sflb {

RequestRecord::~RequestRecord() {
  if (metrics != nullptr) {
    metrics->RecordRequest(DataplaneMetrics::RouteLabel(path), status, absl::Now() - started,
                           time_to_first_byte, upstream_answered);
    if (have_usage) metrics->RecordTokens(model, prompt_tokens, completion_tokens);
  }
  if (!enabled) return;
  nlohmann::ordered_json line;
  line["ts"] = FormatIso8601(absl::Now());
  line["level"] = "info";
  line["component"] = "dataplane";
  line["event"] = "request";
  line["request_id"] = request_id;
  line["client_ip"] = client_ip;
  line["method"] = method;
  line["path"] = path;
  if (!model.empty()) line["model"] = model;
  line["stream"] = stream;
  line["status"] = status;
  line["attempts"] = attempts;
  line["keys"] = key_fingerprints;
  if (!upstream_trace_id.empty()) line["upstream_trace_id"] = upstream_trace_id;
  if (!error_code.empty()) line["error_code"] = error_code;
  line["request_bytes"] = request_bytes;
  line["response_bytes"] = response_bytes;
  line["ttfb_ms"] = absl::ToDoubleMilliseconds(time_to_first_byte);
  line["total_ms"] = absl::ToDoubleMilliseconds(absl::Now() - started);
  if (have_usage) {
    line["prompt_tokens"] = prompt_tokens;
    line["completion_tokens"] = completion_tokens;
  }
  if (!stream_end.empty()) line["stream_end"] = stream_end;
  WriteLogLine(line);
}

std::string NewRequestId() {
  thread_local absl::BitGen gen;
  return absl::StrFormat("%016x", absl::Uniform<uint64_t>(gen));
}

}  // namespace sflb
