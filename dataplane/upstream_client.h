// UpstreamClient: the dataplane's HTTP/1.1 client towards SiliconFlow, with a keep-alive pool.
//
// Unlike httplib::Client it splits an exchange in two steps: Send() writes the request and
// returns once the response head is in, so the caller can inspect status and headers (and retry
// on another key) before committing anything to its own client; then ReadSome() streams the body
// piece by piece as it arrives (SSE), without buffering it whole.
//
// I/O: non-blocking sockets and poll(); every wait has a deadline and is sliced so a caller's
// `should_abort` is polled regularly; a CancelToken wakes a blocked wait at once (it shuts the
// socket down). TLS uses OpenSSL over a socket BIO that sends with MSG_NOSIGNAL, so neither
// plain nor TLS writes raise SIGPIPE even if the process does not ignore it.
//
// Not covered by any timeout: the DNS lookup (getaddrinfo blocks; results are cached for
// `dns_cache_ttl`). The request is written fully before the response is read: a server that
// answers early (413) and resets the connection is reported as a write error.
#ifndef SFLB_DATAPLANE_UPSTREAM_CLIENT_H_
#define SFLB_DATAPLANE_UPSTREAM_CLIENT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "dataplane/http_wire.h"

namespace sflb {

// A parsed SILICONFLOW_BASE_URL, e.g. "https://api.siliconflow.cn/v1" ->
// {tls=true, host="api.siliconflow.cn", port=443, base_path="/v1"}.
struct UpstreamEndpoint {
  bool tls = true;
  std::string host;  // lower-case DNS name or IP literal, IPv6 without brackets
  int port = 443;
  std::string base_path;  // "" or "/v1": no trailing '/'

  // The Host header value: host (IPv6 in brackets) plus ":port" unless the scheme's default.
  std::string HostHeader() const;
  // "https://host:port" (for logs; no path).
  std::string Origin() const;
};

// Parses "http[s]://host[:port][/path]". Accepts IPv6 literals ("http://[::1]:8080"), trims
// surrounding whitespace and trailing '/' of the path. INVALID_ARGUMENT for: other schemes,
// missing host, user info, bad port, query or fragment.
absl::StatusOr<UpstreamEndpoint> ParseBaseUrl(absl::string_view url);

struct UpstreamClientOptions {
  // TCP connect plus TLS handshake (total, across all resolved addresses).
  absl::Duration connect_timeout = absl::Seconds(10);
  // Writing the whole request (head and body).
  absl::Duration write_timeout = absl::Seconds(60);
  // From the request being written until the response head is complete.
  absl::Duration first_byte_timeout = absl::Minutes(10);
  // Longest silence between body bytes while ReadSome waits.
  absl::Duration idle_timeout = absl::Minutes(5);
  // How often a blocked wait re-checks `should_abort` (and the cancel flag, as a fallback).
  absl::Duration abort_poll_interval = absl::Seconds(1);
  // Most keep-alive connections kept idle in the pool; beyond it released connections close.
  size_t max_idle_connections = 512;
  // Pooled connections idle longer than this are closed instead of reused. Keep it below the
  // server's keep-alive timeout.
  absl::Duration idle_connection_ttl = absl::Seconds(50);
  // How long resolved addresses are reused before getaddrinfo runs again (0 = no cache).
  absl::Duration dns_cache_ttl = absl::Seconds(30);
  // TLS: verify the server certificate against the system CA store (plus `ca_file`) and its
  // name against the endpoint host. Turn off only for tests.
  bool verify_tls = true;
  // Optional extra CA bundle (PEM), e.g. a private or test CA.
  std::string ca_file;
};

struct UpstreamRequest {
  std::string method;  // "GET", "POST", ...
  // Origin-form target: base_path + path + optional "?query", joined by the caller.
  std::string target;
  // End-to-end headers sent as-is, in order. The client owns and drops Host, Content-Length,
  // Transfer-Encoding, Connection, Keep-Alive, Proxy-Connection, TE, Upgrade and Expect; it adds
  // Host, Content-Length (when there is a body or the method is POST/PUT/PATCH) and
  // "Connection: keep-alive".
  std::vector<HttpHeader> headers;
  // The body, possibly empty. The caller keeps it alive until Send returns.
  absl::string_view body;
};

// Cancels Send/ReadSome calls from another thread (a TTFB watchdog, a shutdown). Create one per
// logical client request with std::make_shared and pass it to every Send for that request
// (retries on other keys included); Cancel() makes all of them, pending or future, fail with
// CANCELLED promptly. Thread-safe.
class CancelToken {
 public:
  CancelToken() = default;
  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;

  // Idempotent. Wakes blocked waits at once by shutting down the sockets in use.
  void Cancel();
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

 private:
  friend class UpstreamCancelAccess;
  // While registered, Cancel() shuts `fd` down. Unregister before the fd is closed or pooled.
  void Register(int fd);
  void Unregister(int fd);

  std::atomic<bool> cancelled_{false};
  Mutex mu_;
  std::vector<int> fds_ ABSL_GUARDED_BY(mu_);
};

namespace upstream_internal {
struct Connection;
struct Shared;
}  // namespace upstream_internal

// One in-flight exchange, returned by UpstreamClient::Send with the response head already read.
// Not thread-safe, except Cancel(). May outlive the UpstreamClient that created it.
class UpstreamExchange {
 public:
  UpstreamExchange(const UpstreamExchange&) = delete;
  UpstreamExchange& operator=(const UpstreamExchange&) = delete;
  // Returns the connection to the pool if the body was read completely (or is already fully
  // buffered), the server allows keep-alive and nothing was cancelled; closes it otherwise.
  ~UpstreamExchange();

  const ResponseHead& head() const { return head_; }

  // Reads the next piece of the decoded body (chunked framing removed). The view is valid until
  // the next call or destruction; an empty view means the body is complete (then every later
  // call returns an empty view too). Returns as soon as some bytes arrive, so SSE events are
  // forwarded as produced. `should_abort` is polled at least every abort_poll_interval while
  // waiting for data; true -> CANCELLED.
  // Errors (final; the connection is closed and later calls return FAILED_PRECONDITION):
  // DEADLINE_EXCEEDED (no byte for idle_timeout),
  // UNAVAILABLE (reset or EOF mid-body, TLS error), INTERNAL (malformed chunked framing),
  // CANCELLED (should_abort or the cancel token).
  absl::StatusOr<absl::string_view> ReadSome(const std::function<bool()>& should_abort = nullptr);

  // For an event loop (one thread owns the exchange): like ReadSome but never waits. Returns a
  // piece, or an empty view that means either "complete" (body_complete() is true) or "nothing
  // ready yet": then `*wait` says what to wait for on fd() (kRead, or kWrite when TLS needs to
  // write first). No timeout applies: the caller tracks the idle time itself. Same errors as
  // ReadSome except DEADLINE_EXCEEDED.
  enum class Wait { kNone, kRead, kWrite };
  absl::StatusOr<absl::string_view> TryReadSome(Wait* wait);
  // For an exchange from UpstreamClient::StartInLoop (one thread drives it): writes the rest
  // of the request and reads the response head, never waiting. True once head() is complete
  // (then use TryReadSome); false while `*wait` says what fd() must become first. No timeout
  // applies: the caller tracks write and first-byte deadlines itself. Errors as Send's; after
  // one, stale() tells whether the pooled connection failed before any response byte (the
  // server had closed it): the request may then be sent again on a fresh connection.
  absl::StatusOr<bool> TryCompleteHead(Wait* wait);
  bool stale() const { return stale_; }
  // The failure was this exchange's own non-blocking connect (StartInLoop without a pooled
  // connection): a worker should open a connection instead (it tries every address).
  bool connect_failed() const { return connect_failed_; }
  // The connection (TCP and TLS) is not established yet.
  bool connecting() const {
    return pending_ != nullptr && (pending_->connecting || pending_->handshaking);
  }
  // The response head is complete (always, for an exchange from Send).
  bool head_complete() const { return pending_ == nullptr; }
  // The whole request has been written.
  bool request_written() const {
    return pending_ == nullptr || pending_->written == pending_->wire.size() + pending_->body.size();
  }
  // The socket of this exchange's connection (for epoll), or -1 once it was closed.
  int fd() const;

  // Thread-safe, idempotent: makes a blocked or later ReadSome return CANCELLED promptly.
  // Equivalent to cancel_token()->Cancel().
  void Cancel();
  // The token this exchange obeys (the one passed to Send, or one Send created). A watchdog
  // should hold this shared_ptr rather than the exchange pointer.
  const std::shared_ptr<CancelToken>& cancel_token() const { return cancel_; }

  // The body has been read completely (ReadSome returned an empty view, or there is none).
  bool body_complete() const { return body_done_; }
  // The connection was reused from the pool rather than freshly connected.
  bool reused_connection() const { return reused_; }

 private:
  friend class UpstreamClient;
  friend class UpstreamExchangeIo;
  UpstreamExchange(std::shared_ptr<upstream_internal::Shared> shared,
                   std::unique_ptr<upstream_internal::Connection> conn,
                   std::shared_ptr<CancelToken> cancel, bool reused);

  // Consumes body bytes already in the buffer, without I/O, as far as they go.
  void ConsumeBuffered();
  absl::Status Fail(absl::Status status);
  // The connection ended: the body's end (until-close framing) or an error.
  absl::StatusOr<absl::string_view> AtEof();
  // ReadSome (wait == null: blocks, polling should_abort) or TryReadSome (never blocks).
  absl::StatusOr<absl::string_view> ReadPiece(const std::function<bool()>* should_abort,
                                              Wait* wait);

  // The request still being written and the head being read (StartInLoop exchanges only).
  struct Pending {
    bool connecting = false;   // a non-blocking connect is in progress
    bool handshaking = false;  // the TLS handshake is in progress
    std::string wire;        // serialized head (plus the body when it went in one piece)
    absl::string_view body;  // the rest of the body; the caller keeps it alive
    size_t written = 0;      // bytes of wire + body sent
    bool head_request = false;
    bool got_bytes = false;  // some response byte arrived
    size_t scan = 0;
    int interim = 0;
  };

  std::shared_ptr<upstream_internal::Shared> shared_;
  std::unique_ptr<Pending> pending_;
  bool stale_ = false;
  bool connect_failed_ = false;
  std::shared_ptr<CancelToken> cancel_;  // declared before conn_: the connection refers to it
  std::unique_ptr<upstream_internal::Connection> conn_;
  bool reused_ = false;
  ResponseHead head_;
  ChunkedDecoder chunked_;
  uint64_t remaining_ = 0;  // kContentLength: body bytes not yet returned
  bool body_done_ = false;
  bool failed_ = false;
  // Read buffer: bytes [begin_, end_) are received but not yet consumed.
  std::unique_ptr<char[]> buf_;
  size_t cap_ = 0;
  size_t begin_ = 0;
  size_t end_ = 0;
};

// Thread-safe; one per upstream endpoint, shared by all request threads. Exchanges may outlive
// the client (they keep its pool alive).
class UpstreamClient {
 public:
  // Builds the TLS context (if endpoint.tls). A bad `ca_file` shows up as an error of the first
  // Send and in init_status().
  UpstreamClient(UpstreamEndpoint endpoint, UpstreamClientOptions options);
  ~UpstreamClient();
  UpstreamClient(const UpstreamClient&) = delete;
  UpstreamClient& operator=(const UpstreamClient&) = delete;

  // OK, or why the client cannot work (TLS context or CA file). Cheap.
  absl::Status init_status() const;
  const UpstreamClientOptions& options() const;
  const UpstreamEndpoint& endpoint() const;

  // Takes a pooled connection (or connects: getaddrinfo, non-blocking connect, TLS handshake
  // with SNI and hostname verification), writes the request and reads the response head,
  // skipping 1xx interim responses. If a reused pooled connection fails before any response
  // byte arrives (the server closed a stale keep-alive connection), retries once on a fresh one.
  // Only UNAVAILABLE (EOF, reset) qualifies, never a timeout or cancellation; a server that
  // takes a request and closes without answering a byte would see it twice (accepted: that is
  // indistinguishable from the keep-alive race, which is far more common). Taking a pooled
  // connection first drops it if the server already closed it (poll for EOF, no blocking).
  // `should_abort` is polled at least every abort_poll_interval while waiting; `cancel` (may be
  // null: one is created) cancels from another thread.
  // Errors (messages name the phase and cause, never header values): INVALID_ARGUMENT (request
  // fields that would corrupt the framing), UNAVAILABLE (DNS, connect, reset, EOF, TLS),
  // DEADLINE_EXCEEDED (connect/write/first-byte timeout), CANCELLED, INTERNAL (malformed
  // response head), FAILED_PRECONDITION (see init_status()).
  absl::StatusOr<std::unique_ptr<UpstreamExchange>> Send(
      const UpstreamRequest& request, const std::function<bool()>& should_abort = nullptr,
      std::shared_ptr<CancelToken> cancel = nullptr);

  // For an event loop: takes a pooled keep-alive connection, or when none is idle starts a
  // non-blocking connect to the cached upstream address, and prepares `request` on it; drive the
  // exchange with TryCompleteHead (which also completes the connect and the TLS handshake).
  // Returns null (OK) when nothing is pooled and no address is cached (resolving blocks) or the
  // connect fails at once: the caller then opens a connection on a thread (Open). `request.body` must stay alive until the head is complete. A pooled connection
  // that fails before any response byte (UpstreamExchange::stale()) should be retried through
  // Send; CountStaleRetry() then counts it as Send's own retries are counted. Errors:
  // INVALID_ARGUMENT (as Send), FAILED_PRECONDITION (see init_status()).
  absl::StatusOr<std::unique_ptr<UpstreamExchange>> StartInLoop(
      const UpstreamRequest& request, std::shared_ptr<CancelToken> cancel);
  // For a worker thread serving an event loop: like StartInLoop, on a new connection (DNS,
  // connect, TLS handshake: blocking, with the connect timeout and `cancel`); the loop then
  // drives the exchange with TryCompleteHead. Errors: those of Send's connect phase.
  absl::StatusOr<std::unique_ptr<UpstreamExchange>> Open(const UpstreamRequest& request,
                                                         std::shared_ptr<CancelToken> cancel);
  void CountStaleRetry();

  struct Stats {
    uint64_t connects = 0;         // new connections established (TLS handshake included)
    uint64_t reuses = 0;           // requests sent on a pooled connection
    uint64_t stale_retries = 0;    // transparent retries after a reused connection failed
    uint64_t tls_resumptions = 0;  // handshakes that resumed a cached TLS session
    size_t idle_now = 0;           // connections idle in the pool right now
  };
  Stats GetStats() const;

 private:
  absl::StatusOr<std::unique_ptr<UpstreamExchange>> Start(const UpstreamRequest& request,
                                                          std::shared_ptr<CancelToken> cancel,
                                                          bool pooled_only);

  std::shared_ptr<upstream_internal::Shared> shared_;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_UPSTREAM_CLIENT_H_
