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
//  - Connection hand-off: a handler can take its connection out of httplib's hands
//    (DetachConnection) to serve a long response from an event loop instead of holding a
//    thread for it, and give it back at a request boundary (ResumeConnection). Requires
//    serving with ListenAfterBind().
// Routes, handlers and settings are httplib's as usual.
#ifndef SFLB_COMMON_HTTP_SERVER_H_
#define SFLB_COMMON_HTTP_SERVER_H_

#include <functional>
#include <map>
#include <set>
#include <string>

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
  // Connections open right now (detached ones included).
  size_t open_connections() const;

  // httplib's listen_after_bind(), with the task queue wrapped so that detached connections
  // can be resumed and count as open: it returns once every connection, detached or not, has
  // closed. Blocks.
  bool ListenAfterBind();

  // Connection hand-off. Called from a route handler, on the handler's thread: takes the
  // connection out of httplib's hands. From then on httplib writes nothing to it (the response
  // the handler leaves in `res` is discarded) and does not close it; the caller owns the I/O
  // and must end the hand-off with exactly one of ResumeConnection or CloseDetached. The
  // connection still counts as open: ListenAfterBind() waits for it, CloseConnections() shuts
  // it down, and CloseIdleConnections() too once it is marked idle (the owner sees EOF/HUP).
  // Returns the socket (still in blocking mode), or -1 if the connection cannot be handed off:
  // not called from a handler of this server, bytes of a next (pipelined) request are already
  // buffered, or the server does not run under ListenAfterBind().
  int DetachConnection();
  // Gives a detached connection back at a request boundary (in either blocking mode): a pool
  // thread waits for its next request and serves it as usual. Closes it if the server has
  // stopped serving. Thread-safe.
  void ResumeConnection(int fd);
  // Closes a detached connection. Thread-safe.
  void CloseDetached(int fd);
  // Marks a detached connection as waiting for its next request (true) or busy (false), for
  // CloseIdleConnections(). Thread-safe.
  void SetDetachedIdle(int fd, bool idle);
  // Like ResumeConnection, for a connection whose owner already read bytes of the next request:
  // the thread serves them first, then reads on from the socket.
  void ResumeConnection(int fd, std::string buffered);

  // Parking: a connection that waits for its next request with nothing buffered (a new one
  // before its first request, or one kept alive after a response) is offered to `park`
  // (called on the connection's thread, socket in blocking mode). Returning true takes it
  // detached, exactly as DetachConnection does; false leaves it with the thread. Set before
  // serving. Requires ListenAfterBind().
  void SetParkHandler(std::function<bool(int fd)> park);
  // CloseIdleConnections() was called: connections close after their current request, so
  // responses should say "Connection: close". Thread-safe.
  bool draining() const;

 private:
  class TrackingQueue;

  // Called by httplib on a worker thread for each accepted connection.
  bool process_and_close_socket(::socket_t sock) override;
  // Serves requests on `sock` until it closes (returns true) or is detached (returns false,
  // the socket stays open).
  bool ServeConnection(::socket_t sock, std::string buffered);
  // Hands an idle connection to the park handler; true if it took it.
  bool Park(::socket_t sock);
  // Forgets `sock` (it is about to be closed) and wakes ListenAfterBind's final wait.
  void Forget(::socket_t sock);

  mutable Mutex conn_mu_;
  bool closing_ ABSL_GUARDED_BY(conn_mu_) = false;
  bool closing_idle_ ABSL_GUARDED_BY(conn_mu_) = false;
  // Open connections -> whether they are idle (waiting for the next request). A worker removes
  // its socket before closing it, so every descriptor here is open while conn_mu_ is held.
  std::map<::socket_t, bool> connections_ ABSL_GUARDED_BY(conn_mu_);
  CondVar conn_cv_;  // signalled when connections_ loses an entry
  // The task queue of the running ListenAfterBind() (for ResumeConnection), else null.
  httplib::TaskQueue* queue_ ABSL_GUARDED_BY(conn_mu_) = nullptr;
  std::function<bool(int)> park_;  // set before serving, then read-only
};

}  // namespace sflb

#endif  // SFLB_COMMON_HTTP_SERVER_H_
