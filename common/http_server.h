// HttpServer: httplib::Server with the fixes a server holding thousands of connections needs.
//
//  - httplib listens with a backlog of only 5: a burst of new connections overflows it, the
//    kernel drops SYNs and clients retry a second later. RaiseBacklog() widens it.
//  - httplib waits for the next request on a keep-alive connection by polling every 10 ms
//    (1,000 idle connections cost ~1.5 cores) and does not end those waits on stop(), so a
//    drain takes up to the keep-alive timeout. HttpServer serves each connection itself
//    (overriding httplib's per-connection virtual, then calling httplib's request processing):
//    it waits with one blocking poll, sets TCP_NODELAY (streamed chunks are small writes), and
//    CloseIdleConnections()/CloseConnections() end waits at once.
//  - A streaming handler's sink.is_writable() also notices a peer that closed its side, so a
//    client that left is seen within one chunk.
// Routes, handlers and settings are httplib's as usual.
#ifndef SFLB_COMMON_HTTP_SERVER_H_
#define SFLB_COMMON_HTTP_SERVER_H_

#include <map>
#include <set>

#include "common/mutex.h"
#include "httplib.h"

namespace sflb {

class HttpServer : public httplib::Server {
 public:
  // Re-issues listen() on the bound socket; Linux updates the backlog in place (capped by
  // net.core.somaxconn). Call after bind_to_port/bind_to_any_port. False on failure.
  bool RaiseBacklog(int backlog);
  // Stops accepting new connections while those open keep being served: the listening
  // socket is shut down, httplib's accept loop ends, and listen() returns once every
  // connection has finished. Unlike stop(), which also makes httplib stop calling content
  // providers (cutting every stream), this is the way to drain. Do not call stop() after it.
  void StopAccepting();
  // Shuts down every open connection (blocked reads and writes return at once) and makes
  // connections accepted from now on close immediately. Thread-safe.
  void CloseConnections();
  // Ends the connections that wait for their next request (idle keep-alive), leaving those
  // with a request in progress alone; they close after it. Thread-safe. For draining.
  void CloseIdleConnections();
  // Connections open right now.
  size_t open_connections() const;

 private:
  // Called by httplib on a worker thread for each accepted connection.
  bool process_and_close_socket(::socket_t sock) override;

  mutable Mutex conn_mu_;
  bool closing_ ABSL_GUARDED_BY(conn_mu_) = false;
  bool closing_idle_ ABSL_GUARDED_BY(conn_mu_) = false;
  // Open connections -> whether they are idle (waiting for the next request). A worker removes
  // its socket before closing it, so every descriptor here is open while conn_mu_ is held.
  std::map<::socket_t, bool> connections_ ABSL_GUARDED_BY(conn_mu_);
};

}  // namespace sflb

#endif  // SFLB_COMMON_HTTP_SERVER_H_
