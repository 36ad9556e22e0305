// StreamRelay: the dataplane's event loops (epoll). They hold every client connection that
// waits for its next request, serve proxied requests themselves, and relay committed streamed
// responses, so that a request costs no thread hand-off and a stream no thread.
//
// Requests: a connection waiting for its next request sits in a loop (HttpServer parks it
// there, new connections before their first request too). When a request arrives the loop
// reads it; if it is a proxied API request that needs nothing of httplib (HTTP/1.1, a
// Content-Length body or none, no Expect, no percent-encoded path, authenticated; see
// LoopAdmission) the loop serves it: a ProxyCall picks keys and applies the retry rules (a
// stream's first byte included), and the upstream exchange runs without blocking on a pooled
// keep-alive connection or a new one the loop connects itself (TLS handshake included); only
// when the upstream address is not cached (or the cached one fails) a worker thread resolves
// and opens the connection, and the loop continues with it. Every other request goes
// back to a server thread with the bytes read so far (HttpServer::ResumeConnection), where
// httplib serves it as before.
//
// Streams: a stream the loop serves is relayed in place once committed. One a server thread
// serves (a request the loops leave to it, e.g. HTTP/1.0) costs the thread only until its
// first body byte (the retry window, see Proxy); then the handler hands the client connection
// (HttpServer::DetachConnection) and the upstream exchange to the relay and returns. A loop
// thread forwards each upstream piece to the client as it arrives (re-framed as chunked unless
// its length is known), with backpressure (a client that reads slowly pauses reading its
// upstream), and ends every stream well-formed where it can: final chunk after the upstream's
// last byte, an SSE error event when the upstream breaks, stalls past the idle timeout or the
// replica reaches its drain deadline. A client that leaves cancels its upstream at once.
//
// Thread-safe. Every connection, socket and timer belongs to one loop thread; Adopt() and Park()
// pass a connection to a loop through a locked queue and an eventfd wake-up, and worker threads
// return their results the same way.
#ifndef SFLB_DATAPLANE_STREAM_RELAY_H_
#define SFLB_DATAPLANE_STREAM_RELAY_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/http_server.h"
#include "dataplane/elastic_thread_pool.h"
#include "dataplane/http_wire.h"
#include "dataplane/proxy.h"
#include "dataplane/request_record.h"
#include "dataplane/response_stream.h"

namespace sflb {

struct StreamRelayOptions {
  // Loop threads (each with its own epoll set); streams are spread round robin.
  int threads = 1;
  // Longest upstream silence inside a body; the stream then ends with an SSE error event.
  absl::Duration idle_timeout = absl::Minutes(5);
  // Longest time a client may leave sent bytes unread; it is then disconnected.
  absl::Duration write_timeout = absl::Seconds(60);
  // How long a connection waits for the client's next request after a stream.
  absl::Duration keep_alive_timeout = absl::Seconds(60);
  // Bytes queued for a client beyond which its upstream is not read until it catches up.
  size_t max_pending_bytes = 256 * 1024;
  // How often timeouts and the abort flag are checked.
  absl::Duration tick = absl::Milliseconds(100);
  // Serving requests in the loops (see the file comment): the longest a request may take to
  // arrive once its first byte did, and the largest body served in a loop (larger ones go to
  // a server thread, which answers 413).
  absl::Duration read_timeout = absl::Seconds(60);
  size_t max_body_bytes = 32 * 1024 * 1024;
  // The longest wait for an upstream response head (after the request was written).
  absl::Duration first_byte_timeout = absl::Minutes(10);
  // Most worker threads that run attempts needing a new upstream connection.
  size_t max_workers = 1024;
};

// Decides whether a loop serves a request (complete head and body, already checked to need
// nothing of httplib): returns its record (request id, client, path filled in), or null to
// hand the request to a server thread (sflb's own endpoints, failed authentication, anything
// httplib must answer). `path` is the target's path (no query); `peer_ip` the socket's peer.
// Called on loop threads; must not block.
using LoopAdmission = std::function<std::shared_ptr<RequestRecord>(
    const RequestHead& head, absl::string_view path, absl::string_view body,
    const std::string& peer_ip)>;

class StreamRelay {
 public:
  // `server` must outlive the relay. `aborting` (called on loop threads) turns true at the
  // replica's drain deadline: every stream then ends with an SSE "shutting down" event.
  StreamRelay(StreamRelayOptions options, HttpServer* server, std::function<bool()> aborting);
  // With `proxy` and `admit` the loops also serve requests (see the file comment), and
  // Park() takes connections; `proxy` must outlive the relay.
  StreamRelay(StreamRelayOptions options, HttpServer* server, Proxy* proxy, LoopAdmission admit);
  // Stop().
  ~StreamRelay();
  StreamRelay(const StreamRelay&) = delete;
  StreamRelay& operator=(const StreamRelay&) = delete;

  // Called from the route handler that committed to `stream`: detaches the handler's client
  // connection and relays from then on. `head` is sent first: the response head and any body
  // bytes already framed (the caller accounted for them with stream->Forwarded). With
  // `keep_alive` false the connection closes after the stream. Returns false, with nothing
  // taken or written, when the connection cannot be detached; the caller then streams itself.
  bool Adopt(std::unique_ptr<ResponseStream>& stream, std::string head, bool keep_alive);

  // HttpServer's park handler: takes a connection that waits for its next request. False
  // (nothing taken) when the loops do not serve requests or are stopping.
  bool Park(int fd);

  // Ends every stream and connection the relay holds (streams are cut, their records say
  // "server_shutdown") and joins the loop threads. Idempotent. For the end of the process,
  // after the server has stopped listening and draining.
  void Stop();

 private:
  class Loop;

  const StreamRelayOptions options_;
  HttpServer* const server_;
  Proxy* const proxy_ = nullptr;
  const LoopAdmission admit_;
  const std::function<bool()> aborting_;
  // Attempts that need a new upstream connection (null unless the loops serve requests).
  std::unique_ptr<ElasticThreadPool> workers_;
  std::vector<std::unique_ptr<Loop>> loops_;
  std::atomic<size_t> next_loop_{0};
  std::atomic<bool> stopped_{false};
};

// Appends `data` as one chunk of a chunked body ("<hex size>\r\n<data>\r\n"); nothing for
// empty data (an empty chunk would end the body).
void AppendChunk(absl::string_view data, std::string* out);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_STREAM_RELAY_H_
