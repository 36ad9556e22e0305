// Proxy: forwards one authenticated client request to SiliconFlow with a key from the KeyPool,
// retrying on another key while nothing has reached the client yet, and streams the response
// back as it arrives.
//
// Thread-safe: one Proxy serves all request threads; per-request state lives on the stack and
// in the response's content provider.
#ifndef SFLB_DATAPLANE_PROXY_H_
#define SFLB_DATAPLANE_PROXY_H_

#include <atomic>
#include <cstdint>
#include <set>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/cooldown_policy.h"
#include "common/mutex.h"
#include "absl/types/optional.h"
#include "dataplane/dataplane_metrics.h"
#include "dataplane/forwarding.h"
#include "dataplane/key_pool.h"
#include "dataplane/report_buffer.h"
#include "dataplane/request_record.h"
#include "dataplane/upstream_client.h"
#include "httplib.h"

namespace sflb {

class StreamRelay;
class Proxy;

// An answer sflb gives itself (no upstream response was committed).
struct ProxyAnswer {
  int status = 0;
  std::vector<HttpHeader> headers;  // besides Content-Type
  std::string content_type;
  std::string body;
  // Copies the answer into an httplib response.
  void ApplyTo(httplib::Response& res) const;
};

// One client request's way through its upstream attempts: which key each attempt uses, what
// each outcome reports (controlplane, local cooldown, metrics, log), and what the client gets
// when no attempt succeeds. No I/O: the caller performs the exchanges (a request thread with
// blocking I/O, or the event loop without waiting) and feeds the outcomes in, so both ways of
// serving follow the same rules. Used by one thread at a time.
class ProxyCall {
 public:
  // `request` is the upstream request without Authorization (NextAttempt adds it).
  ProxyCall(Proxy* proxy, std::shared_ptr<RequestRecord> record, BodySummary summary,
            UpstreamRequest request);
  ProxyCall(const ProxyCall&) = delete;
  ProxyCall& operator=(const ProxyCall&) = delete;
  // A probe attempt left without an outcome (the request was abandoned) is released.
  ~ProxyCall();

  // Upstream answers that say "this key (or its account) cannot serve this now".
  static bool IsKeyFailure(int status);

  // Picks the key for the next attempt and puts it into the request. False: no attempt is left
  // (the attempt limit, or no usable key); then FinalAnswer() says what the client gets.
  bool NextAttempt();
  const UpstreamRequest& request() const { return request_; }
  const std::shared_ptr<const PoolKey>& key() const { return key_; }
  int attempt() const { return attempt_; }
  RequestRecord& record() { return *record_; }
  const std::shared_ptr<RequestRecord>& shared_record() const { return record_; }
  const BodySummary& summary() const { return summary_; }

  // The attempt's response head arrived (its trace id goes to the record whatever follows).
  void SawHead(const ResponseHead& head);
  // Outcomes; each ends the current attempt.
  // The exchange failed before anything reached the client. `retry_reason` labels the retry
  // metric ("transport", "first_byte_timeout"); `status` is the HTTP status seen, if any.
  void TransportFailed(const absl::Status& error, absl::string_view retry_reason = "transport",
                       int status = 0, absl::string_view log_event = "upstream_transport_error");
  // The upstream refused the key (IsKeyFailure); `body` is its error body as far as it was read
  // (`read` says whether completely).
  void KeyRefused(const ResponseHead& head, std::string body, const absl::Status& read);
  // The attempt's response goes to the client: the record learns status, TTFB and trace id, and
  // a probe reports its success.
  void Commit(const ResponseHead& head);
  // For a committed plain body: usage to the record and the controlplane reports.
  void CountUsage(absl::string_view body);

  // What the client gets when NextAttempt() returned false. Sets the record's status and error.
  ProxyAnswer FinalAnswer();
  // The answer of a replica that is shutting down. Sets the record's status and error.
  ProxyAnswer ShuttingDown();

 private:
  void Report(v1::OutcomeKind kind, int status, std::string message,
              absl::optional<absl::Duration> retry_after);
  void EndProbe();

  Proxy* const proxy_;
  std::shared_ptr<RequestRecord> record_;
  const BodySummary summary_;
  UpstreamRequest request_;
  size_t auth_index_ = 0;
  PickRequest pick_request_;
  PickResult last_pick_;
  std::shared_ptr<const PoolKey> key_;
  bool probe_ = false;
  bool probe_pending_ = false;
  int attempt_ = 0;
  absl::Time attempt_started_;
  // The last upstream answer that was not committed, returned if no attempt succeeds.
  struct Held {
    ResponseHead head;
    std::string body;
  };
  std::unique_ptr<Held> held_;
  absl::Status last_transport_error_;
};

// The response headers a committed upstream response passes to the client (hop-by-hop and
// framing headers dropped), with Content-Type taken out into `*content_type`.
std::vector<HttpHeader> ClientResponseHeaders(const ResponseHead& head, std::string* content_type);

// The reason phrase of a status line sflb writes itself.
const char* StatusReason(int status);

// A response head sflb writes itself: status line, `headers`, Content-Type (unless empty),
// the `framing` header line (e.g. "Transfer-Encoding: chunked"; none if empty), Connection.
std::string ResponseHeadBytes(int status, const std::vector<HttpHeader>& headers,
                              absl::string_view content_type, absl::string_view framing,
                              bool keep_alive);

struct ProxyOptions {
  // Upstream attempts per client request, each on a different key (and, after a 429, a
  // different account).
  int max_attempts = 3;
  // A streamed response whose first body byte does not arrive within this is abandoned and
  // retried on another key (nothing has reached the client yet).
  absl::Duration stream_first_byte_timeout = absl::Seconds(60);
  // Local cooldowns after a 429 (the controlplane's decision replaces them).
  CooldownOptions cooldown;
  // Responses with a Content-Length up to this size are read whole before answering (one
  // write to the client, usage read from the body); larger ones and chunked ones stream.
  size_t buffer_limit = 256 * 1024;
};

class Proxy {
 public:
  // All pointers must outlive the proxy; `metrics` may be null.
  Proxy(ProxyOptions options, UpstreamClient* client, KeyPool* pool, ReportBuffer* reports,
        DataplaneMetrics* metrics = nullptr);

  // Forwards `req` (whose body was read into `body`) to `path` (the client path with any /v1
  // prefix removed) and fills `res`: status and headers always; the body either directly or
  // as a content provider that httplib drives after this returns. Fills `record`; a streamed
  // response keeps it until the stream ends.
  void Forward(const httplib::Request& req, const std::string& path, std::string body,
               const std::shared_ptr<RequestRecord>& record, httplib::Response& res);

  // Streams are handed to `relay` (may be null: each stream keeps its request thread). Call
  // before serving.
  void set_relay(StreamRelay* relay);

  // Shutdown: every request still waiting on the upstream is cancelled (its client gets 503),
  // and every stream ends with an SSE error event at its next wake-up (within about a
  // second). Thread-safe; irreversible.
  void AbortAll();
  bool aborting() const { return aborting_.load(); }

  // The upstream request for a client request: `target` under the upstream base path (one
  // leading /v1 of the client path dropped), the end-to-end headers. `body` must outlive it.
  UpstreamRequest UpstreamRequestFor(absl::string_view method, absl::string_view target,
                                     const std::vector<HttpHeader>& headers,
                                     absl::string_view body) const;

  // Registers a request's cancel token so AbortAll reaches it; Forget when it is done.
  void Track(const std::shared_ptr<CancelToken>& token);
  void Forget(const std::shared_ptr<CancelToken>& token);

  const ProxyOptions& options() const { return options_; }
  UpstreamClient* client() const { return client_; }
  KeyPool* pool() const { return pool_; }
  ReportBuffer* reports() const { return reports_; }
  DataplaneMetrics* metrics() const { return metrics_; }

 private:
  const ProxyOptions options_;
  UpstreamClient* const client_;
  KeyPool* const pool_;
  ReportBuffer* const reports_;
  DataplaneMetrics* const metrics_;
  StreamRelay* relay_ = nullptr;
  std::atomic<bool> aborting_{false};
  Mutex tokens_mu_;
  // Cancel tokens of requests in flight, so AbortAll can reach them.
  std::set<std::shared_ptr<CancelToken>> tokens_ ABSL_GUARDED_BY(tokens_mu_);
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_PROXY_H_
