// StreamRelay: serves committed streamed responses from a few event-loop threads (epoll)
// instead of one thread per stream.
//
// A stream costs a pool thread only until its first body byte (the retry window, see Proxy);
// then the handler hands the client connection (HttpServer::DetachConnection) and the upstream
// exchange to the relay and returns. A loop thread forwards each upstream piece to the client
// as it arrives (re-framed as chunked), with backpressure (a client that reads slowly pauses
// reading its upstream), and ends every stream well-formed where it can: final chunk after the
// upstream's last byte, an SSE error event when the upstream breaks, stalls past the idle
// timeout or the replica reaches its drain deadline. A client that leaves cancels its upstream
// at once. After the last chunk the connection waits in the loop for the client's next request
// (no thread while idle) and goes back to the server (HttpServer::ResumeConnection) when one
// arrives.
//
// Thread-safe. Every stream, socket and timer belongs to one loop thread; Adopt() passes a
// stream to a loop through a locked queue and an eventfd wake-up.
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
};

class StreamRelay {
 public:
  // `server` must outlive the relay. `aborting` (called on loop threads) turns true at the
  // replica's drain deadline: every stream then ends with an SSE "shutting down" event.
  StreamRelay(StreamRelayOptions options, HttpServer* server, std::function<bool()> aborting);
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

  // Ends every stream and connection the relay holds (streams are cut, their records say
  // "server_shutdown") and joins the loop threads. Idempotent. For the end of the process,
  // after the server has stopped listening and draining.
  void Stop();

 private:
  class Loop;

  const StreamRelayOptions options_;
  HttpServer* const server_;
  const std::function<bool()> aborting_;
  std::vector<std::unique_ptr<Loop>> loops_;
  std::atomic<size_t> next_loop_{0};
  std::atomic<bool> stopped_{false};
};

// Appends `data` as one chunk of a chunked body ("<hex size>\r\n<data>\r\n"); nothing for
// empty data (an empty chunk would end the body).
void AppendChunk(absl::string_view data, std::string* out);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_STREAM_RELAY_H_
