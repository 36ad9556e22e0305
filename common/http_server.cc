#include "common/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"

namespace sflb {
namespace {

int TimeoutMs(time_t sec, time_t usec) {
  return static_cast<int>(std::min<int64_t>(int64_t{sec} * 1000 + usec / 1000, 24 * 3600 * 1000));
}

// poll() on one descriptor, retried on EINTR. Returns poll's result; `revents` gets the events.
int PollOne(int fd, short events, int timeout_ms, short* revents) {
  pollfd p{fd, events, 0};
  int r;
  do {
    r = ::poll(&p, 1, timeout_ms);
  } while (r < 0 && errno == EINTR);
  *revents = p.revents;
  return r;
}

void SockaddrToIpPort(const sockaddr_storage& addr, std::string& ip, int& port) {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (addr.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    port = ntohs(a->sin_port);
  } else if (addr.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    port = ntohs(a->sin6_port);
  }
  ip = buf;
}

// An httplib::Stream over one accepted TCP connection: what httplib's internal SocketStream
// does (buffered reads, timeouts), but writability also checks that the peer is still there,
// so a streaming handler notices a client that left within one chunk.
class ConnectionStream final : public httplib::Stream {
 public:
  // `buffered`: bytes of the next request read from the socket already (served first).
  ConnectionStream(int fd, int read_timeout_ms, int write_timeout_ms, std::string buffered)
      : fd_(fd),
        read_timeout_ms_(read_timeout_ms),
        write_timeout_ms_(write_timeout_ms),
        prefix_(std::move(buffered)) {}

  // Bytes of a next request are buffered (so the connection cannot be parked or detached).
  bool has_buffered() const { return off_ < len_ || prefix_off_ < prefix_.size(); }

  // Waits for the first bytes of the next request, up to the socket's SO_RCVTIMEO (the
  // keep-alive timeout), and reads them: one blocking recv(), which a shutdown() from
  // CloseConnections() wakes. False on timeout, error or peer close.
  bool WaitForRequest() {
    if (has_buffered()) return true;  // A pipelined or handed-over request is buffered.
    ssize_t n;
    do {
      n = ::recv(fd_, buf_, sizeof(buf_), 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return false;
    off_ = 0;
    len_ = static_cast<size_t>(n);
    return true;
  }

  bool is_readable() const override {
    if (has_buffered()) return true;
    short revents = 0;
    return PollOne(fd_, POLLIN, read_timeout_ms_, &revents) > 0;
  }

  bool is_writable() const override {
    if (!const_cast<ConnectionStream*>(this)->FlushHead()) return false;
    short revents = 0;
    // One poll: writable, and the peer has not closed its side (it would read nothing more).
    if (PollOne(fd_, POLLOUT | POLLRDHUP, write_timeout_ms_, &revents) <= 0) return false;
    return (revents & POLLOUT) != 0 &&
           (revents & (POLLRDHUP | POLLERR | POLLHUP | POLLNVAL)) == 0;
  }

  ssize_t read(char* ptr, size_t size) override {
    if (prefix_off_ < prefix_.size()) {
      const size_t n = std::min(size, prefix_.size() - prefix_off_);
      std::memcpy(ptr, prefix_.data() + prefix_off_, n);
      prefix_off_ += n;
      if (prefix_off_ == prefix_.size()) std::string().swap(prefix_), prefix_off_ = 0;
      return static_cast<ssize_t>(n);
    }
    if (off_ == len_) {
      if (!FlushHead()) return -1;  // e.g. "100 Continue" before the body is read
      off_ = len_ = 0;
      // Large reads bypass the buffer.
      const ssize_t n = size >= sizeof(buf_) ? Recv(ptr, size) : Recv(buf_, sizeof(buf_));
      if (n <= 0 || size >= sizeof(buf_)) return n;
      len_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, len_ - off_);
    std::memcpy(ptr, buf_ + off_, n);
    off_ += n;
    return static_cast<ssize_t>(n);
  }

  // One send(): the socket's SO_SNDTIMEO bounds a blocked write. (Handlers that stream check
  // is_writable() themselves, through their DataSink.) httplib writes a response head and its
  // body separately: the head is held back and goes out with the body in one sendmsg(); it is
  // flushed alone before any read or writability check, and after the request (FlushHead).
  ssize_t write(const char* ptr, size_t size) override {
    if (detached_) return static_cast<ssize_t>(size);  // httplib's answer is discarded
    absl::string_view data(ptr, size);
    const bool head = size < 16384 && absl::StartsWith(data, "HTTP/1.") &&
                      absl::EndsWith(data, "\r\n\r\n");
    // A handler that answers "Connection: close" (e.g. without reading the request body) means
    // it: httplib itself only looks at the request's header.
    if (head && absl::StrContains(data, "\r\nConnection: close\r\n")) close_requested_ = true;
    // A "100 Continue" still held when the final answer comes was never earned (the handler
    // did not read the body): it must not invite the client to send it.
    if (head && absl::StartsWith(held_, "HTTP/1.1 100")) held_.clear();
    if (held_.empty() && head) {
      held_.assign(ptr, size);
      return static_cast<ssize_t>(size);
    }
    if (!held_.empty()) return SendWithHead(ptr, size);
    ssize_t n;
    do {
      n = ::send(fd_, ptr, size, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
  }

  // Sends a held-back response head. False if the connection failed.
  bool FlushHead() {
    while (!held_.empty()) {
      ssize_t n = ::send(fd_, held_.data(), held_.size(), MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        held_.clear();
        return false;
      }
      held_.erase(0, static_cast<size_t>(n));
    }
    return true;
  }

  // Hands the connection over (see HttpServer::DetachConnection): false if bytes of a next
  // request are already buffered here.
  bool Detach() {
    if (has_buffered()) return false;
    detached_ = true;
    return true;
  }
  bool detached() const { return detached_; }
  // The last response said "Connection: close".
  bool close_requested() const { return close_requested_; }

  // httplib asks for both addresses on every request; they are looked up once per connection.
  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    if (remote_port_ < 0) {
      sockaddr_storage addr{};
      socklen_t len = sizeof(addr);
      remote_port_ = 0;
      if (::getpeername(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
        SockaddrToIpPort(addr, remote_ip_, remote_port_);
      }
    }
    ip = remote_ip_;
    port = remote_port_;
  }

  void get_local_ip_and_port(std::string& ip, int& port) const override {
    if (local_port_ < 0) {
      sockaddr_storage addr{};
      socklen_t len = sizeof(addr);
      local_port_ = 0;
      if (::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
        SockaddrToIpPort(addr, local_ip_, local_port_);
      }
    }
    ip = local_ip_;
    port = local_port_;
  }

  ::socket_t socket() const override { return fd_; }

 private:
  // Tries the read first and waits (up to the read timeout) only when nothing is there: most
  // reads find their bytes already arrived, and that saves a poll() per read.
  ssize_t Recv(char* ptr, size_t size) {
    ssize_t n;
    do {
      n = ::recv(fd_, ptr, size, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) return n;
    short revents = 0;
    if (PollOne(fd_, POLLIN, read_timeout_ms_, &revents) <= 0) return -1;
    do {
      n = ::recv(fd_, ptr, size, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n;
  }

  const int fd_;
  const int read_timeout_ms_;
  const int write_timeout_ms_;
  // The response head plus as much of `ptr` as one sendmsg() takes; returns the bytes of
  // `ptr` sent (the head always goes out whole first, or the call fails).
  ssize_t SendWithHead(const char* ptr, size_t size) {
    iovec iov[2] = {{held_.data(), held_.size()}, {const_cast<char*>(ptr), size}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    ssize_t n;
    do {
      n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      held_.clear();
      return n;
    }
    const size_t sent = static_cast<size_t>(n);
    if (sent >= held_.size()) {
      const size_t body = sent - held_.size();
      held_.clear();
      return static_cast<ssize_t>(body);
    }
    held_.erase(0, sent);
    if (!FlushHead()) return -1;
    return 0;  // httplib writes the rest again
  }

  std::string prefix_;  // handed-over bytes, served before buf_
  size_t prefix_off_ = 0;
  char buf_[4096];
  size_t off_ = 0;
  size_t len_ = 0;
  bool detached_ = false;
  bool close_requested_ = false;
  std::string held_;  // a response head waiting for its body
  mutable std::string remote_ip_;
  mutable int remote_port_ = -1;
  mutable std::string local_ip_;
  mutable int local_port_ = -1;
};

// The connection the current thread is serving a request on (for DetachConnection).
struct CurrentConnection {
  const HttpServer* server = nullptr;
  ConnectionStream* stream = nullptr;
};
thread_local CurrentConnection t_current;

void SetBlocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags >= 0 && (flags & O_NONBLOCK) != 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
}

}  // namespace

// httplib's task queue, wrapped: remembers itself for ResumeConnection, and on shutdown first
// waits for every connection (detached ones included) to close.
class HttpServer::TrackingQueue final : public httplib::TaskQueue {
 public:
  TrackingQueue(HttpServer* server, httplib::TaskQueue* inner) : server_(server), inner_(inner) {
    MutexLock lock(&server_->conn_mu_);
    server_->queue_ = this;
  }
  ~TrackingQueue() override { delete inner_; }

  void enqueue(std::function<void()> fn) override { inner_->enqueue(std::move(fn)); }
  void on_idle() override { inner_->on_idle(); }
  void shutdown() override {
    {
      MutexLock lock(&server_->conn_mu_);
      // Bounded by the owner: a drain ends with CloseConnections(), which ends every one.
      while (!server_->connections_.empty()) {
        server_->conn_cv_.WaitWithTimeout(&server_->conn_mu_, absl::Seconds(1));
      }
      // Nobody can call ResumeConnection any more: no connection is left to resume.
      server_->queue_ = nullptr;
    }
    inner_->shutdown();
  }

 private:
  HttpServer* const server_;
  httplib::TaskQueue* const inner_;
};

bool HttpServer::RaiseBacklog(int backlog) {
  return ::listen(svr_sock_, backlog) == 0;
}

void HttpServer::StopAccepting() {
  // accept() on a shut-down listening socket fails at once; httplib then closes the socket
  // itself and leaves its loop without marking the server as shutting down.
  ::shutdown(svr_sock_, SHUT_RDWR);
}

void HttpServer::CloseConnections() {
  MutexLock lock(&conn_mu_);
  closing_ = true;
  for (const auto& [fd, idle] : connections_) ::shutdown(fd, SHUT_RDWR);
}

void HttpServer::CloseIdleConnections() {
  MutexLock lock(&conn_mu_);
  closing_idle_ = true;
  for (const auto& [fd, idle] : connections_) {
    if (idle) ::shutdown(fd, SHUT_RDWR);
  }
}

size_t HttpServer::open_connections() const {
  MutexLock lock(&conn_mu_);
  return connections_.size();
}

bool HttpServer::ListenAfterBind() {
  std::function<httplib::TaskQueue*()> inner = new_task_queue;
  new_task_queue = [this, inner] { return new TrackingQueue(this, inner()); };
  bool ok = listen_after_bind();
  new_task_queue = inner;
  return ok;
}

int HttpServer::DetachConnection() {
  if (t_current.server != this || t_current.stream == nullptr) return -1;
  {
    MutexLock lock(&conn_mu_);
    if (queue_ == nullptr || closing_) return -1;
  }
  if (!t_current.stream->Detach()) return -1;
  return t_current.stream->socket();
}

void HttpServer::ResumeConnection(int fd) { ResumeConnection(fd, std::string()); }

void HttpServer::ResumeConnection(int fd, std::string buffered) {
  SetBlocking(fd);
  httplib::TaskQueue* queue;
  {
    MutexLock lock(&conn_mu_);
    queue = closing_ ? nullptr : queue_;
    // With a request already buffered the connection is busy, not idle (a drain must let it
    // be answered).
    if (queue != nullptr) connections_[fd] = buffered.empty();
  }
  if (queue == nullptr) {
    CloseDetached(fd);
    return;
  }
  // Outside the lock (enqueue may start a thread). Safe: while `fd` is in connections_, the
  // queue's shutdown waits, so `queue` outlives this call.
  queue->enqueue([this, fd, buffered = std::move(buffered)]() mutable {
    if (ServeConnection(fd, std::move(buffered))) ::close(fd);
  });
}

void HttpServer::SetParkHandler(std::function<bool(int fd)> park) { park_ = std::move(park); }

bool HttpServer::draining() const {
  MutexLock lock(&conn_mu_);
  return closing_idle_;
}

bool HttpServer::Park(::socket_t sock) {
  if (!park_) return false;
  {
    MutexLock lock(&conn_mu_);
    if (queue_ == nullptr || closing_ || closing_idle_) return false;
    connections_[sock] = true;  // idle
  }
  return park_(sock);
}

void HttpServer::CloseDetached(int fd) {
  Forget(fd);
  ::shutdown(fd, SHUT_RDWR);
  ::close(fd);
}

void HttpServer::SetDetachedIdle(int fd, bool idle) {
  MutexLock lock(&conn_mu_);
  auto it = connections_.find(fd);
  if (it == connections_.end()) return;
  it->second = idle;
  if (idle && closing_idle_) ::shutdown(fd, SHUT_RDWR);
}

void HttpServer::Forget(::socket_t sock) {
  MutexLock lock(&conn_mu_);
  connections_.erase(sock);
  conn_cv_.SignalAll();
}

bool HttpServer::process_and_close_socket(::socket_t sock) {
  {
    MutexLock lock(&conn_mu_);
    if (closing_) {
      ::close(sock);
      return false;
    }
    connections_[sock] = true;
  }
  const int one = 1;
  setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (!ServeConnection(sock, std::string())) return true;  // detached: lives on elsewhere
  ::close(sock);
  return true;
}

// Mirrors httplib's own per-connection loop (wait for a request, process it, repeat while the
// connection is kept alive), with an efficient, stoppable wait.
bool HttpServer::ServeConnection(::socket_t sock, std::string buffered) {
  const int write_timeout_ms = TimeoutMs(write_timeout_sec_, write_timeout_usec_);
  timeval send_timeout{static_cast<time_t>(write_timeout_ms / 1000),
                       static_cast<suseconds_t>((write_timeout_ms % 1000) * 1000)};
  setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof(send_timeout));
  // At least 1 ms: a zero SO_RCVTIMEO would mean "wait forever".
  const int keep_alive_ms = static_cast<int>(std::clamp<int64_t>(
      int64_t{keep_alive_timeout_sec_} * 1000, 1, int64_t{24} * 3600 * 1000));
  timeval receive_timeout{static_cast<time_t>(keep_alive_ms / 1000),
                          static_cast<suseconds_t>((keep_alive_ms % 1000) * 1000)};
  setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &receive_timeout, sizeof(receive_timeout));
  ConnectionStream stream(sock, TimeoutMs(read_timeout_sec_, read_timeout_usec_),
                          write_timeout_ms, std::move(buffered));
  for (size_t left = keep_alive_max_count_; left > 0; --left) {
    // Waiting for the next request with nothing buffered: an event loop can hold it instead.
    if (!stream.has_buffered() && Park(sock)) return false;
    bool draining;
    {
      MutexLock lock(&conn_mu_);
      draining = closing_idle_;
      connections_[sock] = !stream.has_buffered();  // idle: waiting for the next request
    }
    // A draining server finishes the request a connection was opened for, then closes it.
    if (draining && left != keep_alive_max_count_) break;
    if (!stream.WaitForRequest()) break;
    {
      MutexLock lock(&conn_mu_);
      connections_[sock] = false;
      draining = closing_idle_;
    }
    bool connection_closed = false;
    t_current = CurrentConnection{this, &stream};
    bool ok = process_request(stream, /*close_connection=*/left == 1 || draining,
                              connection_closed, nullptr);
    t_current = CurrentConnection{};
    if (stream.detached()) return false;
    if (!stream.FlushHead()) break;
    if (!ok || connection_closed || stream.close_requested()) break;
  }
  Forget(sock);
  ::shutdown(sock, SHUT_RDWR);
  return true;
}

}  // namespace sflb
