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

#include "absl/time/time.h"
#include "common/cooldown_policy.h"
#include "common/mutex.h"
#include "dataplane/dataplane_metrics.h"
#include "dataplane/key_pool.h"
#include "dataplane/report_buffer.h"
#include "dataplane/request_record.h"
#include "dataplane/upstream_client.h"
#include "httplib.h"

namespace sflb {

class StreamRelay;

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
