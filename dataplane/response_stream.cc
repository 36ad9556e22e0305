#include "dataplane/response_stream.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/log.h"
#include "dataplane/error_response.h"
#include "dataplane/forwarding.h"

namespace sflb {

ResponseStream::ResponseStream(std::unique_ptr<UpstreamExchange> exchange,
                               std::shared_ptr<const PoolKey> key, ReportBuffer* reports,
                               std::shared_ptr<RequestRecord> record, DataplaneMetrics* metrics,
                               bool sse)
    : exchange_(std::move(exchange)),
      key_(std::move(key)),
      reports_(reports),
      record_(std::move(record)),
      metrics_(metrics),
      sse_(sse) {
  if (metrics_ != nullptr) metrics_->StreamStarted();
}

ResponseStream::~ResponseStream() { Finish(); }

void ResponseStream::Forwarded(absl::string_view data) {
  bytes_ += data.size();
  if (!sse_) return;
  size_t start = 0;
  while (start < data.size()) {
    size_t nl = data.find('\n', start);
    absl::string_view part = data.substr(start, nl == absl::string_view::npos ? data.size() - start
                                                                               : nl - start);
    if (line_.size() + part.size() <= 1024 * 1024) {
      line_.append(part.data(), part.size());
    } else {
      line_.resize(1024 * 1024 + 1);  // too long to be a usage line; keep it marked as such
    }
    if (nl == absl::string_view::npos) break;
    absl::string_view l = line_;
    uint64_t prompt = 0, completion = 0;
    if (absl::ConsumePrefix(&l, "data:") && absl::StrContains(l, "\"usage\"") &&
        ExtractUsage(l, &prompt, &completion)) {
      have_usage_ = true;
      prompt_tokens_ = prompt;
      completion_tokens_ = completion;
    }
    line_.clear();
    start = nl + 1;
  }
  if (data.size() >= 4) {
    tail_.assign(data.data() + data.size() - 4, 4);
  } else {
    tail_.append(data.data(), data.size());
    if (tail_.size() > 4) tail_.erase(0, tail_.size() - 4);
  }
}

bool ResponseStream::AtEventBoundary() const {
  return tail_.empty() || absl::EndsWith(tail_, "\n\n") || absl::EndsWith(tail_, "\r\n\r\n");
}

absl::optional<std::string> ResponseStream::Ending(const absl::Status& error, bool aborting) {
  if (error.code() == absl::StatusCode::kCancelled && aborting) {
    // Drain deadline: end the stream well-formed rather than cutting it.
    record_->stream_end = "server_shutdown";
    if (!sse_) return absl::nullopt;
    return absl::StrCat(AtEventBoundary() ? "" : "\n\n",
                        SseErrorEvent("this sflb replica is shutting down and ended the stream; "
                                      "retry the request",
                                      "service_unavailable", "server_shutting_down"));
  }
  if (error.code() == absl::StatusCode::kCancelled) {
    record_->stream_end = "client_disconnected";
    return absl::nullopt;
  }
  record_->stream_end = "upstream_broken";
  LogWarning("upstream_stream_broken", {{"request_id", record_->request_id},
                                        {"key", key_->fingerprint},
                                        {"bytes", bytes_},
                                        {"error", std::string(error.message())}});
  if (!sse_) return absl::nullopt;  // no way to signal an error inside a plain body: cut it
  // End the stream with a well-formed error event instead of a silent cut.
  return absl::StrCat(AtEventBoundary() ? "" : "\n\n",
                      SseErrorEvent(absl::StrCat("upstream stream interrupted: ", error.message()),
                                    "upstream_error", "stream_interrupted"));
}

void ResponseStream::Finish() {
  if (finished_) return;
  finished_ = true;
  record_->response_bytes = bytes_;
  if (have_usage_) {
    record_->have_usage = true;
    record_->prompt_tokens = prompt_tokens_;
    record_->completion_tokens = completion_tokens_;
    reports_->RecordTokens(key_->id, prompt_tokens_, completion_tokens_);
  }
  if (metrics_ != nullptr) metrics_->StreamEnded();
  exchange_.reset();  // back to the pool if the body was complete
  record_.reset();    // writes the request log line if nobody else holds it
}

}  // namespace sflb
