// ResponseStream: one committed, streamed upstream response on its way to the client: the
// exchange it is read from, the key that serves it, its request record, and the bookkeeping of
// what was forwarded (bytes, SSE event boundary, usage). Shared by the two ways a stream is
// driven: a pool thread through httplib's content provider (Proxy), or an event loop
// (StreamRelay). Used by one thread at a time; handed between threads with a happens-before
// edge (a queue under a mutex).
#ifndef SFLB_DATAPLANE_RESPONSE_STREAM_H_
#define SFLB_DATAPLANE_RESPONSE_STREAM_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/optional.h"
#include "dataplane/dataplane_metrics.h"
#include "dataplane/key_pool.h"
#include "dataplane/report_buffer.h"
#include "dataplane/request_record.h"
#include "dataplane/upstream_client.h"

namespace sflb {

class ResponseStream {
 public:
  // `metrics` may be null. Counts the stream as active (metrics) until Finish().
  ResponseStream(std::unique_ptr<UpstreamExchange> exchange, std::shared_ptr<const PoolKey> key,
                 ReportBuffer* reports, std::shared_ptr<RequestRecord> record,
                 DataplaneMetrics* metrics, bool sse);
  ResponseStream(const ResponseStream&) = delete;
  ResponseStream& operator=(const ResponseStream&) = delete;
  // Finishes if Finish() was not called.
  ~ResponseStream();

  UpstreamExchange* exchange() { return exchange_.get(); }
  RequestRecord& record() { return *record_; }
  bool sse() const { return sse_; }

  // Accounts for body bytes about to be sent to the client: counts them and, for SSE, reads
  // usage from "data:" lines (the last one seen wins) and tracks event boundaries.
  void Forwarded(absl::string_view data);

  // How a stream that cannot go on ends, for `error` from reading the upstream (CANCELLED
  // with `aborting` means the replica's drain deadline; CANCELLED otherwise, the client left).
  // Records why in the request record and logs a broken upstream. Returns the bytes to send
  // as the body's last piece (an SSE error event, preceded by a blank line if an event was cut
  // in the middle) before ending it well-formed, or nullopt when the body has to be cut
  // (not SSE, or the client is gone).
  absl::optional<std::string> Ending(const absl::Status& error, bool aborting);

  // The stream is over (whatever way): usage to the record and the controlplane reports,
  // metrics, the upstream connection back to the pool if its body was read completely (else
  // closed), the request record released (its log line is written once nobody holds it).
  // Idempotent.
  void Finish();

 private:
  // True when the bytes forwarded so far end between two events.
  bool AtEventBoundary() const;

  std::unique_ptr<UpstreamExchange> exchange_;
  std::shared_ptr<const PoolKey> key_;
  ReportBuffer* const reports_;
  std::shared_ptr<RequestRecord> record_;
  DataplaneMetrics* const metrics_;
  const bool sse_;
  bool finished_ = false;
  std::string tail_;  // last bytes forwarded (at most 4)
  std::string line_;  // current partial SSE line
  bool have_usage_ = false;
  uint64_t prompt_tokens_ = 0;
  uint64_t completion_tokens_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_RESPONSE_STREAM_H_
